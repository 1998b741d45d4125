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

from dataclasses import dataclass

import torch

from appo.rollout.batch import RolloutBatch
from appo.rollout.sampling import sample_tokens
from appo.rollout.tool_loop import RolloutConfig, RolloutStats, Row, ToolLoop
from appo.tools.base import Tool

__all__ = ["RolloutConfig", "RolloutEngine", "RolloutStats", "left_pad"]


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


class RolloutEngine(ToolLoop):
    """Generate tool-using rollouts with a transformers causal LM.

    model: a transformers ``*ForCausalLM`` (any dtype; logits are upcast to fp32 for sampling).
    tokenizer: needs ``encode(text, add_special_tokens=False)``, ``decode(ids, skip_special_tokens=...,
        clean_up_tokenization_spaces=False)``, ``eos_token_id`` and ``pad_token_id``.
    tools: ``{tag: Tool}`` (e.g. ``appo.tools.make_tools(["python"])``).
    config: the rollout settings (``appo.rollout.config.RolloutConfig``; None: its defaults, the CPU demo's).
    seed: seeds the engine's torch.Generator (None: nondeterministic); appo's trainer passes the run's seed.
    """

    accepts_gathered_cache = True  # continue_branches(past_key_values=gather_prefix_kv(...)) skips the prefill

    def __init__(self, model, tokenizer, tools: dict[str, Tool] | None = None,
                 config: RolloutConfig | None = None, *, seed: int | None = 0):
        self.model = model
        super().__init__(tokenizer, tools, config, next(model.parameters()).device)
        self.generator = torch.Generator(device=self.device)
        self._kept: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] | None = None  # generate_with_cache
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    # ------------------------------------------------------------------ public entry points
    def generate(self, prompts: list[list[int]], group_ids: list[int], score=None) -> RolloutBatch:
        """Sample one rollout per prompt (repeat a prompt N times for N rollouts of it).

        prompts: R lists of token ids (non-empty, shorter than ``max_total_tokens``); group_ids: R ints.
        score: optional ``score(group_id, response_text) -> (reward, correct)``; without it rewards and
            correct are 0.
        Returns a right-padded RolloutBatch with parent = branch_pos = -1.
        """
        rows = self.new_rows(prompts, group_ids)
        with torch.inference_mode():
            for chunk in self._chunks(len(rows)):
                self._decode(rows, self._prefill_state(rows, chunk))
        return self.to_batch(rows, score)

    def generate_with_cache(self, prompts: list[list[int]], group_ids: list[int], score=None):
        """``generate``, plus the KV cache decoding built, kept for branching: ``(batch, cache)``.

        cache: a ``DynamicCache`` of R right-padded rows, per layer [R, H, T, D] (T = the batch's width, the
        model's dtype): row r holds the keys/values of its tokens ``[:lengths[r] - 1]`` at their positions (its
        last token was sampled, never fed), zeros after. That is what a forward over the rollouts would give,
        computed incrementally while decoding, so ``appo.prefix_cache.gather_prefix_kv(cache, src, pos,
        lengths=batch.lengths)`` serves branch prefixes with no forward at all (ARPO's branches use it). It
        costs the memory of every row's cache until the caller drops it.
        """
        from transformers import DynamicCache

        self._kept = {}
        try:
            batch = self.generate(prompts, group_ids, score)
            kept, width = self._kept, batch.tokens.shape[1]
        finally:
            self._kept = None
        layers = []
        for layer in range(len(kept[0])):
            per_row = [kept[r][layer] for r in range(batch.num_rollouts)]
            keys, values = (torch.stack([torch.nn.functional.pad(kv[i], (0, 0, 0, width - kv[i].shape[1]))
                                         for kv in per_row]) for i in (0, 1))
            layers.append((keys, values))
        return batch, DynamicCache(layers)

    def _keep_row_cache(self, r: int, state: _DecodeState, slot: int) -> None:
        """Copy row ``r``'s real cache slots (holes and padding dropped) out of the decode state."""
        slots = state.attention[slot].nonzero().squeeze(1)
        self._kept[r] = [(layer.keys[slot][:, slots], layer.values[slot][:, slots])
                         for layer in state.cache.layers]

    def continue_branches(self, batch: RolloutBatch, src: torch.Tensor, pos: torch.Tensor, *,
                          past_key_values=None, include_token: bool = False, score=None) -> RolloutBatch:
        """Branch K rollouts: row k keeps row ``src[k]`` of ``batch`` up to token ``pos[k]``, then re-samples.

        src, pos: int [K]; ``pos[k]`` must be a generated token of row ``src[k]`` (``batch.mask[src, pos]``).
        The prefix is ``tokens[src, :pos]`` (``:pos + 1`` with include_token, the authors' variant); its mask,
        old log-probs and completed tool calls are copied from the source row, and those calls count toward
        ``max_tool_calls``. The same tool loop then runs to the end. With include_token, a kept token that
        ends a turn is acted on first (``ToolLoop.start_branches``): the call it closes runs, ``</answer>`` or
        EOS finishes the branch with no new token.
        past_key_values: optional gathered cache (``appo.prefix_cache.gather_prefix_kv``): per layer the
            keys/values of every prefix token except the last, left-padded to P - 1 (P = longest prefix). With
            it, no prefix token is prefilled: decoding starts by feeding each prefix's last token. Without it,
            the prefixes are prefilled (fallback). The cache is consumed: the engine extends it in place.
        Returns a RolloutBatch of K rows with parent = src and branch_pos = pos.
        """
        src, pos = self.check_branch_args(batch, src, pos)
        rows = self.branch_rows(batch, src, pos, include_token)
        appended = self.start_branches(rows, include_token)
        live = [r for r, row in enumerate(rows) if row.finish is None]
        with torch.inference_mode():
            if past_key_values is None:
                for chunk in self._chunks(live):
                    self._decode(rows, self._prefill_state(rows, chunk))
            elif live:
                self._decode(rows, self._cached_state(rows, live, appended, batch, src, pos, past_key_values,
                                                      include_token))
        return self.to_batch(rows, score)

    def _chunks(self, rows) -> list[list[int]]:
        """``rows`` (a count or a list of row indices) in groups decoded together (``max_batch_rows`` each)."""
        rows = list(range(rows)) if isinstance(rows, int) else list(rows)
        size = self.config.max_batch_rows or max(len(rows), 1)
        return [rows[i:i + size] for i in range(0, len(rows), size)]

    # ------------------------------------------------------------------ the decode loop
    def _decode(self, rows: list[Row], state: _DecodeState) -> None:
        """Run forward / sample / tools until every row in ``state`` has finished (rows are edited in place).

        The model runs in eval mode; its training flag is restored afterwards."""
        was_training = self.model.training
        self.model.eval()
        try:
            self._decode_loop(rows, state)
        finally:
            self.model.train(was_training)

    def _decode_loop(self, rows: list[Row], state: _DecodeState) -> None:
        while state.rows:
            logits = self._forward(state)
            drawn = sample_tokens(logits, temperature=self.config.temperature, top_p=self.config.top_p,
                                  generator=self.generator)
            blocks: dict[int, list[int]] = {}
            calls: list[tuple[int, str, str, int]] = []  # (row, tag, query, call start)
            for slot, (r, token, logprob, entropy) in enumerate(zip(
                    state.rows, drawn.tokens.tolist(), drawn.logprobs.tolist(), drawn.entropy.tolist())):
                outcome = self.add_token(rows[r], token, logprob, entropy)
                if isinstance(outcome, tuple):
                    calls.append((r, *outcome))
                elif outcome is None:
                    blocks[slot] = [token]
            slot_of = {r: slot for slot, r in enumerate(state.rows)}
            appended = self.run_calls(rows, calls)
            if self._kept is not None:  # a finished row's cache holds every token but its last: keep it
                for slot, r in enumerate(state.rows):
                    if rows[r].finish is not None:
                        self._keep_row_cache(r, state, slot)
            for r, start in appended.items():  # feed the closing-tag token, then the result
                blocks[slot_of[r]] = rows[r].tokens[start - 1:]
            keep = sorted(blocks)
            if appended and not self.config.reuse_cache:
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

    def _prefill_state(self, rows: list[Row], which) -> _DecodeState:
        """A fresh state whose first forward prefills the whole current sequence of rows ``which``."""
        from transformers import DynamicCache

        which = list(which)
        ids, mask = left_pad([rows[r].tokens for r in which], self.pad_id, self.device)
        empty = torch.zeros((len(which), 0), dtype=torch.long, device=self.device)
        return _DecodeState(which, DynamicCache(config=self.model.config), empty,
                            torch.zeros(len(which), dtype=torch.long, device=self.device), ids, mask)

    def _cached_state(self, rows, live, appended, batch, src, pos, cache, include_token) -> _DecodeState:
        """State over a gathered prefix cache: the first forward feeds only each prefix's last token (and, for
        a branch whose kept token closed a tool call, the result block after it). Rows already finished by
        ``start_branches`` (``live`` lists the others) are dropped from the cache."""
        ids, mask, positions = self._branch_inputs(batch, src, pos, include_token)
        width = ids.shape[1] - 1
        if cache.get_seq_length() != width or cache.layers[0].keys.shape[0] != len(rows):
            raise ValueError(f"past_key_values: expected {len(rows)} rows of {width} cached tokens (longest "
                             f"prefix minus one), got {tuple(cache.layers[0].keys.shape)}")
        index = torch.tensor(live, dtype=torch.long, device=self.device)
        if len(live) < len(rows):
            cache.batch_select_indices(index)
        blocks = [rows[r].tokens[appended[r] - 1:] if r in appended else [int(ids[r, -1])] for r in live]
        pending_ids, pending_mask = left_pad(blocks, self.pad_id, self.device)
        return _DecodeState(live, cache, mask[index, :-1], positions[index, -1], pending_ids, pending_mask,
                            prefill=False)

    def _branch_inputs(self, batch, src, pos, include_token):
        """Left-padded prefixes (ids, mask, position_ids) by ``appo.prefix_cache.build_branch_batch``."""
        from appo.prefix_cache import build_branch_batch

        device = batch.tokens.device
        branch = build_branch_batch(batch.tokens, batch.lengths, src.to(device), pos.to(device),
                                    pad_id=batch.pad_id, include_token=include_token)
        return (branch.input_ids.to(self.device), branch.attention_mask.long().to(self.device),
                branch.position_ids.to(self.device))
