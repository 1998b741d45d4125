"""APPO's agent loop for verl 0.9.1: appo's tool loop on verl's LLM servers, registered in verl's agent-loop
registry as ``appo_agent`` (``appo.integrations.verl_plugin`` imports this module in every verl process).

The step's initial rollouts AND APPO's branches run through this loop, so a branch decodes with the same
tools, stop tags, result blocks and limits as the rollout it continues. Every decision about tags, tool calls,
masks and limits is ``appo.rollout.tool_loop.ToolLoop``'s, the code appo's transformers and vLLM engines
share:

* a turn is one ``LLMServerClient.generate`` request on the row's token ids so far (never re-tokenised text),
  with the closing tags as stop strings; the tokens that come back are replayed through
  ``ToolLoop.add_token``, so the turn ends at the very token where appo's engines end it. A stop the tool loop
  does not accept (e.g. a ``</python>`` inside a string literal of the code) continues with a new request;
* a closed call runs the tool (``Tool.run_batch``, in a thread) and its escaped result is appended as masked
  tokens (response_mask 0). Whatever the model wrote after the closing tag in the same server response is
  dropped: a rollout, or a branch, can never write its own result block and be graded on it;
* EOS, ``</answer>``, the tool-call limit and the length budget (``rollout.response_length`` tokens after the
  prompt, tool results included) end the row.

Select it with ``actor_rollout_ref.rollout.agent.default_agent_loop=appo_agent``. Its settings are the keyword
arguments of :class:`APPOAgentLoop`, set through verl's own agent-loop config file
(``actor_rollout_ref.rollout.agent.agent_loop_config_path``), e.g.::

    - name: appo_agent
      _target_: appo.integrations.verl_agent.APPOAgentLoop
      appo_tools: [calculator]
      max_tool_calls: 3
      response_prefix: ""

A branch: the trainer (``appo.integrations.verl_trainer``) passes the dataset row's fields plus
``appo_branch`` = {"prompt_ids", "response_ids", "response_mask", "include_token"}: the parent's prompt and
the response prefix the branch shares with it. The loop continues that prefix instead of building the prompt:
tool calls completed in the prefix count toward ``max_tool_calls`` and decoding resumes inside the prefix's
turn.

Each output records, in ``extra_fields`` (which verl's reward managers pass to the reward function as
``extra_info``): ``appo_agent`` (the loop's registered name: the trainer branches through that same loop),
``appo_finish`` (the finish reason), ``appo_tool_calls`` (tag, query, the result text the tool returned, and
the token spans of call and result, relative to the response) and ``appo_graded_text`` (the text a reward must
grade: ``ToolLoop.graded_text_of``, the model's own tokens with each tool result an empty block, as appo's
engines grade; verl's reward managers decode the whole response, tool output included).
"""

from __future__ import annotations

import threading
import time
from typing import Any
from uuid import uuid4

from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopOutput, register

from appo.rollout.batch import ToolCall
from appo.rollout.config import RolloutConfig
from appo.rollout.tool_loop import Row, ToolLoop

AGENT_NAME = "appo_agent"
# The RolloutConfig fields the loop takes (same names and defaults as appo's rollout block); verl sets the
# rest: sampling from its sampling params, the length budget from rollout.response_length.
LOOP_FIELDS = ("max_tool_calls", "max_new_tokens_per_turn", "stop_tags", "result_template", "response_prefix")
BRANCH_KEY = "appo_branch"
_TOOLS: dict[tuple, tuple[dict, threading.Lock]] = {}     # one tool set per process and configuration
_TOOLS_LOCK = threading.Lock()


def _tool_set(names: tuple[str, ...], options: dict) -> tuple[dict, threading.Lock]:
    """The process's tools for ``names`` (built once: verl builds an agent loop per trajectory) and the lock
    that serialises their calls."""
    key = (names, repr(sorted(options.items())))
    with _TOOLS_LOCK:
        if key not in _TOOLS:
            from appo.tools import make_tools

            _TOOLS[key] = (make_tools(list(names), **options), threading.Lock())
        return _TOOLS[key]


@register(AGENT_NAME)
class APPOAgentLoop(AgentLoopBase):
    """verl agent loop running appo's tool loop (module docstring).

    name: the name this loop is registered under (verl's agent-loop config passes it); recorded in each output
        so the trainer branches through the same loop. appo_tools: tool names for ``appo.tools.make_tools``
        ("python", "calculator", "search"; empty for single-turn tasks); tool_options: their constructor
        arguments per name. The fields of LOOP_FIELDS (max_tool_calls, max_new_tokens_per_turn, stop_tags,
        result_template, response_prefix): ``appo.rollout.config.RolloutConfig``'s, with its defaults (the
        response prefix is appended to the prompt and counted as prompt; its default "<python>" opens a
        python call, so set "" for another tool). verl's own keyword arguments (trainer_config,
        server_manager, tokenizer, ..., and verl's ``tools``, which this loop does not use) go to
        ``AgentLoopBase``.
    """

    def __init__(self, *args, name: str = AGENT_NAME, appo_tools: list[str] | tuple[str, ...] = ("python",),
                 tool_options: dict | None = None, tools: Any = None, **kwargs):
        given = {key: kwargs.pop(key) for key in LOOP_FIELDS if key in kwargs}
        super().__init__(*args, **kwargs)
        if isinstance(appo_tools, str):
            raise ValueError(  # noqa: TRY004 - appo reports bad arguments as ValueError, naming them
                f"appo_tools: expected a list of tool names, got the string {appo_tools!r}")
        self.name = str(name)
        self.tools, self._tool_lock = _tool_set(tuple(appo_tools), dict(tool_options or {}))
        if "stop_tags" in given and not isinstance(given["stop_tags"], str):
            given["stop_tags"] = tuple(given["stop_tags"])     # a YAML list (OmegaConf's ListConfig)
        checked = RolloutConfig(**given)                       # a bad setting fails here, naming the field
        self.loop_settings = {key: getattr(checked, key) for key in LOOP_FIELDS}
        self.response_length = int(self.rollout_config.response_length)

    async def run(self, sampling_params: dict[str, Any], **kwargs) -> AgentLoopOutput:
        """One rollout (or, with ``appo_branch`` in kwargs, one branch) -> verl's ``AgentLoopOutput``:
        prompt_ids, response_ids (model tokens and tool results, at most ``rollout.response_length``),
        response_mask (1 = model token), response_logprobs when verl asks for them."""
        branch = kwargs.get(BRANCH_KEY)
        if branch is None:
            prompt_ids = await self.ct_build_initial_tokens(list(kwargs["raw_prompt"]))
            loop = self._tool_loop(len(prompt_ids) + len(self._prefix_ids()))
            row = loop.new_rows([prompt_ids], [0])[0]
        else:
            loop, row = self._branch_row(branch)
            if branch.get("include_token", False) and row.finish is None:
                await self.loop.run_in_executor(None, self._start_branch, loop, row)
        timing = {"generate_sequences": 0.0, "tool_calls": 0.0}
        turns = 1
        while row.finish is None:
            outcome = await self._turn(loop, row, sampling_params, timing)
            if isinstance(outcome, tuple):
                started = time.perf_counter()
                await self.loop.run_in_executor(None, self._run_call, loop, row, outcome)
                timing["tool_calls"] += time.perf_counter() - started
                turns += 2
        start = row.prompt_length
        calls = [{"tag": c.tag, "query": c.query, "result": c.result, "in_prefix": not c.tag,
                  "call_span": [c.call_span[0] - start, c.call_span[1] - start],
                  "result_span": [c.result_span[0] - start, c.result_span[1] - start]}
                 for c in row.tool_calls]
        want_logprobs = bool(sampling_params.get("logprobs"))
        return AgentLoopOutput(
            prompt_ids=row.tokens[:start], response_ids=row.tokens[start:],
            response_mask=[int(m) for m in row.mask[start:]],
            response_logprobs=[float(v) for v in row.logprobs[start:]] if want_logprobs else None,
            num_turns=turns + 1, metrics={**timing, "num_preempted": -1},
            extra_fields={"appo_agent": self.name, "appo_finish": row.finish, "appo_tool_calls": calls,
                          "appo_graded_text": loop.graded_text_of(row), "turn_scores": [],
                          "tool_rewards": []})

    # ------------------------------------------------------------------------------------------ pieces
    def _prefix_ids(self) -> list[int]:
        prefix = self.loop_settings["response_prefix"]
        return self.tokenizer.encode(prefix, add_special_tokens=False) if prefix else []

    def _tool_loop(self, start_length: int) -> ToolLoop:
        """A ToolLoop for one row whose budget is ``rollout.response_length`` tokens after
        ``start_length``."""
        config = RolloutConfig(max_total_tokens=start_length + self.response_length, **self.loop_settings)
        return ToolLoop(self.tokenizer, self.tools, config, "cpu")

    def _branch_row(self, branch: dict) -> tuple[ToolLoop, Row]:
        """The row of a branch: the parent's prompt + shared response prefix, its completed tool calls (the
        runs of response_mask 0: tool results) counted, the turn resumed after the last of them."""
        prompt, response = [int(t) for t in branch["prompt_ids"]], [int(t) for t in branch["response_ids"]]
        mask = [bool(m) for m in branch["response_mask"]]
        if not prompt or len(mask) != len(response):
            raise ValueError(f"{BRANCH_KEY}: needs a non-empty prompt and one response_mask value per "
                             f"response token (got {len(prompt)} prompt ids, {len(response)} ids, "
                             f"{len(mask)} mask values)")
        loop = self._tool_loop(len(prompt))
        start = len(prompt)
        calls, run_start = [], None
        for i, generated in enumerate(mask + [True]):
            if not generated and run_start is None:
                run_start = i
            elif generated and run_start is not None:
                calls.append(ToolCall("", "", "", (start + run_start, start + run_start),
                                      (start + run_start, start + i)))
                run_start = None
        response_start = start - len(self._prefix_ids())
        row = Row(prompt + response, [False] * start + mask, [0.0] * (start + len(response)),
                  [0.0] * (start + len(response)), start, 0, tool_calls=calls,
                  turn_start=max([response_start] + [c.result_span[1] for c in calls]),
                  response_start=response_start)
        if len(row.tokens) >= loop.config.max_total_tokens:
            row.finish = "length"
        return loop, row

    async def _turn(self, loop: ToolLoop, row: Row, sampling_params: dict, timing: dict):
        """One server request for the row's current turn, replayed token by token; returns the tool loop's
        outcome: None (the server stopped where the tool loop goes on), a finish reason, or a call to run."""
        budget = min(loop.config.max_new_tokens_per_turn - (len(row.tokens) - row.turn_start),
                     loop.config.max_total_tokens - len(row.tokens))
        if budget < 1:
            row.finish = "length"
            return "length"
        params = dict(sampling_params, max_tokens=budget, stop=list(loop.stop_tags))
        if self.rollout_config.name == "sglang":
            params["no_stop_trim"] = True
        else:
            params["include_stop_str_in_output"] = True
        started = time.perf_counter()
        output = await self.server_manager.generate(request_id=uuid4().hex, prompt_ids=list(row.tokens),
                                                    sampling_params=params)
        timing["generate_sequences"] += time.perf_counter() - started
        tokens = list(output.token_ids)
        if not tokens:
            row.finish = "length"
            return "length"
        logprobs = list(output.log_probs) if output.log_probs else [0.0] * len(tokens)
        for token, logprob in zip(tokens, logprobs):
            outcome = loop.add_token(row, int(token), float(logprob))
            if outcome is not None:
                return outcome
        return None

    def _run_call(self, loop: ToolLoop, row: Row, call: tuple) -> None:
        with self._tool_lock:
            loop.run_calls([row], [(0, *call)])

    def _start_branch(self, loop: ToolLoop, row: Row) -> None:
        """A prefix that keeps the chosen token settles what that token decided (it may close a call)."""
        with self._tool_lock:
            loop.start_branches([row], include_token=True)
