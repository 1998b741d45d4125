"""Prompts in the APPO/ARPO style: think in <think>, call tools with <python>/<search>/<calculator>, read
<result> blocks, answer in <answer>; plus short hand-written few-shot demonstrations (sized for a 135M model
with a small context budget: each is a handful of lines).
"""

from __future__ import annotations

from appo.tasks.base import Example

TOOL_DESCRIPTIONS = {
    "python": "<python>code</python> runs Python code; what it prints (or the value of its last line) comes "
              "back inside <result> </result>.",
    "search": "<search>query</search> searches Wikipedia paragraphs; the best matches come back inside "
              "<result> </result>.",
    "calculator": "<calculator>expression</calculator> evaluates arithmetic such as 3 * (4 + 5) / 2; "
                  "the value comes back inside <result> </result>.",
}

DEMONSTRATIONS = {
    "python": [
        ("A baker made 36 cupcakes in the morning and half as many in the afternoon. He sold 40 of them. "
         "How many cupcakes are left?",
         "<python>print(36 + 36 / 2 - 40)</python>\n<result>14.0</result>\n<answer>14</answer>"),
        ("Emma buys 3 notebooks for $4 each and a pen for $2. She pays with a $20 bill. How much change does "
         "she get?",
         "<python>print(20 - (3 * 4 + 2))</python>\n<result>6</result>\n<answer>6</answer>"),
        ("A school has 5 classes with 24 students each. 25% of the students walk to school. How many students "
         "walk to school?",
         "<python>print(5 * 24 * 25 / 100)</python>\n<result>30.0</result>\n<answer>30</answer>"),
        ("Jake runs 4 miles a day, 5 days a week. How many miles does he run in 3 weeks?",
         "<python>print(4 * 5 * 3)</python>\n<result>60</result>\n<answer>60</answer>"),
    ],
    "search": [
        ("Who wrote the novel that the film Jaws is based on?",
         "<search>Jaws novel author</search>\n<result>Jaws (novel): Jaws is a 1974 novel by American writer "
         "Peter Benchley.</result>\n<answer>Peter Benchley</answer>"),
        ("In which city was the composer of The Magic Flute born?",
         "<think>The Magic Flute is an opera by Mozart.</think>\n<search>Mozart birthplace</search>\n"
         "<result>Wolfgang Amadeus Mozart: Mozart was born in Salzburg in 1756.</result>\n"
         "<answer>Salzburg</answer>"),
    ],
    "calculator": [
        ("A worker earns $15 an hour for 40 hours. How much does she earn?",
         "<calculator>15 * 40</calculator>\n<result>600</result>\n<answer>600</answer>"),
    ],
    None: [("What is 2 + 3?", "<think>2 + 3 = 5.</think>\n<answer>5</answer>")],
}


def system_prompt(tools=("python",)) -> str:
    """The system message for an agent that may call ``tools`` (tags among python, search, calculator)."""
    unknown = [t for t in tools if t not in TOOL_DESCRIPTIONS]
    if unknown:
        raise ValueError(f"tools: unknown tool tags {unknown}; known: {sorted(TOOL_DESCRIPTIONS)}")
    lines = ["You are a helpful assistant that solves problems step by step.",
             "Think briefly inside <think> </think>."]
    if tools:
        lines.append("You can call tools, one at a time, and wait for each result:")
        lines += [f"- {TOOL_DESCRIPTIONS[t]}" for t in tools]
    lines.append("Finish with the final answer inside <answer> </answer>; for math give only the number.")
    return "\n".join(lines)


def demonstrations(tools=("python",), count: int = 2) -> list[tuple[str, str]]:
    """``count`` (question, response) demonstrations, taking the tools in turn (no-tool demo if tools=())."""
    pools = [DEMONSTRATIONS[t] for t in tools] or [DEMONSTRATIONS[None]]
    chosen, round_index = [], 0
    while len(chosen) < count and round_index < max(len(p) for p in pools):
        chosen += [pool[round_index] for pool in pools if round_index < len(pool)]
        round_index += 1
    return chosen[:count]


def build_messages(example: Example | str, tools=("python",), few_shot: int = 2) -> list[dict]:
    """Chat messages: system prompt, ``few_shot`` demonstrations as user/assistant turns, then the question.

    example: an Example or the question text. Returns [{"role": ..., "content": ...}, ...].
    """
    if few_shot < 0:
        raise ValueError(f"few_shot: must be >= 0, got {few_shot}")
    tools = tuple(tools)
    question = example.question if isinstance(example, Example) else str(example)
    messages = [{"role": "system", "content": system_prompt(tools)}]
    for demo_question, demo_response in demonstrations(tools, few_shot):
        messages += [{"role": "user", "content": demo_question},
                     {"role": "assistant", "content": demo_response}]
    messages.append({"role": "user", "content": question})
    return messages


def render_prompt(tokenizer, example: Example | str, tools=("python",), few_shot: int = 2) -> list[int]:
    """Token ids (list[int]) of ``build_messages(...)`` through the tokenizer's chat template, ending with
    the assistant generation prompt."""
    messages = build_messages(example, tools=tools, few_shot=few_shot)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding by default
        ids = ids["input_ids"]
    return [int(i) for i in ids]
