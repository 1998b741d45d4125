"""Multi-turn agent rollouts with tools on the transformers backend, and branch continuation for APPO.

One decode loop serves both entry points. Its batch state is a set of LEFT-padded rows that share one
transformers ``DynamicCache``; every forward call feeds only the new tokens of each active row, with explicit
``position_ids`` (the running count of real tokens) and a 2-D attention mask over the cache slots. When a row
closes a tool tag (``</python>``), the calls of all such rows run together (``Tool.run_batch``) and the
``<result>`` blocks are fed on the SAME cache, right-aligned in one block: rows with shorter results get
padding slots, i.e. holes (attention mask 0) inside the cache; rows that only feed their next sampled token in
that step run as a separate forward and get empty masked slots (no compute). Earlier turns are never
prefilled again (unless ``RolloutConfig.reuse_cache=False``, the naive baseline kept for the
benchmark). Finished rows are index-selected out of the cache, so they stop costing compute.

Rows are kept compact on the Python side (no holes), so the final ``RolloutBatch`` is right-padded with
position t == sequence position t, as ``appo.rollout.batch`` requires. Generated ids are recorded as sampled,
never re-tokenised; log-probs follow ``appo.rollout.sampling`` (full softmax(z / temperature), top-p ignored).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from appo.rollout.batch import RolloutBatch, ToolCall
from appo.rollout.sampling import check_sampling_args, sample_tokens
from appo.tools.base import Tool

_TAG_WINDOW = 16  # tokens decoded to detect a closing tag completed by the newest token


@dataclass
class RolloutConfig:
    """Sampling and tool-loop limits.

    temperature / top_p: sampling (log-probs ignore top-p, see ``appo.rollout.sampling``).
    max_new_tokens_per_turn: generated tokens between two tool results before a row ends with "length".
    max_total_tokens: prompt + response (tool results included) per row; reaching it ends the row ("length").
    max_tool_calls: calls a row may make; closing one more ends the row with "tool_limit" (call not run).
    stop_tags: closing tags that end a turn: the tag of a tool in ``tools`` runs it, ``</answer>`` ends the
        rollout ("answer"), any other (a tool that is not available) ends it with "error". EOS always stops.
        A closing tool tag with no opening tag in the turn also ends the row with "error".
    result_template: how a tool's output is appended (tokens masked 0); must contain "{result}".
    seed: seeds the engine's torch.Generator (None: nondeterministic).
    reuse_cache: False re-prefills every row's whole history after each tool turn (baseline for benchmarks).
    response_prefix: text appended to every prompt as the start of the response (e.g. "<python>" to make a
        small model open a tool call). Its tokens are prompt tokens (mask 0, counted in prompt_lengths) but
        belong to the first turn (a call it opens is found) and to ``texts``. Branching a batch assumes it
        was generated with the same prefix.
    max_batch_rows: rows decoded together at most (None: all at once). More rows are generated in
        consecutive chunks of this size, bounding the KV cache and activation memory; the output is the same
        bundle (row order kept). Branching from a gathered cache decodes all its rows together.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens_per_turn: int = 256
    max_total_tokens: int = 1024
    max_tool_calls: int = 3
    stop_tags: tuple[str, ...] = ("</python>", "</search>", "</answer>")
    result_template: str = "<result>\n{result}\n</result>\n"
    seed: int | None = 0
    reuse_cache: bool = True
    response_prefix: str = ""
    max_batch_rows: int | None = None

    def validate(self) -> None:
        """Raise ValueError naming the first field out of range."""
        check_sampling_args(self.temperature, self.top_p)
        for name in ("max_new_tokens_per_turn", "max_total_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_tool_calls < 0:
            raise ValueError(f"max_tool_calls: must be >= 0, got {self.max_tool_calls}")
        if self.max_batch_rows is not None and self.max_batch_rows < 1:
            raise ValueError(f"max_batch_rows: must be >= 1 or None, got {self.max_batch_rows}")
        if "{result}" not in self.result_template:
            raise ValueError("result_template: must contain '{result}'")


@dataclass
class RolloutStats:
    """Counters of the work done by the model (cumulative over calls; ``reset()`` to zero them).

    forward_tokens: real tokens fed through the model (prompts/prefixes, generated tokens, tool results);
    padded_tokens: padding slots fed alongside them; prefill_tokens: the part of forward_tokens that came from
    prompts, branch prefixes and (reuse_cache=False) re-prefills; result_tokens: tool-result tokens fed on the
    cache; generated_tokens: tokens sampled; decode_steps: forward calls (a split tool step makes two);
    tool_calls: tool calls run.
    """

    forward_tokens: int = 0
    padded_tokens: int = 0
    prefill_tokens: int = 0
    result_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    tool_calls: int = 0

    def reset(self) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, 0)


@dataclass
class _Row:
    """One rollout being generated, compact (no holes): the sequence, its mask and its log-probs."""

    tokens: list[int]
    mask: list[bool]
    logprobs: list[float]
    prompt_length: int
    group_id: int
    parent: int = -1
    branch_pos: int = -1
    tool_calls: list[ToolCall] = field(default_factory=list)
    turn_start: int = 0  # first token of the current model turn (after the prompt or the last result)
    response_start: int = 0  # first token of the response text (the prompt minus the response prefix)
    finish: str | None = None


@dataclass
class _DecodeState:
    """Rows in the cache (slot s holds row ``rows[s]``) and the block of tokens to feed next."""

    rows: list[int]
    cache: object  # transformers DynamicCache
    attention: torch.Tensor  # int64 [A, S]: 1 on the cache slots holding real tokens
    next_pos: torch.Tensor  # int64 [A]: position id of each row's next real token
    pending_ids: torch.Tensor  # int64 [A, W], right-aligned, left-padded
    pending_mask: torch.Tensor  # int64 [A, W]
    prefill: bool = True  # the pending block is a prompt/prefix prefill (for the counters)


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to ``(ids int64 [B, P], mask int64 [B, P])`` (P = longest list)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        if seq:
            ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


class RolloutEngine:
    """Generate tool-using rollouts with a transformers causal LM.

    model: a transformers ``*ForCausalLM`` (any dtype; logits are upcast to fp32 for sampling).
    tokenizer: needs ``encode(text, add_special_tokens=False)``, ``decode(ids, skip_special_tokens=...,
        clean_up_tokenization_spaces=False)``, ``eos_token_id`` and ``pad_token_id``.
    tools: ``{tag: Tool}`` (e.g. ``appo.tools.make_tools(["python"])``).
    """

    def __init__(self, model, tokenizer, tools: dict[str, Tool] | None = None,
                 config: RolloutConfig | None = None):
        self.model, self.tokenizer = model, tokenizer
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
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(device=self.device)
        if self.config.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(self.config.seed)
        self.prefix_ids = tokenizer.encode(self.config.response_prefix, add_special_tokens=False) \
            if self.config.response_prefix else []
        self.stats = RolloutStats()

    # ------------------------------------------------------------------ public entry points
    def generate(self, prompts: list[list[int]], group_ids: list[int], score=None) -> RolloutBatch:
        """Sample one rollout per prompt (repeat a prompt N times for N rollouts of it).

        prompts: R lists of token ids (non-empty, shorter than ``max_total_tokens``); group_ids: R ints.
        score: optional ``score(group_id, response_text) -> (reward, correct)``; without it rewards and
            correct are 0.
        Returns a right-padded RolloutBatch with parent = branch_pos = -1.
        """
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
            rows.append(_Row(full, [False] * len(full), [0.0] * len(full), len(full), int(group),
                             turn_start=len(prompt), response_start=len(prompt)))
        with torch.inference_mode():
            for chunk in self._chunks(len(rows)):
                self._decode(rows, self._prefill_state(rows, chunk))
        return self._to_batch(rows, score)

    def continue_branches(self, batch: RolloutBatch, src: torch.Tensor, pos: torch.Tensor, *,
                          past_key_values=None, include_token: bool = False, score=None) -> RolloutBatch:
        """Branch K rollouts: row k keeps row ``src[k]`` of ``batch`` up to token ``pos[k]``, then re-samples.

        src, pos: int [K]; ``pos[k]`` must be a generated token of row ``src[k]`` (``batch.mask[src, pos]``).
        The prefix is ``tokens[src, :pos]`` (``:pos + 1`` with include_token, the authors' variant); its mask,
        old log-probs and completed tool calls are copied from the source row, and those calls count toward
        ``max_tool_calls``. The same tool loop then runs to the end.
        past_key_values: optional gathered cache (``appo.prefix_cache.gather_prefix_kv``): per layer the
            keys/values of every prefix token except the last, left-padded to P - 1 (P = longest prefix). With
            it, no prefix token is prefilled: decoding starts by feeding each prefix's last token. Without it,
            the prefixes are prefilled (fallback). The cache is consumed: the engine extends it in place.
        Returns a RolloutBatch of K rows with parent = src and branch_pos = pos.
        """
        src, pos = self._check_branch_args(batch, src, pos)
        keep = pos + int(include_token)
        rows = []
        for s, p, k in zip(src.tolist(), pos.tolist(), keep.tolist()):
            source_calls = batch.tool_calls[s] if batch.tool_calls else []
            calls = [replace(c) for c in source_calls if c.result_span[1] <= k]
            prompt_length = int(batch.prompt_lengths[s])
            response_start = prompt_length - len(self.prefix_ids)
            rows.append(_Row(batch.tokens[s, :k].tolist(), batch.mask[s, :k].tolist(),
                             batch.old_logprobs[s, :k].tolist(), prompt_length, int(batch.group_ids[s]),
                             parent=s, branch_pos=p, tool_calls=calls,
                             turn_start=max([response_start] + [c.result_span[1] for c in calls]),
                             response_start=response_start))
        with torch.inference_mode():
            if past_key_values is None:
                for chunk in self._chunks(len(rows)):
                    self._decode(rows, self._prefill_state(rows, chunk))
            else:
                self._decode(rows, self._cached_state(rows, batch, src, pos, past_key_values, include_token))
        return self._to_batch(rows, score)

    def _chunks(self, n: int) -> list[range]:
        """Row index ranges decoded together (``max_batch_rows`` at a time)."""
        size = self.config.max_batch_rows or n
        return [range(i, min(i + size, n)) for i in range(0, n, size)]

    # ------------------------------------------------------------------ the decode loop
    def _decode(self, rows: list[_Row], state: _DecodeState) -> None:
        """Run forward / sample / tools until every row in ``state`` has finished (rows are edited in place).

        The model runs in eval mode; its training flag is restored afterwards."""
        was_training = self.model.training
        self.model.eval()
        try:
            self._decode_loop(rows, state)
        finally:
            self.model.train(was_training)

    def _decode_loop(self, rows: list[_Row], state: _DecodeState) -> None:
        while state.rows:
            logits = self._forward(state)
            tokens, logprobs = sample_tokens(logits, temperature=self.config.temperature,
                                             top_p=self.config.top_p, generator=self.generator)
            self.stats.generated_tokens += len(state.rows)
            blocks: dict[int, list[int]] = {}
            calls: list[tuple[int, str, str, int]] = []  # (slot, tag, query, call start)
            for slot, (r, token, logprob) in enumerate(zip(state.rows, tokens.tolist(), logprobs.tolist())):
                row = rows[r]
                row.tokens.append(token)
                row.mask.append(True)
                row.logprobs.append(logprob)
                outcome = self._after_token(row)
                if isinstance(outcome, tuple):
                    calls.append((slot, *outcome))
                elif outcome is None:
                    blocks[slot] = [token]
                else:
                    row.finish = outcome
            had_results = self._run_tools(rows, state, calls, blocks)
            keep = sorted(blocks)
            if had_results and not self.config.reuse_cache:
                if not keep:
                    return
                state = self._prefill_state(rows, [state.rows[s] for s in keep])
            else:
                self._advance(state, keep, [blocks[s] for s in keep])

    def _forward(self, state: _DecodeState) -> torch.Tensor:
        """Feed the pending blocks on the cache; return fp32 logits [A, V] at each row's last fed token.

        A tool step mixes rows that feed a result block (width W) with rows that feed one sampled token. Fed
        together, the latter would cost W - 1 padding slots each; instead the two groups run as separate
        forwards on their own slices of the cache, and the single-token rows get W - 1 empty, masked slots
        (zeros in the cache: holes, no compute)."""
        widths = state.pending_mask.sum(dim=1)
        single = widths == 1
        if state.prefill or bool(single.all()) or not bool(single.any()):
            logits = self._model_step(state.cache, state.attention, state.pending_ids, state.pending_mask,
                                      state.next_pos, state.prefill)
            state.attention = torch.cat([state.attention, state.pending_mask], dim=1)
        else:
            logits = self._forward_split(state, single)
        state.next_pos = state.next_pos + widths
        return logits

    def _forward_split(self, state: _DecodeState, single: torch.Tensor) -> torch.Tensor:
        """Run the block rows and the single-token rows apart, then merge their caches (holes for the latter)."""
        from transformers import DynamicCache

        width = state.pending_ids.shape[1]
        hole = torch.zeros_like(state.pending_mask)
        hole[:, 0] = 1  # single-token rows: the token first, then width - 1 empty slots
        new_mask = torch.where(single[:, None], hole, state.pending_mask)
        parts = []
        for rows, w in ((single.nonzero().flatten(), 1), ((~single).nonzero().flatten(), width)):
            cache = DynamicCache([(layer.keys[rows], layer.values[rows]) for layer in state.cache.layers])
            logits = self._model_step(cache, state.attention[rows], state.pending_ids[rows, -w:],
                                      state.pending_mask[rows, -w:], state.next_pos[rows], False)
            parts.append((rows, cache, logits))
        logits = parts[0][2].new_empty(len(single), parts[0][2].shape[1])
        for rows, _, part in parts:
            logits[rows] = part
        for i, layer in enumerate(state.cache.layers):
            for name in ("keys", "values"):
                old = getattr(layer, name)
                merged = old.new_zeros(*old.shape[:2], old.shape[2] + width, old.shape[3])
                for rows, cache, _ in parts:
                    new = getattr(cache.layers[i], name)
                    merged[rows, :, : new.shape[2]] = new
                setattr(layer, name, merged)
        state.attention = torch.cat([state.attention, new_mask], dim=1)
        return logits

    def _model_step(self, cache, attention, ids, block_mask, next_pos, prefill: bool) -> torch.Tensor:
        """One forward of ``ids`` [A, W] (left-padded blocks) on ``cache`` -> fp32 last-token logits [A, V]."""
        positions = (next_pos[:, None] + block_mask.cumsum(dim=1) - 1).clamp_min(0)
        out = self.model(input_ids=ids, attention_mask=torch.cat([attention, block_mask], dim=1),
                         position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
        real = int(block_mask.sum())
        self.stats.forward_tokens += real
        self.stats.padded_tokens += block_mask.numel() - real
        self.stats.decode_steps += 1
        if prefill:
            self.stats.prefill_tokens += real
        return out.logits[:, -1].float()

    def _advance(self, state: _DecodeState, keep: list[int], blocks: list[list[int]]) -> None:
        """Drop finished slots from the cache, trim common left padding, right-align the next blocks."""
        if len(keep) < len(state.rows):
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            state.cache.batch_select_indices(index)
            state.attention, state.next_pos = state.attention[index], state.next_pos[index]
            state.rows = [state.rows[s] for s in keep]
        if not keep:
            return
        used = state.attention.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else state.attention.shape[1]
        if first > 0:  # slots that are padding in every remaining row: cut them out of the cache
            for layer in state.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            state.attention = state.attention[:, first:]
        state.pending_ids, state.pending_mask = left_pad(blocks, self.pad_id, self.device)
        state.prefill = False

    def _prefill_state(self, rows: list[_Row], which) -> _DecodeState:
        """A fresh state whose first forward prefills the whole current sequence of rows ``which``."""
        from transformers import DynamicCache

        which = list(which)
        ids, mask = left_pad([rows[r].tokens for r in which], self.pad_id, self.device)
        empty = torch.zeros((len(which), 0), dtype=torch.long, device=self.device)
        return _DecodeState(which, DynamicCache(config=self.model.config), empty,
                            torch.zeros(len(which), dtype=torch.long, device=self.device), ids, mask)

    def _cached_state(self, rows, batch, src, pos, cache, include_token) -> _DecodeState:
        """State over a gathered prefix cache: the first forward feeds only each prefix's last token."""
        ids, mask, positions = self._branch_inputs(batch, src, pos, include_token)
        width = ids.shape[1] - 1
        if cache.get_seq_length() != width or cache.layers[0].keys.shape[0] != len(rows):
            raise ValueError(f"past_key_values: expected {len(rows)} rows of {width} cached tokens (longest "
                             f"prefix minus one), got {tuple(cache.layers[0].keys.shape)}")
        return _DecodeState(list(range(len(rows))), cache, mask[:, :-1], positions[:, -1], ids[:, -1:],
                            mask[:, -1:], prefill=False)

    def _branch_inputs(self, batch, src, pos, include_token):
        """Left-padded prefixes (ids, mask, position_ids) by ``appo.prefix_cache.build_branch_batch``."""
        from appo.prefix_cache import build_branch_batch

        device = batch.tokens.device
        branch = build_branch_batch(batch.tokens, batch.lengths, src.to(device), pos.to(device),
                                    pad_id=batch.pad_id, include_token=include_token)
        return (branch.input_ids.to(self.device), branch.attention_mask.long().to(self.device),
                branch.position_ids.to(self.device))

    # ------------------------------------------------------------------ per-token logic and tools
    def _after_token(self, row: _Row):
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

    def _completed_stop_tag(self, row: _Row) -> str | None:
        """The stop tag that the newest token completes, if any (decodes a short tail of the turn only)."""
        window = row.tokens[max(row.turn_start, len(row.tokens) - _TAG_WINDOW):]
        now, before = self._decode_text(window), self._decode_text(window[:-1])
        done = [t for t in self.stop_tags if now.count(t) > before.count(t)]
        return max(done, key=now.rfind) if done else None

    def _locate_call(self, row: _Row, tag: str) -> tuple[str, int] | None:
        """(query, index of the token holding "<tag>") of the call the turn just closed; None if unopened."""
        start = row.turn_start
        text = self._decode_text(row.tokens[start:])
        opening, closing = f"<{tag}>", f"</{tag}>"
        end = text.rfind(closing)
        begin = text.rfind(opening, 0, end)
        if begin < 0:
            return None
        call_text = text[begin:end]
        lo, hi = start, len(row.tokens) - 1  # largest token index whose suffix still holds the call
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if call_text in self._decode_text(row.tokens[mid:]):
                lo = mid
            else:
                hi = mid - 1
        return text[begin + len(opening):end], lo

    def _run_tools(self, rows, state, calls, blocks) -> bool:
        """Run the calls grouped by tool, append the result blocks to the rows; True if any was appended."""
        appended = False
        for tag in dict.fromkeys(c[1] for c in calls):
            group = [c for c in calls if c[1] == tag]
            results = self.tools[tag].run_batch([query for _, _, query, _ in group])
            self.stats.tool_calls += len(group)
            for (slot, _, query, call_start), result in zip(group, results):
                row = rows[state.rows[slot]]
                ids = self.tokenizer.encode(self.config.result_template.format(result=result),
                                            add_special_tokens=False)
                if len(row.tokens) + len(ids) >= self.config.max_total_tokens:
                    row.finish = "length"
                    continue
                start = len(row.tokens)
                spans = (call_start, start), (start, start + len(ids))
                row.tool_calls.append(ToolCall(tag, query, result, *spans))
                row.tokens += ids
                row.mask += [False] * len(ids)
                row.logprobs += [0.0] * len(ids)
                row.turn_start = len(row.tokens)
                blocks[slot] = [row.tokens[start - 1]] + ids  # the closing-tag token, then the result
                self.stats.result_tokens += len(ids)
                appended = True
        return appended

    # ------------------------------------------------------------------ output
    def _decode_text(self, ids: list[int], skip_special: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)

    def _to_batch(self, rows: list[_Row], score) -> RolloutBatch:
        """Right-pad the compact rows into a RolloutBatch; decode texts, extract answers, score."""
        from appo.tasks.parsing import extract_answer

        width = max(len(r.tokens) for r in rows)
        n = len(rows)
        tokens = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.bool)
        old_logprobs = torch.zeros((n, width), dtype=torch.float32)
        for i, row in enumerate(rows):
            tokens[i, :len(row.tokens)] = torch.tensor(row.tokens)
            mask[i, :len(row.tokens)] = torch.tensor(row.mask)
            old_logprobs[i, :len(row.tokens)] = torch.tensor(row.logprobs)
        texts = [self._decode_text(r.tokens[r.response_start:], skip_special=True) for r in rows]
        scored = [score(r.group_id, t) if score is not None else (0.0, 0.0) for r, t in zip(rows, texts)]

        def column(values, dtype):
            return torch.tensor(values, dtype=dtype).to(self.device)

        return RolloutBatch(
            tokens=tokens.to(self.device), mask=mask.to(self.device),
            old_logprobs=old_logprobs.to(self.device),
            lengths=column([len(r.tokens) for r in rows], torch.long),
            prompt_lengths=column([r.prompt_length for r in rows], torch.long),
            group_ids=column([r.group_id for r in rows], torch.long),
            rewards=column([float(s[0]) for s in scored], torch.float32),
            parent=column([r.parent for r in rows], torch.long),
            branch_pos=column([r.branch_pos for r in rows], torch.long),
            pad_id=self.pad_id, tool_calls=[r.tool_calls for r in rows],
            answers=[extract_answer(t) for t in texts], finish_reasons=[r.finish for r in rows],
            texts=texts, correct=[float(s[1]) for s in scored])

    def _check_branch_args(self, batch: RolloutBatch, src, pos) -> tuple[torch.Tensor, torch.Tensor]:
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
