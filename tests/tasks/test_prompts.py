"""Prompts: message layout, demonstrations that are well formed and true, and chat-template rendering."""

import re

import pytest

from appo.tasks import (Example, build_messages, check_format, extract_answer, find_tool_call, numbers_match,
                        render_prompt)
from appo.tasks.prompts import DEMONSTRATIONS, system_prompt
from appo.tools.calculator import CalculatorTool
from appo.tools.python_sandbox import PythonTool

EXAMPLE = Example(id="x", question="What is 13 * 7?", answer="91")


def test_message_layout():
    messages = build_messages(EXAMPLE, tools=("python",), few_shot=2)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert messages[-1]["content"] == "What is 13 * 7?"
    assert "<python>" in messages[0]["content"] and "<search>" not in messages[0]["content"]
    assert "<answer>" in messages[0]["content"] and "<result>" in messages[0]["content"]
    assert len(build_messages("plain question", few_shot=0)) == 2


def test_demonstrations_follow_the_tools():
    search_messages = build_messages(EXAMPLE, tools=("search",), few_shot=2)
    assert all("<search>" in m["content"] for m in search_messages[2:5:2])
    mixed = build_messages(EXAMPLE, tools=("python", "search"), few_shot=2)
    assert "<python>" in mixed[2]["content"] and "<search>" in mixed[4]["content"]
    no_tools = build_messages(EXAMPLE, tools=(), few_shot=1)
    assert "<python>" not in no_tools[0]["content"] and "<answer>" in no_tools[2]["content"]


def test_demonstrations_are_well_formed_and_their_tool_results_are_true():
    python, calculator = PythonTool(timeout_s=3), CalculatorTool()
    for tag, demos in DEMONSTRATIONS.items():
        for question, response in demos:
            assert check_format(response) == (True, ""), response
            assert extract_answer(response)
            call = find_tool_call(response)
            if tag in ("python", "calculator"):
                expected = response.split("<result>")[1].split("</result>")[0]
                tool = python if tag == "python" else calculator
                assert tool.run(call[1]) == expected
                assert numbers_match(extract_answer(response), expected), response


def test_python_demonstrations_are_word_problems_computed_by_print():
    # the 135M model imitates these: the code states the question's numbers and prints the answer
    for question, response in DEMONSTRATIONS["python"]:
        call = find_tool_call(response)
        assert call[1].startswith("print(") and "\n" not in call[1].strip(), response
        from_question = set(re.findall(r"\d+", question))
        assert len([n for n in re.findall(r"\d+", call[1]) if n in from_question]) >= 2, (question, response)


def test_bad_arguments():
    with pytest.raises(ValueError, match="tools"):
        system_prompt(("shell",))
    with pytest.raises(ValueError, match="few_shot"):
        build_messages(EXAMPLE, few_shot=-1)


def test_render_prompt_with_the_smollm2_chat_template():
    from transformers import AutoTokenizer

    from appo.models import smollm2_path
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    ids = render_prompt(tokenizer, EXAMPLE, tools=("python",), few_shot=2)
    assert all(isinstance(i, int) for i in ids)
    text = tokenizer.decode(ids)
    assert text.endswith("<|im_start|>user\nWhat is 13 * 7?<|im_end|>\n<|im_start|>assistant\n")
    assert text.count("<|im_start|>assistant") == 3
    assert len(ids) < 400  # the small model's budget: system prompt plus two demonstrations
    assert len(render_prompt(tokenizer, EXAMPLE, few_shot=0)) < len(ids)
