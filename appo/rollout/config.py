"""The rollout settings: sampling, the tool loop's limits, and the backend. One class for the engines
(``appo.rollout.engine.RolloutEngine``, ``appo.rollout.vllm.VLLMRolloutEngine``, the verl agent loop) and for
the trainer's ``rollout`` block (``appo.config.TrainConfig.rollout``), so each default is written once here.

The defaults are the CPU demo's (SmolLM2-135M-Instruct with the python tool, ``appo train`` with no config):
short turns, two tool calls, and a response that opens a python call (``response_prefix="<python>"``, which
makes a 135M model use the tool; set ``""`` to leave the model free, as a larger model wants).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from appo.settings import ConfigError, Range, check_fields, setting

_TOKENS = 2**20  # a sequence: far above any run, low enough that a typo (1e12) is refused before it runs


@dataclass
class RolloutConfig:
    """Sampling and tool-loop settings; each field's help says what it does (``appo train --print-config``
    shows them all). Values are checked when the object is built (and again by ``validate`` after a change),
    each error a ConfigError (a ValueError) naming the field."""

    temperature: float = setting(0.7, "sampling temperature (log-probs and entropies are those of the "
                                 "temperature-scaled distribution)", within=Range(0, 10, open_lo=True))
    top_p: float = setting(1.0, "nucleus sampling; the recorded log-probs ignore the truncation "
                           "(appo.rollout.sampling)", within=Range(0, 1, open_lo=True))
    max_prompt_tokens: int = setting(400, "appo's trainer drops longer prompts from the data (the engines "
                                     "check only max_total_tokens)", within=Range(1, _TOKENS))
    max_new_tokens_per_turn: int = setting(64, "generated tokens between two tool results before a row ends "
                                           "with 'length'", within=Range(1, _TOKENS))
    max_total_tokens: int = setting(480, "prompt + response (tool results included) per row; reaching it "
                                    "ends the row ('length')", within=Range(2, _TOKENS))
    max_tool_calls: int = setting(2, "tool calls a row may make; closing one more ends the row with "
                                  "'tool_limit' (the call is not run)", within=Range(0, 1024))
    stop_tags: tuple[str, ...] = setting(
        ("</python>", "</search>", "</answer>"),
        "closing tags that end a turn: a tool's tag runs the tool (every tool given to the engine is added), "
        "</answer> ends the rollout ('answer'), another tag (a tool that is not available) ends it with "
        "'error'; EOS always stops")
    result_template: str = setting(
        "<result>{result}</result>\n",
        "how a tool's output is appended (masked 0): {result} once; the template's own text is encoded as it "
        "is, the output as plain text (appo.rollout.tool_loop.encode_plain). appo's trainer also requires "
        "one <result> ... </result> wrapper and no other tag (appo.config.check_result_template)")
    response_prefix: str = setting(
        "<python>",
        "text that opens every response (prompt tokens, mask 0, part of the first turn and of the graded "
        "text), e.g. '<python>' to make a small model start with a tool call; '' leaves the model free")
    max_batch_rows: int | None = setting(32, "rows decoded together at most (bounds the KV cache and "
                                         "activation memory; null: all at once); the output is the same. "
                                         "The vLLM backend schedules its own batches", within=Range(1, 2**16))
    reuse_cache: bool = setting(True, "keep the KV cache across tool turns; false re-prefills each row's "
                                "history after every tool turn (the naive baseline of bench/bench_rollout.py)")
    backend: Literal["transformers", "vllm"] = setting(
        "transformers",
        "appo's trainer: 'transformers' (appo.rollout.engine) or 'vllm' (appo.rollout.vllm, needs vLLM; the "
        "trainer copies the policy's weights into vLLM before it samples after an optimizer step: at the "
        "start of a step and before each mini-batch's branches)")
    vllm: dict = setting(help="extra keyword arguments for vllm.LLM (e.g. gpu_memory_utilization)",
                         factory=dict)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Check every field (type, choices, range) and that ``result_template`` holds ``{result}``; raises
        ConfigError (a ValueError) naming the first bad field."""
        check_fields(self)
        if "{result}" not in self.result_template:
            raise ConfigError("result_template", f"must contain '{{result}}', got {self.result_template!r}")
