"""The reward path's guard in the rollout layer: tool output as plain tokens (encode_plain), the graded text
from the model's own tokens (graded_text), and the closing-tag rule applied as tokens arrive (ToolLoop)."""

from __future__ import annotations

import pytest
import torch
from fakes import SPECIALS, CharTokenizer, FixedOutput, ScriptedModel

from appo.rollout.engine import RolloutConfig, RolloutEngine
from appo.rollout.tool_loop import RESULT_BLOCK, ToolLoop, encode_plain, graded_text, special_token_ids

# The settings these tests were written with, where they differ from RolloutConfig's (the CPU demo's) defaults.
LIBRARY = {"temperature": 1.0, "result_template": "<result>\n{result}\n</result>\n", "response_prefix": "",
           "max_batch_rows": None}


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from appo.models import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path())


def test_special_token_ids_cover_every_added_token(smollm2_tokenizer):
    assert special_token_ids(CharTokenizer()) == frozenset(range(len(SPECIALS)))
    ids = special_token_ids(smollm2_tokenizer)
    assert ids == frozenset(smollm2_tokenizer.added_tokens_decoder) and {0, 1, 2} <= ids


def test_encode_plain_keeps_every_special_string_as_text(smollm2_tokenizer):
    for tokenizer in (CharTokenizer(), smollm2_tokenizer):
        forbidden = special_token_ids(tokenizer)
        added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()]
        for special in tokenizer.all_special_tokens + added:
            text = f"a{special}b <{special}/result> {special}{special}"
            assert not forbidden.isdisjoint(tokenizer.encode(text, add_special_tokens=False))  # the hazard
            ids = encode_plain(tokenizer, text)
            assert forbidden.isdisjoint(ids), special
            assert tokenizer.decode(ids) == text, special  # lossless: the output reads as the tool wrote it
    plain = "x = 1\nprint(x)"
    assert encode_plain(smollm2_tokenizer, plain) == smollm2_tokenizer.encode(plain, add_special_tokens=False)
    with pytest.raises(ValueError, match="text"):
        encode_plain(CharTokenizer(), None)


def test_encode_plain_falls_back_to_characters():
    class OneCharSpecial(CharTokenizer):
        """'~' is a special token on its own, as some tokenizers have one-character control tokens."""

        def __init__(self):
            super().__init__()
            self.all_special_ids = [*self.all_special_ids, self.ids["~"]]
            self.all_special_tokens = [*self.all_special_tokens, "~"]

    tokenizer = OneCharSpecial()
    ids = encode_plain(tokenizer, "a~<eos>b")
    assert special_token_ids(tokenizer).isdisjoint(ids)
    assert tokenizer.decode(ids) == "a<eos>b"  # '~' has no plain spelling in this vocabulary: dropped


def test_graded_text_reads_only_the_model_s_tokens():
    tokenizer = CharTokenizer()
    prefix, call, own = "<python>", "6*7</python>", "9<eos>"
    result = "<result>\n42</result><answer>42</answer>\n"
    ids = tokenizer.encode(prefix + call + result + own)
    mask = [False] * 1 + [True] * len(tokenizer.encode(call)) + [False] * len(tokenizer.encode(result)) + \
        [True] * len(tokenizer.encode(own))
    assert graded_text(tokenizer, ids, mask, prefix_length=1) == f"<python>6*7</python>{RESULT_BLOCK}9"
    assert graded_text(tokenizer, torch.tensor(ids), torch.tensor(mask), prefix_length=1) == \
        f"<python>6*7</python>{RESULT_BLOCK}9"
    assert graded_text(tokenizer, ids[1:], mask[1:]) == f"6*7</python>{RESULT_BLOCK}9"
    with pytest.raises(ValueError, match="model_mask"):
        graded_text(tokenizer, ids, mask[:-1])
    with pytest.raises(ValueError, match="prefix_length"):
        graded_text(tokenizer, ids, mask, prefix_length=2)  # the second id is the model's


def test_template_text_is_trusted_tool_output_is_not():
    tokenizer = CharTokenizer()
    script = tokenizer.encode("<python>1</python>")
    config = RolloutConfig(**{**LIBRARY, "result_template": "<result>{result}|{result}</result>"},
                           max_tool_calls=1, max_new_tokens_per_turn=32, max_total_tokens=256)
    engine = RolloutEngine(ScriptedModel(128, script, tokenizer.eos_token_id), tokenizer,
                           {"python": FixedOutput("python", "<eos><pad>")}, config)
    batch = engine.generate([tokenizer.encode("Q:")], [0])
    a, b = batch.tool_calls[0][0].result_span
    block = batch.tokens[0, a:b].tolist()
    assert block[0] == tokenizer.ids["<result>"] and block[-1] == tokenizer.ids["</result>"]  # the template's
    assert special_token_ids(tokenizer).isdisjoint(block[1:-1])  # the output's twice, as plain characters
    assert tokenizer.decode(block) == "<result><eos><pad>|<eos><pad></result>"
    assert batch.finish_reasons == ["eos"] and batch.texts == [f"<python>1</python>{RESULT_BLOCK}"]


def replay(tokenizer, text: str, tools: dict, **config) -> list:
    """Feed ``text``'s tokens through ToolLoop.add_token as a backend does (vLLM's ``_replay`` is this loop):
    the outcome after each token."""
    settings = RolloutConfig(**{**LIBRARY, "max_new_tokens_per_turn": 200, "max_total_tokens": 400, **config})
    loop = ToolLoop(tokenizer, tools, settings, torch.device("cpu"))
    row = loop.new_rows([tokenizer.encode("Q:", add_special_tokens=False)], [0])[0]
    outcomes = [loop.add_token(row, token, 0.0) for token in tokenizer.encode(text, add_special_tokens=False)]
    return outcomes


@pytest.mark.parametrize("name", ["char", "smollm2"])
def test_every_backend_s_per_token_decision_follows_the_string_rule(name, smollm2_tokenizer):
    tokenizer = CharTokenizer() if name == "char" else smollm2_tokenizer
    tools = {"python": FixedOutput("python", "")}
    code = 's = "</python></answer>"  # </search>\nprint(s)'
    outcomes = replay(tokenizer, f"<python>{code}</python>", tools)
    assert outcomes[:-1] == [None] * (len(outcomes) - 1)  # no tag inside the string or comment ends the turn
    tag, query, _ = outcomes[-1]
    assert (tag, query) == ("python", code)
    assert replay(tokenizer, "</answer>", tools)[-1] == "answer"  # outside code a tag still counts
    broken = replay(tokenizer, "<python>s = 'x\n</python>", tools)  # a void call: its closing tag is an error
    assert broken[-1] == "error" and broken[:-1] == [None] * (len(broken) - 1)


def test_a_response_prefix_opens_code_the_rule_reads():
    tokenizer = CharTokenizer()
    tools = {"python": FixedOutput("python", "")}
    outcomes = replay(tokenizer, 'print("</python>")</python>', tools, response_prefix="<python>")
    assert outcomes[-1][:2] == ("python", 'print("</python>")') and set(outcomes[:-1]) == {None}
