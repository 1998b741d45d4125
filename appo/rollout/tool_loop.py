"""The backend-independent half of a rollout engine: rows, the tool loop's decisions, tool calls, the bundle.

A backend (``appo.rollout.engine`` for transformers, ``appo.rollout.vllm`` for vLLM) samples tokens; after each
sampled token it asks ``after_token`` what happens next: continue, finish (answer, EOS, length, tool limit,
error) or run a tool call. ``run_calls`` runs the calls of a step grouped by tool and appends each result as
masked tokens; ``to_batch`` turns the finished rows into the ``RolloutBatch`` bundle. Both backends therefore
share every decision about tags, limits, masks and spans, and differ only in how tokens are produced.

Two functions here are the reward path's guard for every backend (the TRL and verl integrations call them
too): ``encode_plain`` turns a tool's output into tokens that are plain text (a special-token string in the
output stays text, so a tool never puts a chat-role or control token into a rollout's context), and
``graded_text`` builds the text a reward reads from the model's own tokens only, each tool result an empty
block. Closing tags follow ``appo.tasks.parsing``'s one rule (``closing_tag_counts``): a ``</python>``
inside a string literal of the code is code, while decoding as in grading.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from itertools import pairwise

import torch

from appo.rollout.batch import RolloutBatch, ToolCall
from appo.rollout.config import RolloutConfig
from appo.tasks.parsing import closing_tag_counts, escape_tool_output, extract_answer, tool_call_span
from appo.tools.base import Tool

_TAG_WINDOW = 16  # tokens decoded to detect a closing tag completed by the newest token
RESULT_BLOCK = "<result></result>"  # what the graded text holds in place of each tool result


def special_token_ids(tokenizer) -> frozenset[int]:
    """Every id a tool's output must never become: the tokenizer's special tokens (``all_special_ids``), every
    added token (``added_tokens_decoder``: chat-role, control and reserved tokens) and its eos / bos / pad."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or ())
    ids.update(getattr(tokenizer, "added_tokens_decoder", None) or {})
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            ids.add(value)
    return frozenset(int(i) for i in ids)


def _special_strings(tokenizer) -> list[str]:
    """The texts of the tokens in ``special_token_ids`` (longest first)."""
    strings = set(getattr(tokenizer, "all_special_tokens", None) or ())
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        strings.add(str(getattr(token, "content", token)))
    return sorted((s for s in strings if s), key=len, reverse=True)


def _encode(tokenizer, text: str) -> list[int]:
    """Ids of ``text`` with no special tokens added, special-token strings split where the tokenizer can."""
    if not text:
        return []
    try:
        return [int(i) for i in tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)]
    except TypeError:  # a tokenizer without the option (the tests' character tokenizer)
        return [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]


def encode_plain(tokenizer, text: str) -> list[int]:
    """Token ids (list[int]) of ``text`` as plain text: no id is in ``special_token_ids(tokenizer)``.

    For tool output, which is hostile: a string such as ``<|im_start|>`` or ``<|endoftext|>`` in it stays
    ordinary text, never the special token. The text is encoded with ``split_special_tokens=True`` where the
    tokenizer has it; if a special id still comes out (an added token that is not special, a tokenizer without
    the option), the text is encoded in pieces cut inside every special-token string, and as a last resort
    character by character (a character that alone is a special token becomes U+FFFD, or is dropped where the
    vocabulary has no plain U+FFFD). Only the fallbacks can tokenize differently from the plain encoding (a
    sentencepiece tokenizer may add a space per piece)."""
    if not isinstance(text, str):
        raise ValueError(f"text: expected a string, got {type(text).__name__}")
    forbidden = special_token_ids(tokenizer)
    ids = _encode(tokenizer, text)
    if forbidden.isdisjoint(ids):
        return ids
    cuts = {0, len(text)}
    for special in _special_strings(tokenizer):
        at = text.find(special)
        while at >= 0:
            cuts.add(at + 1)
            at = text.find(special, at + 1)
    bounds = sorted(cuts)
    ids = [i for a, b in pairwise(bounds) for i in _encode(tokenizer, text[a:b])]
    if forbidden.isdisjoint(ids):
        return ids
    ids, replacement = [], None
    for character in text:
        piece = _encode(tokenizer, character)
        if not forbidden.isdisjoint(piece):
            if replacement is None:
                replacement = _plain_replacement(tokenizer, forbidden)
            piece = replacement
        ids += piece
    return ids


def _plain_replacement(tokenizer, forbidden: frozenset[int]) -> list[int]:
    """Ids of U+FFFD if the tokenizer spells it without a special id, else [] (the character is dropped)."""
    try:
        ids = _encode(tokenizer, "\N{REPLACEMENT CHARACTER}")
    except (KeyError, ValueError):  # a vocabulary without it
        return []
    return ids if forbidden.isdisjoint(ids) else []


def graded_text(tokenizer, ids, model_mask, prefix_length: int = 0) -> str:
    """The text a reward grades: what the model generated, with each tool result an empty block.

    ids: the response's token ids (a list or a 1-D tensor: everything after the prompt, padding excluded);
    model_mask: bool per id, True where the model generated it; prefix_length: leading ids that are a response
    prefix the trainer wrote (``RolloutConfig.response_prefix``, mask False), decoded as text. After the
    prefix, each run of generated ids is decoded (special tokens skipped) and each run of other ids (a tool's
    result block, as the backend appended it) becomes ``RESULT_BLOCK``: tool output is never decoded into the
    graded text, so it cannot give credit or write a tag there, whatever its tokens decode to. Every backend
    grades this text (``appo.rollout``'s engines, the TRL and verl integrations)."""
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    mask = model_mask.tolist() if hasattr(model_mask, "tolist") else list(model_mask)
    if len(mask) != len(ids):
        raise ValueError(f"model_mask: expected {len(ids)} entries like ids, got {len(mask)}")
    if not 0 <= prefix_length <= len(ids) or any(mask[:prefix_length]):
        raise ValueError(f"prefix_length: must count leading ids the model did not generate (0 to "
                         f"{len(ids)}), got {prefix_length}")

    def decode(part: list[int]) -> str:
        return tokenizer.decode(part, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    pieces = [decode(ids[:prefix_length])] if prefix_length else []
    start = prefix_length
    while start < len(ids):
        end = start
        while end < len(ids) and bool(mask[end]) == bool(mask[start]):
            end += 1
        pieces.append(decode(ids[start:end]) if mask[start] else RESULT_BLOCK)
        start = end
    return "".join(pieces)


@dataclass
class RolloutStats:
    """Counters of the work done by the model (cumulative over calls; ``reset()`` to zero them).

    forward_tokens: real tokens fed through the model (prompts/prefixes, generated tokens, tool results);
    padded_tokens: padding slots fed alongside them; prefill_tokens: the part of forward_tokens that came from
    prompts, branch prefixes and (reuse_cache=False) re-prefills; result_tokens: tool-result tokens fed on the
    cache; generated_tokens: tokens sampled; decode_steps: forward calls (a split tool step makes two);
    tool_calls: tool calls run.
    vLLM backend only: requests (one per row per turn), request_prompt_tokens (their prompt tokens) and
    cached_prompt_tokens (the part vLLM's prefix cache served; the rest is prefill_tokens).
    """

    forward_tokens: int = 0
    padded_tokens: int = 0
    prefill_tokens: int = 0
    result_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    tool_calls: int = 0
    requests: int = 0
    request_prompt_tokens: int = 0
    cached_prompt_tokens: int = 0

    def reset(self) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, 0)


@dataclass
class Row:
    """One rollout being generated, compact (no holes): the sequence, its mask and its log-probs."""

    tokens: list[int]
    mask: list[bool]
    logprobs: list[float]  # behaviour log-probs: the engine's, of the distribution it sampled from
    entropy: list[float]  # that distribution's full-vocabulary entropy (0.0 off the mask or when unknown)
    prompt_length: int
    group_id: int
    parent: int = -1
    branch_pos: int = -1
    tool_calls: list[ToolCall] = field(default_factory=list)
    turn_start: int = 0  # first token of the current model turn (after the prompt or the last result)
    response_start: int = 0  # first token of the response text (the prompt minus the response prefix)
    finish: str | None = None


class ToolLoop:
    """State and decisions shared by the rollout backends (not used directly).

    tokenizer: needs ``encode(text, add_special_tokens=False)``, ``decode(ids, skip_special_tokens=...,
        clean_up_tokenization_spaces=False)``, ``eos_token_id`` and ``pad_token_id``.
    tools: ``{tag: Tool}`` (e.g. ``appo.tools.make_tools(["python"])``).
    device: where the output bundle's tensors live.
    records_entropy: whether the backend sees each step's whole distribution (``add_token`` gets its entropy);
        when False the bundle's ``entropy`` is None.
    """

    records_entropy = True

    def __init__(self, tokenizer, tools: dict[str, Tool] | None, config: RolloutConfig | None, device):
        self.tokenizer = tokenizer
        self.tools = dict(tools or {})
        self.config = config or RolloutConfig()
        self.config.validate()
        for tag, tool in self.tools.items():
            if not isinstance(tool, Tool):
                raise ValueError(f"tools: value for tag {tag!r} is not an appo.tools.base.Tool")
        self.stop_tags = tuple(dict.fromkeys([*self.config.stop_tags, *(f"</{t}>" for t in self.tools)]))
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer: needs an eos_token_id")
        self.eos_id = int(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_id)
        self.device = device
        self.prefix_ids = tokenizer.encode(self.config.response_prefix, add_special_tokens=False) \
            if self.config.response_prefix else []
        marker = "\x00result\x00"  # where the tool output goes between the template's own pieces
        self.template_ids = [tokenizer.encode(piece, add_special_tokens=False) if piece else []
                             for piece in self.config.result_template.format(result=marker).split(marker)]
        self.stats = RolloutStats()

    # ------------------------------------------------------------------ rows
    def new_rows(self, prompts: list[list[int]], group_ids: list[int]) -> list[Row]:
        """One row per prompt (+ the response prefix); raises ValueError on bad prompts or group ids."""
        if len(prompts) == 0:
            raise ValueError("prompts: need at least one prompt")
        if len(group_ids) != len(prompts):
            raise ValueError(f"group_ids: expected {len(prompts)} entries, got {len(group_ids)}")
        rows = []
        for i, (prompt, group) in enumerate(zip(prompts, group_ids)):
            full = [int(t) for t in prompt] + self.prefix_ids
            if not prompt or len(full) >= self.config.max_total_tokens:
                raise ValueError(f"prompts: prompt {i} has {len(prompt)} tokens (+{len(self.prefix_ids)} of "
                                 f"response_prefix); need 1 to max_total_tokens - 1 = "
                                 f"{self.config.max_total_tokens - 1} in all")
            zeros = [0.0] * len(full)
            rows.append(Row(full, [False] * len(full), zeros, list(zeros), len(full), int(group),
                            turn_start=len(prompt), response_start=len(prompt)))
        return rows

    def branch_rows(self, batch: RolloutBatch, src: torch.Tensor, pos: torch.Tensor,
                    include_token: bool) -> list[Row]:
        """Rows that copy ``tokens[src, :pos]`` (``:pos + 1`` with include_token) with their mask, old log-probs
        and the tool calls completed inside the prefix (they count toward ``max_tool_calls``)."""
        keep = pos + int(include_token)
        rows = []
        for s, p, k in zip(src.tolist(), pos.tolist(), keep.tolist()):
            source_calls = batch.tool_calls[s] if batch.tool_calls else []
            calls = [replace(c) for c in source_calls if c.result_span[1] <= k]
            prompt_length = int(batch.prompt_lengths[s])
            response_start = prompt_length - len(self.prefix_ids)
            entropy = batch.entropy[s, :k].tolist() if batch.entropy is not None else [0.0] * k
            rows.append(Row(batch.tokens[s, :k].tolist(), batch.mask[s, :k].tolist(),
                            batch.behaviour_logprobs[s, :k].tolist(), entropy, prompt_length,
                            int(batch.group_ids[s]),
                            parent=s, branch_pos=p, tool_calls=calls,
                            turn_start=max([response_start] + [c.result_span[1] for c in calls]),
                            response_start=response_start))
        return rows

    def start_branches(self, rows: list[Row], include_token: bool) -> dict[int, int]:
        """Settle what the kept token of each branch prefix decided (``include_token`` only).

        A prefix that keeps the chosen token ends with a generated token that may itself end a turn: close a
        tool call, ``</answer>``, be EOS or reach a limit. ``add_token`` took that decision when the parent
        sampled the token; the branch takes it again here, before decoding: a closed call runs (its result is
        appended, as for the parent), a finish reason finishes the row. Returns ``{row index: index of its
        first result token}`` for the rows whose kept token closed a call (as ``run_calls`` does)."""
        if not include_token:
            return {}
        calls = []
        for r, row in enumerate(rows):
            outcome = self._after_token(row)
            if isinstance(outcome, tuple):
                calls.append((r, *outcome))
            elif isinstance(outcome, str):
                row.finish = outcome
        return self.run_calls(rows, calls)

    def add_token(self, row: Row, token: int, logprob: float, entropy: float = 0.0):
        """Append a sampled token with its behaviour log-prob (and its distribution's entropy); return what
        follows: None (continue), a finish reason, or a tool call ``(tag, query, call_start)``. A finish reason
        is also stored in ``row.finish``."""
        row.tokens.append(token)
        row.mask.append(True)
        row.logprobs.append(logprob)
        row.entropy.append(entropy)
        self.stats.generated_tokens += 1
        outcome = self._after_token(row)
        if isinstance(outcome, str):
            row.finish = outcome
        return outcome

    # ------------------------------------------------------------------ per-token logic and tools
    def _after_token(self, row: Row):
        """None to continue, a finish reason, or ``(tag, query, call_start)`` for a tool call to run."""
        if row.tokens[-1] == self.eos_id:
            return "eos"
        tag = self._completed_stop_tag(row)
        if tag is not None:
            name = tag[2:-1]
            if name == "answer":
                return "answer"
            if name not in self.tools:
                return "error"
            if len(row.tool_calls) >= self.config.max_tool_calls:
                return "tool_limit"
            call = self._locate_call(row, name)
            return "error" if call is None else (name, *call)
        if len(row.tokens) >= self.config.max_total_tokens:
            return "length"
        if len(row.tokens) - row.turn_start >= self.config.max_new_tokens_per_turn:
            return "length"
        return None

    def _completed_stop_tag(self, row: Row) -> str | None:
        """The stop tag that the newest token completes and that counts, if any. A short tail of the turn is
        decoded to see whether a tag was completed; only then is the whole turn read, for the closing-tag rule
        (``appo.tasks.parsing.closing_tag_counts``: a tag in a string or comment of python code is code)."""
        window = row.tokens[max(row.turn_start, len(row.tokens) - _TAG_WINDOW):]
        now, before = self._decode_text(window), self._decode_text(window[:-1])
        done = [t for t in self.stop_tags if now.count(t) > before.count(t)]
        if not done:
            return None
        text = self._decode_text(row.tokens[row.turn_start:])
        counted = [t for t in done if closing_tag_counts(text, text.rfind(t))]
        return max(counted, key=text.rfind) if counted else None

    def _locate_call(self, row: Row, tag: str) -> tuple[str, int] | None:
        """(query, index of the token holding "<tag>") of the call the turn just closed, found by the parser
        (``appo.tasks.parsing.tool_call_span``); None if it has no opening tag."""
        start = row.turn_start
        text = self._decode_text(row.tokens[start:])
        span = tool_call_span(text, (tag,))
        if span is None or span[2] != text.rfind(f"</{tag}>"):
            return None
        begin, end = span[1] - len(f"<{tag}>"), span[2]
        call_text = text[begin:end]
        lo, hi = start, len(row.tokens) - 1  # largest token index whose suffix still holds the call
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if call_text in self._decode_text(row.tokens[mid:]):
                lo = mid
            else:
                hi = mid - 1
        return text[span[1]:end], lo

    def run_calls(self, rows: list[Row], calls: list[tuple[int, str, str, int]]) -> dict[int, int]:
        """Run ``calls`` = [(row index, tag, query, call start)] grouped by tool (``Tool.run_batch``); append
        each result block (mask 0, log-prob 0) to its row. A result that would pass ``max_total_tokens`` ends
        the row with "length" instead. Returns {row index: index of its first result token}.

        Tool output is hostile: it is escaped (``appo.tasks.parsing.escape_tool_output``: it can neither open
        nor close a tag in the text the model reads) and encoded as plain text (``encode_plain``: no special
        token), between the template's own tokens. ``ToolCall.result`` holds the escaped text the model saw;
        the graded text never holds it (``graded_text``)."""
        appended: dict[int, int] = {}
        for tag in dict.fromkeys(c[1] for c in calls):
            group = [c for c in calls if c[1] == tag]
            results = self.tools[tag].run_batch([query for _, _, query, _ in group])
            self.stats.tool_calls += len(group)
            for (r, _, query, call_start), result in zip(group, results):
                row = rows[r]
                if not isinstance(result, str):
                    result = f"Error: the {tag} tool returned {type(result).__name__}, not text"
                result = escape_tool_output(result, tags=self.tools)
                output = encode_plain(self.tokenizer, result)
                ids = list(self.template_ids[0])
                for piece in self.template_ids[1:]:
                    ids += output + piece
                if len(row.tokens) + len(ids) >= self.config.max_total_tokens:
                    row.finish = "length"
                    continue
                start = len(row.tokens)
                spans = (call_start, start), (start, start + len(ids))
                row.tool_calls.append(ToolCall(tag, query, result, *spans))
                row.tokens += ids
                row.mask += [False] * len(ids)
                row.logprobs += [0.0] * len(ids)
                row.entropy += [0.0] * len(ids)
                row.turn_start = len(row.tokens)
                self.stats.result_tokens += len(ids)
                appended[r] = start
        return appended

    # ------------------------------------------------------------------ output
    def _decode_text(self, ids: list[int], skip_special: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)

    def graded_text_of(self, row: Row) -> str:
        """The text a reward grades for ``row`` (``graded_text``: the response prefix, then the model's tokens
        with each tool result an empty block). Backends that build their own output (verl's agent loop) call
        this; ``to_batch`` does for the engines."""
        return graded_text(self.tokenizer, row.tokens[row.response_start:], row.mask[row.response_start:],
                           prefix_length=row.prompt_length - row.response_start)

    def to_batch(self, rows: list[Row], score) -> RolloutBatch:
        """Right-pad the compact rows into a RolloutBatch; build each graded text (``graded_text``: the
        response prefix and the model's tokens, tool results as empty blocks), extract answers, score."""
        width = max(len(r.tokens) for r in rows)
        n = len(rows)
        tokens = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.bool)
        behaviour_logprobs = torch.zeros((n, width), dtype=torch.float32)
        entropy = torch.zeros((n, width), dtype=torch.float32)
        for i, row in enumerate(rows):
            tokens[i, :len(row.tokens)] = torch.tensor(row.tokens)
            mask[i, :len(row.tokens)] = torch.tensor(row.mask)
            behaviour_logprobs[i, :len(row.tokens)] = torch.tensor(row.logprobs)
            entropy[i, :len(row.tokens)] = torch.tensor(row.entropy)
        texts = [self.graded_text_of(r) for r in rows]
        scored = [score(r.group_id, t) if score is not None else (0.0, 0.0) for r, t in zip(rows, texts)]

        def column(values, dtype):
            return torch.tensor(values, dtype=dtype).to(self.device)

        return RolloutBatch(
            tokens=tokens.to(self.device), mask=mask.to(self.device),
            behaviour_logprobs=behaviour_logprobs.to(self.device),
            entropy=entropy.to(self.device) if self.records_entropy else None,
            lengths=column([len(r.tokens) for r in rows], torch.long),
            prompt_lengths=column([r.prompt_length for r in rows], torch.long),
            group_ids=column([r.group_id for r in rows], torch.long),
            rewards=column([float(s[0]) for s in scored], torch.float32),
            parent=column([r.parent for r in rows], torch.long),
            branch_pos=column([r.branch_pos for r in rows], torch.long),
            pad_id=self.pad_id, tool_calls=[r.tool_calls for r in rows],
            answers=[extract_answer(t) for t in texts], finish_reasons=[r.finish for r in rows],
            texts=texts, correct=[float(s[1]) for s in scored])

    def check_branch_args(self, batch: RolloutBatch, src, pos) -> tuple[torch.Tensor, torch.Tensor]:
        src, pos = torch.as_tensor(src).long().cpu(), torch.as_tensor(pos).long().cpu()
        if src.dim() != 1 or src.numel() == 0:
            raise ValueError(f"src: expected a non-empty 1-D tensor, got shape {tuple(src.shape)}")
        if pos.shape != src.shape:
            raise ValueError(f"pos: expected shape {tuple(src.shape)} like src, got {tuple(pos.shape)}")
        if int(src.min()) < 0 or int(src.max()) >= batch.num_rollouts:
            raise ValueError(f"src: row indices must lie in [0, {batch.num_rollouts})")
        if int(pos.min()) < 0 or int(pos.max()) >= batch.tokens.shape[1]:
            raise ValueError(f"pos: positions must lie in [0, {batch.tokens.shape[1]})")
        if not bool(batch.mask.cpu()[src, pos].all()):
            raise ValueError("pos: every branch position must be a generated token (batch.mask[src, pos])")
        return src, pos
