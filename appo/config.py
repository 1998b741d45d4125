"""Typed training configuration: dataclasses, a YAML file and dotted ``key=value`` overrides.

``load_config(path, ["algo.algo=grpo", "optim.lr=2e-6"])`` starts from the built-in DEFAULT (the CPU demo:
SmolLM2-135M-Instruct on GSM8K with the python tool, APPO, 4 prompts x N=2, B=1 -> M=4 per prompt, short
lengths), applies the YAML file, then the overrides (each value parsed with ``yaml.safe_load``). Unknown keys
and values of the wrong type raise ValueError naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml


@dataclass
class ModelConfig:
    """The policy: ``name_or_path`` as accepted by ``appo.models.load_model``."""

    name_or_path: str = "smollm2-135m-instruct"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


@dataclass
class DataConfig:
    """The task (``appo.tasks.get_task``; data from ``appo.tasks.data_dir()``, i.e. $APPO_DATA_DIR or
    <repo>/../shared/data) and its splits. train_size / eval_size: the first items of the task's "train" /
    "dev" splits; few_shot: demonstrations in the prompt (``appo.tasks.render_prompt``); tool: the tool
    tag."""

    task: Literal["gsm8k", "arithmetic", "hotpotqa"] = "gsm8k"
    tool: Literal["python", "calculator", "search"] = "python"
    train_size: int = 256
    eval_size: int = 16
    few_shot: int = 2


@dataclass
class RolloutSettings:
    """Sampling and the tool loop (see ``appo.rollout.engine.RolloutConfig``). Prompts longer than
    max_prompt_tokens are dropped from the data. result_template: how tool output is appended (the few-shot
    demonstrations use the same form). response_prefix: text that opens every response (masked 0), e.g.
    "<python>" to make a small model start with a tool call; "" leaves the model free. max_batch_rows: rollouts
    decoded together at most (bounds memory; None: all at once). backend: "transformers" (appo.rollout.engine)
    or "vllm" (appo.rollout.vllm: needs vLLM installed; the trainer copies the policy's weights into vLLM after
    every optimizer step); vllm: extra keyword arguments for ``vllm.LLM`` (e.g. gpu_memory_utilization)."""

    temperature: float = 0.7
    top_p: float = 1.0
    max_prompt_tokens: int = 400
    max_new_tokens_per_turn: int = 64
    max_total_tokens: int = 480
    max_tool_calls: int = 2
    result_template: str = "<result>{result}</result>\n"
    response_prefix: str = "<python>"
    max_batch_rows: int | None = 32
    backend: Literal["transformers", "vllm"] = "transformers"
    vllm: dict = field(default_factory=dict)


@dataclass
class AlgoConfig:
    """The algorithm and its options (METHOD.md); every [appo choice] with its documented default.

    M: rollouts per prompt (budget), N: initial rollouts per prompt, B: branch tokens per rollout (APPO needs
    M = (B + 1) * N). gamma, clip, candidates: future value and Branching Score. b: the A_fut weight (0 is the
    "w/o A_fut" ablation); entropy_only: BS -> entropy ablation; one_group: "w/o dual-group" ablation. per:
    "rollout" (top-B per rollout) or "group" (top B*N pooled per prompt, the authors' code). include_token:
    keep the chosen token in the branch prefix (the authors' code) instead of re-sampling it. arpo_*: ARPO's
    rule.
    """

    algo: Literal["appo", "grpo", "arpo"] = "appo"
    M: int = 4
    N: int = 2
    B: int = 1
    gamma: float = 2 ** (-1 / 32)
    clip: tuple[float, float] = (1.0, 1.2)
    candidates: Literal["strict", "all"] = "strict"
    b: float = 0.5
    combine: Literal["avg", "sum"] = "avg"
    eps_low: float = 0.2
    eps_high: float = 0.28
    kl_coef: float = 0.0
    entropy_only: bool = False
    one_group: bool = False
    branch_when: Literal["per_minibatch", "once_per_step"] = "per_minibatch"
    per: Literal["rollout", "group"] = "rollout"
    min_gap: int = 0
    include_token: bool = False
    arpo_k: int = 20
    arpo_beta: float = 0.2
    arpo_tau: float = 0.5


@dataclass
class OptimConfig:
    """AdamW and the PPO mini-batch schedule: a step's prompts are split into ``minibatches_per_step``
    optimizer updates, each accumulated over ``grad_accumulation`` micro-batches (split by prompt)."""

    lr: float = 5e-6
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    minibatches_per_step: int = 2
    grad_accumulation: int = 1


@dataclass
class TrainConfig:
    """Everything one run needs. ``bf16``: autocast to bf16 on GPU (ignored on CPU). ``threads``: torch CPU
    threads (0 = torch's default, all cores); give each of several jobs sharing a machine its own share (e.g. 1),
    since oversubscribed CPU threads slow small matmuls down by an order of magnitude."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    prompts_per_step: int = 4
    steps: int = 6
    seed: int = 0
    output_dir: str = "runs/appo-demo"
    device: str = "auto"
    threads: int = 0
    eval_every: int = 0
    eval_at_end: bool = True
    eval_samples: int = 1
    checkpoint_every: int = 3
    keep_checkpoints: int = 2
    attn_implementation: str = "sdpa"
    bf16: bool = True
    tensorboard: bool = False
    resume: bool = True


DEFAULT = """\
# The CPU demo: SmolLM2-135M-Instruct on GSM8K with a python tool, APPO with a tiny budget (4 prompts x N=2,
# B=1 -> M=4), then a held-out evaluation on 16 dev questions. About 25-45 s per step on 2 CPU cores.
# The response opens with "<python>" so the 135M model starts with a tool call (rollout.response_prefix).
# Override any key on the command line, e.g. `appo train steps=2 algo.algo=grpo`.
model: {name_or_path: smollm2-135m-instruct, dtype: float32}
data: {task: gsm8k, tool: python, train_size: 256, eval_size: 16, few_shot: 2}
rollout: {temperature: 0.7, top_p: 1.0, max_prompt_tokens: 400, max_new_tokens_per_turn: 64,
          max_total_tokens: 480, max_tool_calls: 2, response_prefix: "<python>"}
algo: {algo: appo, M: 4, N: 2, B: 1, b: 0.5, combine: avg, candidates: strict, branch_when: per_minibatch}
optim: {lr: 5.0e-6, grad_clip: 1.0, minibatches_per_step: 2, grad_accumulation: 1}
prompts_per_step: 4
steps: 6
seed: 0
output_dir: runs/appo-demo
checkpoint_every: 3
eval_at_end: true
eval_samples: 1
"""


def _coerce(value, hint, key: str):
    """Check ``value`` against the type ``hint`` of field ``key``, converting int->float and list->tuple."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ValueError(f"{key}: expected one of {list(typing.get_args(hint))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        inner = [h for h in typing.get_args(hint) if h is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, h, f"{key}[{i}]") for i, (v, h) in enumerate(zip(value, args)))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "2e-6" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{key}: expected a number, got {value!r}") from None
    if hint is bool and not isinstance(value, bool):
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if hint in (float, str, dict) and not isinstance(value, hint):
        raise ValueError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def _apply(target, updates: dict, prefix: str = "") -> None:
    """Write the nested mapping ``updates`` into the dataclass ``target`` in place, checking keys and
    types."""
    if not isinstance(updates, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(target))
    names = {f.name for f in dataclasses.fields(target)}
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise ValueError(f"{key}: unknown config key (known: {', '.join(sorted(names))})")
        current = getattr(target, name)
        if dataclasses.is_dataclass(current):
            _apply(current, value, f"{key}.")
        else:
            setattr(target, name, _coerce(value, hints[name], key))


def _parse_override(text: str) -> dict:
    """``"algo.M=8"`` -> ``{"algo": {"M": 8}}`` (the value parsed by yaml.safe_load)."""
    if "=" not in text:
        raise ValueError(f"overrides: expected key=value, got {text!r}")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if not all(parts):
        raise ValueError(f"overrides: malformed key in {text!r}")
    nested: dict = {parts[-1]: yaml.safe_load(raw) if raw.strip() else ""}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    return nested


def validate(config: TrainConfig) -> TrainConfig:
    """Cross-field checks; returns ``config``. Raises ValueError naming the offending key."""
    algo = config.algo
    for key, value in (("algo.M", algo.M), ("algo.N", algo.N), ("prompts_per_step", config.prompts_per_step),
                       ("steps", config.steps),
                       ("optim.minibatches_per_step", config.optim.minibatches_per_step),
                       ("optim.grad_accumulation", config.optim.grad_accumulation),
                       ("rollout.max_new_tokens_per_turn", config.rollout.max_new_tokens_per_turn),
                       ("data.train_size", config.data.train_size)):
        if value < 1:
            raise ValueError(f"{key}: must be >= 1, got {value}")
    if algo.B < 0:
        raise ValueError(f"algo.B: must be >= 0, got {algo.B}")
    if algo.algo == "appo" and algo.M != (algo.B + 1) * algo.N:
        raise ValueError(f"algo.M: APPO needs M = (B + 1) * N = {(algo.B + 1) * algo.N}, got {algo.M}")
    if algo.algo == "arpo" and algo.N > algo.M:
        raise ValueError(f"algo.N: ARPO needs N <= M, got N={algo.N}, M={algo.M}")
    if not algo.clip[0] <= algo.clip[1]:
        raise ValueError(f"algo.clip: need lo <= hi, got {algo.clip}")
    if config.rollout.max_prompt_tokens >= config.rollout.max_total_tokens:
        raise ValueError(f"rollout.max_prompt_tokens: must be < rollout.max_total_tokens "
                         f"({config.rollout.max_total_tokens}), got {config.rollout.max_prompt_tokens}")
    groups = config.prompts_per_step // config.optim.minibatches_per_step
    if config.prompts_per_step % config.optim.minibatches_per_step or groups % config.optim.grad_accumulation:
        raise ValueError(f"prompts_per_step: {config.prompts_per_step} prompts must split evenly into "
                         f"optim.minibatches_per_step={config.optim.minibatches_per_step} x "
                         f"optim.grad_accumulation={config.optim.grad_accumulation} micro-batches")
    if config.rollout.max_batch_rows is not None and config.rollout.max_batch_rows < 1:
        raise ValueError(f"rollout.max_batch_rows: must be >= 1 or null, got {config.rollout.max_batch_rows}")
    if config.rollout.backend not in ("transformers", "vllm"):
        raise ValueError(f"rollout.backend: must be 'transformers' or 'vllm', got {config.rollout.backend!r}")
    if not 0 < config.rollout.top_p <= 1:
        raise ValueError(f"rollout.top_p: must lie in (0, 1], got {config.rollout.top_p}")
    if config.rollout.temperature <= 0:
        raise ValueError(f"rollout.temperature: must be > 0, got {config.rollout.temperature}")
    return config


def from_dict(data: dict) -> TrainConfig:
    """A TrainConfig from a (possibly partial) nested mapping, on top of the dataclass defaults."""
    config = TrainConfig()
    _apply(config, data)
    return validate(config)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """DEFAULT, then the YAML file at ``path`` (if given), then each ``key=value`` override, validated."""
    config = TrainConfig()
    _apply(config, yaml.safe_load(DEFAULT))
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"path: no config file at {path}")
        _apply(config, yaml.safe_load(path.read_text()) or {})
    for text in overrides:
        _apply(config, _parse_override(text))
    return validate(config)


def to_dict(config) -> dict:
    """Plain nested dict (tuples as lists) that round-trips through YAML/JSON and ``from_dict``."""
    def plain(value):
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(dataclasses.asdict(config))
