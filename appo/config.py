"""Typed training configuration: dataclasses, a YAML file and dotted ``key=value`` overrides.

``load_config(path, ["algo.algo=grpo", "optim.lr=2e-6"])`` starts from the built-in DEFAULT (the CPU demo:
SmolLM2-135M-Instruct, arithmetic task, python tool, APPO, 4 prompts x N=2, B=1 -> M=4 per prompt, short
lengths), applies the YAML file, then the overrides (each value parsed with ``yaml.safe_load``). Unknown keys
and bad values (type, range, choice; ``validate``) raise ConfigError, a ValueError naming the key, and
the file and line when the key was set in a file.

Config text is input, hostile or not: a file holds at most MAX_CONFIG_BYTES, the overrides as many together,
nothing nests deeper than MAX_DEPTH levels (a file, an override's value or the mappings data.task_options and
rollout.vllm, aliases expanded), and a key given twice in one mapping, at any depth, is refused naming the key
and both lines. Every numeric field has a bounded range in RANGES (checked by ``validate``), and the text the
environment writes into a rollout (rollout.result_template, rollout.response_prefix) cannot spell a tag the
model writes or a special token (``check_result_template``, ``check_response_prefix``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import string
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
    """The task (``appo.tasks.get_task``) and its splits. path: a local .jsonl file, or a folder holding the
    task's file, for the tasks that read data (gsm8k, hotpotqa); None looks in $APPO_DATA_DIR, then on the
    Hugging Face hub (``appo.tasks.data``); the arithmetic task is generated and takes none. train_size /
    eval_size: the first items of the task's "train" / "dev" splits; few_shot: demonstrations in the prompt
    (``appo.tasks.render_prompt``); tool: the tool tag. task_options: keyword options of the task's
    constructor (``appo.tasks.get_task``), e.g. the arithmetic task's difficulty {max_operands: 4,
    max_operand: 200} and split sizes {num_dev: 256}; checked against the task's signature and RANGES;
    an override ``data.task_options.max_operand=50`` changes that one option and keeps the others."""

    task: Literal["gsm8k", "arithmetic", "hotpotqa"] = "arithmetic"
    path: str | None = None
    tool: Literal["python", "calculator", "search"] = "python"
    train_size: int = 256
    eval_size: int = 32
    few_shot: int = 1
    task_options: dict = field(default_factory=dict)


@dataclass
class RolloutSettings:
    """Sampling and the tool loop (see ``appo.rollout.engine.RolloutConfig``). Prompts longer than
    max_prompt_tokens are dropped from the data. result_template: how tool output is appended (the few-shot
    demonstrations use the same form): ``{result}`` exactly once, inside one ``<result>`` ... ``</result>``
    wrapper, and no other tag or special-token-like text anywhere (the environment writes it, so a tag in it
    would forge the model's answer, a tool call or a chat turn; ``check_result_template``, ``tag_like`` for
    what counts). response_prefix: text that opens every response (masked 0), e.g. "<python>" to make a small
    model start with a tool call; "" leaves the model free. It may hold ``<think>`` and the opening tag of a
    tool call (``<python>``, ``<search>``, ``<calculator>``), and no other tag or special-token-like text (no
    closing tag, no ``<answer>``, no ``<result>``; ``check_response_prefix``). max_batch_rows: rollouts decoded
    together at most (bounds memory; None: all at once). backend: "transformers" (appo.rollout.engine) or
    "vllm" (appo.rollout.vllm: needs vLLM installed; the trainer copies the policy's weights into vLLM before
    it samples after an optimizer step: at the start of a step and before each mini-batch's branches, so
    branches decode from the policy the trainer holds); vllm: extra keyword arguments for ``vllm.LLM`` (e.g.
    gpu_memory_utilization)."""

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

    M: rollouts per prompt (budget, exactly M trajectories per prompt for every algorithm), N: initial rollouts
    per prompt, B: branch tokens per rollout (APPO needs M = (B + 1) * N; a rollout with fewer candidate tokens
    is made up for by its prompt's next-best tokens, see ``appo.algos.plan_branches``).
    bs_gamma, bs_clip, candidates: the Branching Score's future value (discount per position, clip range) and
    candidate rule. fut_gamma, fut_clip: A_fut's, set apart from the Branching Score's (the paper uses the same
    values; the authors' code uses bs_gamma 1, bs_clip [0.8, 1.2], fut_gamma 2^(-1/64)). b: the A_fut weight
    (0 is the "w/o A_fut" ablation); entropy_only: BS -> entropy ablation; one_group: "w/o dual-group" ablation.
    per: "rollout" (top-B per rollout) or "group" (top B*N pooled per prompt, the authors' code). include_token:
    keep the chosen token in the branch prefix (the authors' code) instead of re-sampling it. tis_cap: the
    truncated importance-sampling weight min(pi_old / pi_behaviour, tis_cap) on the loss, correcting for the
    rollout engine / trainer mismatch (null disables it). arpo_*: ARPO's rule.
    uniform_points: the branch-point selection ablation: each row's (per group: each group's) branch points
    drawn uniformly at random, from the step's seeded generator, among the candidates the Branching Score
    would rank, with the same budget, min_gap and fill rule (metric branch_points_uniform). shift_tolerance: a
    rollout whose largest |log pi_theta - log pi_old| is at most this counts as unshifted and falls back to
    entropy; null (default): from the dtype the forward computes in (fp32 2^-12, fp16 or TF32 2^-5, bf16
    2^-2; docs/method.md section 4); 0: bit equality only.
    warmup_update: with ``optim.minibatches_per_step`` updates per step, the first mini-batch branches while
    pi_theta == pi_old, so its prompts never use Omega (half of them at the default 2 mini-batches). true: one
    warm-up update on the first mini-batch's initial rollouts (advantage A_init, no branches) before any
    branching, so every mini-batch branches after an update; it costs one more forward, backward and
    optimizer step per step and trains the first mini-batch twice. Default false (the paper's loop).
    """

    algo: Literal["appo", "grpo", "arpo"] = "appo"
    M: int = 4
    N: int = 2
    B: int = 1
    bs_gamma: float = 2 ** (-1 / 32)
    bs_clip: tuple[float, float] = (1.0, 1.2)
    candidates: Literal["strict", "all"] = "strict"
    fut_gamma: float = 2 ** (-1 / 32)
    fut_clip: tuple[float, float] = (1.0, 1.2)
    b: float = 0.5
    combine: Literal["avg", "sum"] = "avg"
    eps_low: float = 0.2
    eps_high: float = 0.28
    tis_cap: float | None = 2.0
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
    uniform_points: bool = False
    shift_tolerance: float | None = None
    warmup_update: bool = False


@dataclass
class OptimConfig:
    """AdamW and the PPO mini-batch schedule: a step's prompts are split into ``minibatches_per_step``
    optimizer updates, each accumulated over ``grad_accumulation`` micro-batches (split by prompt)."""

    lr: float = 2e-5
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
    steps: int = 16
    seed: int = 0
    output_dir: str = "runs/appo-demo"
    device: str = "auto"
    threads: int = 0
    eval_every: int = 0
    eval_at_end: bool = True
    eval_samples: int = 1
    checkpoint_every: int = 8
    keep_checkpoints: int = 2
    attn_implementation: str = "sdpa"
    bf16: bool = True
    tensorboard: bool = False
    resume: bool = True
    # resume with a config that differs from the checkpoint's (each change is applied and logged)
    allow_config_change: bool = False


DEFAULT = """\
# The CPU demo: SmolLM2-135M-Instruct on the procedural arithmetic task (nothing to download) with a python
# tool and one demonstration in the prompt; 16 steps of APPO with a tiny budget (4 prompts x N=2, B=1 -> M=4),
# then a held-out evaluation on 32 dev questions (README, "Quick start", has what it measured). Checkpoints at
# steps 8 and 16 (1.6 GB each: weights and AdamW state).
# GSM8K is one override away: data.task=gsm8k (data from data.path, $APPO_DATA_DIR or the Hugging Face hub).
# The response opens with "<python>" so the 135M model starts with a tool call (rollout.response_prefix).
# Override any key on the command line, e.g. `appo train steps=2 algo.algo=grpo`.
model: {name_or_path: smollm2-135m-instruct, dtype: float32}
data: {task: arithmetic, tool: python, train_size: 256, eval_size: 32, few_shot: 1}
rollout: {temperature: 0.7, top_p: 1.0, max_prompt_tokens: 400, max_new_tokens_per_turn: 64,
          max_total_tokens: 480, max_tool_calls: 2, response_prefix: "<python>"}
algo: {algo: appo, M: 4, N: 2, B: 1, b: 0.5, combine: avg, candidates: strict, branch_when: per_minibatch}
optim: {lr: 2.0e-5, grad_clip: 1.0, minibatches_per_step: 2, grad_accumulation: 1}
prompts_per_step: 4
steps: 16
seed: 0
output_dir: runs/appo-demo
checkpoint_every: 8
eval_at_end: true
eval_samples: 1
"""


class ConfigError(ValueError):
    """A config value that cannot be used. ``key`` is the dotted key the message names; ``where`` (optional) is
    the file and line it was set on, put in front of the message."""

    def __init__(self, key: str, message: str, where: str | None = None):
        super().__init__(f"{where}: {key}: {message}" if where else f"{key}: {message}")
        self.key = key


@dataclass(frozen=True)
class Range:
    """The numbers a field accepts: ``lo`` / ``hi`` (None: unbounded), ``open_lo`` / ``open_hi`` exclude the
    bound. NaN lies in no range."""

    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    open_hi: bool = False

    def __contains__(self, value) -> bool:
        above = self.lo is None or (value > self.lo if self.open_lo else value >= self.lo)
        below = self.hi is None or (value < self.hi if self.open_hi else value <= self.hi)
        return bool(above and below)

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.open_lo else '>='} {self.lo}"
        return f"in {'(' if self.open_lo else '['}{self.lo}, {self.hi}{')' if self.open_hi else ']'}"


# Kept for fields being added elsewhere; a new field needs an upper bound too (tests/test_config.py checks).
_POSITIVE, _AT_LEAST_0, _AT_LEAST_1 = Range(0, open_lo=True), Range(0), Range(1)
# Upper bounds: far above any run this library can make, low enough that a typo (threads=1e8, optim.lr=1e308,
# rollout.max_total_tokens=1e12) is refused before anything loads instead of hanging or diverging later.
_TOKENS, _ITEMS, _GROUP = 2**20, 10**7, 4096  # a sequence, a data split or a run's steps, rollouts or updates
_UNIT, _SEED = Range(0, 1, open_lo=True), Range(0, 2**32 - 1)
# The range of every numeric field (each element of a pair); ``validate`` checks them all. Every numeric
# field of the config's dataclasses and of the tasks' options needs an entry with both bounds
# (tests/test_config.py walks them).
RANGES: dict[str, Range] = {
    "data.train_size": Range(1, _ITEMS), "data.eval_size": Range(0, _ITEMS), "data.few_shot": Range(0, 64),
    "data.task_options.num_train": Range(0, _ITEMS), "data.task_options.num_dev": Range(0, _ITEMS),
    "data.task_options.dev_size": Range(0, _ITEMS), "data.task_options.min_operands": Range(1, 64),
    "data.task_options.max_operands": Range(1, 64), "data.task_options.max_operand": Range(1, 10**12),
    "data.task_options.seed": _SEED,
    "rollout.temperature": Range(0, 10, open_lo=True), "rollout.top_p": _UNIT,
    "rollout.max_prompt_tokens": Range(1, _TOKENS), "rollout.max_new_tokens_per_turn": Range(1, _TOKENS),
    "rollout.max_total_tokens": Range(2, _TOKENS), "rollout.max_tool_calls": Range(0, 1024),
    "rollout.max_batch_rows": Range(1, 2**16),
    "algo.M": Range(1, _GROUP), "algo.N": Range(1, _GROUP), "algo.B": Range(0, _GROUP),
    "algo.bs_gamma": _UNIT, "algo.bs_clip": Range(0, 100), "algo.fut_gamma": _UNIT,
    "algo.fut_clip": Range(0, 100), "algo.b": Range(0, 100), "algo.eps_low": Range(0, 1, open_hi=True),
    "algo.eps_high": Range(0, 10), "algo.tis_cap": Range(0, 1000, open_lo=True),
    "algo.kl_coef": Range(0, 100), "algo.min_gap": Range(0, _TOKENS),
    "algo.arpo_k": Range(1, _TOKENS), "algo.arpo_beta": Range(0, 100), "algo.arpo_tau": Range(0, 1),
    "algo.shift_tolerance": Range(0, 20),
    "optim.lr": Range(0, 1),  # 0 is a real diagnostic: no update, so no mini-batch may see a policy shift
    "optim.betas": Range(0, 1, open_hi=True), "optim.weight_decay": Range(0, 10),
    "optim.grad_clip": Range(0, 10**6, open_lo=True), "optim.minibatches_per_step": Range(1, _GROUP),
    "optim.grad_accumulation": Range(1, _GROUP),
    "prompts_per_step": Range(1, 2**16), "steps": Range(1, _ITEMS), "seed": _SEED, "threads": Range(0, 1024),
    "eval_every": Range(0, _ITEMS), "eval_samples": Range(1, 1024), "checkpoint_every": Range(1, _ITEMS),
    "keep_checkpoints": Range(0, 10**4),
}
ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
# Keys that may differ between a run and its resume without allow_config_change: where the run is, how long it
# runs, how often it evaluates and saves, and how fast it computes; not what it trains on or how.
RESUME_FREE = frozenset({
    "steps", "output_dir", "resume", "allow_config_change", "device", "threads", "attn_implementation",
    "eval_every", "eval_at_end", "eval_samples", "checkpoint_every", "keep_checkpoints", "tensorboard",
    "data.eval_size", "data.path", "rollout.max_batch_rows",
})


def _coerce(value, hint, key: str):
    """Check ``value`` against the type ``hint`` of field ``key``, converting int->float and list->tuple.
    Floats must be finite; dict keys must be strings. Raises ConfigError naming ``key``."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(key, f"expected one of {list(typing.get_args(hint))}, got {_shown(value)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        inner = [h for h in typing.get_args(hint) if h is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(key, f"expected a list of {len(args)} values, got {_shown(value)}")
        return tuple(_coerce(v, h, f"{key}[{i}]") for i, (v, h) in enumerate(zip(value, args)))
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(key, f"expected a number, got {_shown(value)}")
        try:  # YAML 1.1 reads "2e-6" (no dot) as a string
            number = float(value)
        except ValueError:
            raise ConfigError(key, f"expected a number, got {_shown(value)}") from None
        if not math.isfinite(number):
            raise ConfigError(key, f"expected a finite number, got {_shown(value)}")
        return number
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(key, f"expected true or false, got {_shown(value)}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(key, f"expected an integer, got {_shown(value)}")
    if hint in (str, dict) and not isinstance(value, hint):
        raise ConfigError(key, f"expected {hint.__name__}, got {_shown(value)}")
    if hint is dict and not _plain_and_small(value):
        raise ConfigError(key, f"expected plain YAML values (numbers, strings, lists, mappings) of at most "
                          f"{_MAX_NODES} items in all, nested at most {MAX_DEPTH} deep")
    if hint is dict and not all(isinstance(k, str) for k in value):
        raise ConfigError(key, f"expected a mapping with string keys, got {_shown(value)}")
    return value


# Limits on config text: a config file's bytes (and the overrides' characters, all together), and the nesting
# of a file, of an override's value and of a mapping option (aliases expanded). The deepest key the config has
# is 3 levels down (data.task_options.<name>); a vllm option may hold a few more.
MAX_CONFIG_BYTES = 256 * 1024
MAX_DEPTH = 32
_MAX_NODES = 1000  # values in one mapping option (data.task_options, rollout.vllm), aliases expanded


def _shown(value) -> str:
    """``repr(value)`` cut short (long strings, big integers, large or deep containers), for messages."""
    shorter = reprlib.Repr()
    shorter.maxlevel, shorter.maxstring, shorter.maxlong, shorter.maxother = 3, 120, 60, 120
    return shorter.repr(value)


def _plain_and_small(value) -> bool:
    """Whether ``value`` holds only JSON-like plain values, at most _MAX_NODES of them counted with every alias
    expanded (a YAML alias chain can stand for billions; the walk stops at the limit), nested at most
    MAX_DEPTH deep (aliases can nest deeper than the text that spells them)."""
    stack, count = [(value, 0)], 0
    while stack:
        item, depth = stack.pop()
        count += 1
        if count > _MAX_NODES or depth > MAX_DEPTH:
            return False
        if isinstance(item, dict):
            stack += [(child, depth + 1) for child in (*item.keys(), *item.values())]
        elif isinstance(item, (list, tuple)):
            stack += [(child, depth + 1) for child in item]
        elif not isinstance(item, (str, int, float, bool, type(None))):
            return False
    return True


def _apply(target, updates: dict, prefix: str = "") -> None:
    """Write the nested mapping ``updates`` into the dataclass ``target`` in place, checking keys and
    types."""
    if not isinstance(updates, dict):
        raise ConfigError(prefix.rstrip(".") or "config", f"expected a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(target))
    names = {f.name for f in dataclasses.fields(target)}
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise ConfigError(key, f"unknown config key (known: {', '.join(sorted(names))})")
        current = getattr(target, name)
        if dataclasses.is_dataclass(current):
            _apply(current, value, f"{key}.")
        elif name == "task_options" and isinstance(current, dict) and isinstance(value, dict):
            setattr(target, name, _coerce({**current, **value}, hints[name], key))  # one option at a time
        else:
            setattr(target, name, _coerce(value, hints[name], key))


class _NestingError(ValueError):
    """YAML nested deeper than MAX_DEPTH; ``line`` (1-based) is where the level past the limit opens."""

    def __init__(self, line: int):
        super().__init__(f"nested deeper than {MAX_DEPTH} levels (MAX_DEPTH, the limit of config text)")
        self.line = line


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses to compose a collection nested deeper than MAX_DEPTH. The composer
    recurses once per level, so deeper text would exhaust Python's stack (a RecursionError thousands of lines
    long)."""

    def __init__(self, stream):
        super().__init__(stream)
        self.nesting = 0

    def compose_node(self, parent, index):
        nested = self.check_event(yaml.CollectionStartEvent)
        self.nesting += nested
        try:
            if self.nesting > MAX_DEPTH:
                raise _NestingError(self.peek_event().start_mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self.nesting -= nested


def _load_yaml(text: str, inspect=None):
    """(the value of the one YAML document ``text``, with safe_load's types; ``inspect(node)``'s result, None
    when not given or the document is empty). ``inspect`` sees the node graph as written, before construction
    folds merge keys in. Raises yaml.YAMLError, _NestingError, or ValueError for a scalar Python refuses (an
    integer of 5,000 digits, the date 2024-13-01)."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        seen = inspect(node) if inspect is not None else None
        return loader.construct_document(node), seen
    finally:
        loader.dispose()


def _parse_override(text: str) -> dict:
    """``"algo.M=8"`` -> ``{"algo": {"M": 8}}`` (the value parsed as YAML, as ``yaml.safe_load`` does, nested
    at most MAX_DEPTH deep)."""
    if "=" not in text:
        raise ConfigError("overrides", f"expected key=value, got {_shown(text)}")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if not all(parts) or len(parts) > MAX_DEPTH:
        raise ConfigError("overrides", f"malformed key in {_shown(text)}")
    try:
        value = _load_yaml(raw)[0] if raw.strip() else ""
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError("overrides", f"{_shown(text)}: the value is not valid YAML ({problem})") from None
    except ValueError as err:  # _NestingError, or a scalar Python refuses
        raise ConfigError("overrides", f"{_shown(text)}: the value is {err}") from None
    nested: dict = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    return nested


def _check_fields(target, prefix: str = "") -> None:
    """Type and range of every field of the dataclass ``target`` (recursively), converting in place."""
    hints = typing.get_type_hints(type(target))
    for item in dataclasses.fields(target):
        key, value = f"{prefix}{item.name}", getattr(target, item.name)
        if dataclasses.is_dataclass(value):
            _check_fields(value, f"{key}.")
            continue
        value = _coerce(value, hints[item.name], key)
        setattr(target, item.name, value)
        allowed = RANGES.get(key)
        numbers = value if isinstance(value, tuple) else (value,)
        if allowed is not None and any(isinstance(v, (int, float)) and v not in allowed for v in numbers):
            raise ConfigError(key, f"must be {allowed}, got {_shown(value)}")


def _check_text(config: TrainConfig) -> None:
    """The string fields: non-empty names and paths, the device and attention choices, the result template."""
    for key, value in (("model.name_or_path", config.model.name_or_path), ("output_dir", config.output_dir),
                       ("data.path", getattr(config.data, "path", None))):
        if value is not None and (not value.strip() or "\0" in value):
            raise ConfigError(key, f"expected a non-empty name or path, got {_shown(value)}")
    if not _DEVICE.fullmatch(config.device):
        raise ConfigError("device", f"expected auto, cpu, cuda or cuda:<index>, got {config.device!r}")
    if config.attn_implementation not in ATTENTION and "/" not in config.attn_implementation:
        raise ConfigError("attn_implementation", f"expected one of {list(ATTENTION)} or a hub kernel "
                          f"'org/repo', got {config.attn_implementation!r}")
    check_result_template(config.rollout.result_template)
    check_response_prefix(config.rollout.response_prefix)


# What text the environment writes into a rollout may not spell (beyond the tags its field allows): a tag, or
# anything a tokenizer may read as a special token. That is anything in angle brackets (<answer>, </result>,
# <python>, <think>, <|im_start|>, <s>, <｜begin▁of▁sentence｜>) and a lone < or >, capitals in square brackets
# ([INST], [/INST], [TOOL_CALLS]: Mistral's control tokens), the fullwidth bar ｜, and control characters
# other than tab and newline. The rule is the config's, not one tokenizer's, so it holds for every model.
_TAG_LIKE = re.compile(r"<[^<>]*>|[<>\uff5c]|\[/?[A-Z][A-Z_]*\]|[\x00-\x08\x0b-\x1f\x7f]")
_TAG_KINDS = "<...>, [INST], \uff5c, control characters"


def tag_like(text: str) -> list[str]:
    """The tags and special-token-like pieces of ``text`` (see _TAG_LIKE), in order."""
    return _TAG_LIKE.findall(text)


def check_template(key: str, text: str, *, allowed: tuple[str, ...] = (),
                   rule: str = "may hold no tag") -> None:
    """Raise ConfigError naming ``key`` when ``text`` (written by the environment into a rollout, so never the
    model's) spells a tag or special-token-like text other than ``allowed`` (``tag_like``). ``rule`` says
    what the field may hold, for the message."""
    extra = [piece for piece in tag_like(text) if piece not in allowed]
    if extra:
        raise ConfigError(key, f"{rule}, and no other tag or special-token-like text ({_TAG_KINDS}); it "
                          f"writes {extra[0]!r}, got {_shown(text)}")


def check_response_prefix(prefix: str, key: str = "rollout.response_prefix") -> None:
    """The rule of a response prefix (text forced at the start of every response): ``<think>`` and opening
    tool tags (``<python>``, ...) only, no other tag or special-token-like text (``tag_like``). Raises
    ConfigError naming ``key``; every backend that takes a prefix can call it."""
    from appo.tasks.parsing import TOOL_TAGS

    openings = tuple(f"<{tag}>" for tag in TOOL_TAGS)
    check_template(key, prefix, allowed=("<think>", *openings),
                   rule=f"may hold <think> and open a tool call ({', '.join(openings)})")


def check_result_template(template: str, key: str = "rollout.result_template") -> None:
    """The rule of a result template (how the environment appends tool output): one ``{result}`` field,
    inside one ``<result>`` ... ``</result>`` wrapper, and no other field, tag or special-token-like text
    (``tag_like``). Raises ConfigError naming ``key``; every backend that takes a template can call it."""
    rule = "must hold {result} once, inside one <result> ... </result>"
    try:
        pieces = list(string.Formatter().parse(template))
        fields = [name for _, name, _, _ in pieces if name is not None]
        template.format(result="")
    except (KeyError, IndexError, ValueError):
        fields = []
    if fields != ["result"]:
        raise ConfigError(key, f"{rule}, and no other {{...}} field (write {{{{ and }}}} for braces), got "
                          f"{_shown(template)}")
    split = next(index for index, (_, name, _, _) in enumerate(pieces) if name is not None)
    head = "".join(literal for literal, *_ in pieces[:split + 1])
    tail = "".join(literal for literal, *_ in pieces[split + 1:])
    for part, wrapper, side in ((head, "<result>", "before"), (tail, "</result>", "after")):
        found = tag_like(part)
        extra = [piece for piece in found if piece != wrapper]
        if extra or found.count(wrapper) != 1:
            count = found.count(wrapper)
            problem = f"it writes {extra[0]!r}" if extra else f"it has {count} {wrapper} {side} it"
            raise ConfigError(key, f"{rule}, and no other tag or special-token-like text ({_TAG_KINDS}); "
                              f"{problem}, got {_shown(template)}")


def _check_rules(config: TrainConfig) -> None:
    """The rules between fields."""
    algo, optim, rollout = config.algo, config.optim, config.rollout
    if algo.algo == "appo" and algo.M != (algo.B + 1) * algo.N:
        raise ConfigError("algo.M", f"APPO needs M = (B + 1) * N = {(algo.B + 1) * algo.N}, got {algo.M}")
    if algo.algo in ("grpo", "arpo") and algo.M < 2:
        raise ConfigError("algo.M", f"{algo.algo.upper()} needs M >= 2 rollouts per prompt (a group of one "
                          f"has advantage 0, so nothing is learned), got {algo.M}")
    if algo.algo == "arpo" and algo.N > algo.M:
        raise ConfigError("algo.N", f"ARPO needs N <= M, got N={algo.N}, M={algo.M}")
    if algo.warmup_update and (algo.algo != "appo" or algo.branch_when != "per_minibatch"):
        raise ConfigError("algo.warmup_update", "needs algo.algo=appo with algo.branch_when=per_minibatch "
                          "(it makes APPO's per-mini-batch branching see a policy shift)")
    for item in dataclasses.fields(algo):  # every clip pair (lo, hi), however many the algorithm has
        value = getattr(algo, item.name)
        if item.name.endswith("clip") and isinstance(value, tuple) and not value[0] <= value[1]:
            raise ConfigError(f"algo.{item.name}", f"need lo <= hi, got {value}")
    if rollout.max_prompt_tokens >= rollout.max_total_tokens:
        raise ConfigError("rollout.max_prompt_tokens", f"must be < rollout.max_total_tokens "
                          f"({rollout.max_total_tokens}), got {rollout.max_prompt_tokens}")
    groups = config.prompts_per_step // optim.minibatches_per_step
    if config.prompts_per_step % optim.minibatches_per_step or groups % optim.grad_accumulation:
        raise ConfigError("prompts_per_step", f"{config.prompts_per_step} prompts must split evenly into "
                          f"optim.minibatches_per_step={optim.minibatches_per_step} x "
                          f"optim.grad_accumulation={optim.grad_accumulation} micro-batches")
    _check_task_options(config)
    from appo.tasks.prompts import demonstrations

    available = len(demonstrations((config.data.tool,), config.data.few_shot))
    if config.data.few_shot > available:
        raise ConfigError("data.few_shot", f"there are {available} demonstrations for the "
                          f"{config.data.tool} tool, got {config.data.few_shot}")


def _check_task_options(config: TrainConfig) -> None:
    """data.task_options: each key a keyword of the task's constructor (not path, which is data.path), each
    value of its default's type and within RANGES, and the task built with them (its rules between options,
    e.g. min_operands <= max_operands); the arithmetic task must hold data.train_size / data.eval_size
    questions in its splits (num_train / num_dev)."""
    import inspect

    from appo.tasks import TASKS

    data = config.data
    task = TASKS[data.task]
    known = {name: p.default for name, p in inspect.signature(task.__init__).parameters.items()
             if name not in ("self", "path", "reward_config") and p.default is not inspect.Parameter.empty}
    for name, value in data.task_options.items():
        key = f"data.task_options.{name}"
        if name == "path":
            raise ConfigError(key, "the data file is data.path, not a task option")
        if name not in known:
            raise ConfigError(key, f"the {data.task} task has no option {name!r} "
                              f"({'known: ' + ', '.join(known) if known else 'it takes none'})")
        kind = type(known[name])
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ConfigError(key, f"expected {kind.__name__}, got {_shown(value)}")
        allowed = RANGES.get(key)
        if allowed is not None and value not in allowed:
            raise ConfigError(key, f"must be {allowed}, got {_shown(value)}")
    try:
        built = task(**data.task_options)
    except ValueError as err:  # the task's messages start with the option names: "min_operands: ..."
        names, _, message = str(err).partition(":")
        name = names.split(",")[0].strip()
        if name not in known:
            raise ConfigError("data.task_options", str(err)) from None
        raise ConfigError(f"data.task_options.{name}", message.strip()) from None
    sizes = getattr(built, "sizes", {})
    for name, split, option in (("train_size", "train", "num_train"), ("eval_size", "dev", "num_dev")):
        wanted = getattr(data, name)
        if split in sizes and wanted > sizes[split]:
            raise ConfigError(f"data.{name}", f"{wanted} exceeds the {data.task} task's {split} split of "
                              f"{sizes[split]} questions (set data.task_options.{option})")


def validate(config: TrainConfig) -> TrainConfig:
    """Check every value of ``config``: its type, its range (``RANGES``), its choices, and the rules between
    fields; numbers are converted in place (int -> float, list -> tuple). Returns ``config``. Raises
    ConfigError (a ValueError) naming the dotted key. Cheap and machine-independent (``check_available``
    checks what the machine has), so it runs before anything loads."""
    _check_fields(config)
    _check_text(config)
    _check_rules(config)
    return config


def check_available(config: TrainConfig, *, model: bool = True, data: bool = True) -> None:
    """Raise ConfigError naming the key when this machine lacks what ``config`` asks for: a CUDA device, the
    tensorboard or vllm package, (data=True) the task's data, or (model=True) the model folder.
    ``appo.trainer.train`` and ``appo eval`` call it before loading anything."""
    import importlib.util

    import torch

    if config.device.startswith("cuda"):
        index = int(config.device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError("device", f"{config.device!r}, but torch sees {torch.cuda.device_count()} CUDA "
                              "device(s) (device=auto picks the GPU when there is one)")
    if config.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("tensorboard", "true needs the 'tensorboard' package (pip install tensorboard)")
    if config.rollout.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError("rollout.backend", "'vllm' needs the 'vllm' package (scripts/vllm_env.sh or pip)")
    data_path = getattr(config.data, "path", None)
    if data_path is not None and not Path(data_path).expanduser().exists():
        raise ConfigError("data.path", f"no such file or folder: {data_path}")
    if data:
        from appo.tasks import DATA_TASKS
        from appo.tasks.data import load_rows

        if config.data.task in DATA_TASKS:
            try:  # data.path, $APPO_DATA_DIR or the hub; the rows stay cached for the run
                load_rows(config.data.task, data_path)
            except (FileNotFoundError, ValueError) as err:
                raise ConfigError("data.path", str(err)) from None
    if model:
        from appo.models import SMOLLM2

        name = config.model.name_or_path
        if name != SMOLLM2 and not Path(name).expanduser().exists():
            raise ConfigError("model.name_or_path", f"{name!r} is neither {SMOLLM2!r} nor an existing folder")


def from_dict(data: dict) -> TrainConfig:
    """A TrainConfig from a (possibly partial) nested mapping, on top of the dataclass defaults."""
    config = TrainConfig()
    _apply(config, data)
    return validate(config)


def _key_lines(node, path: Path) -> dict[str, int]:
    """The 1-based line of each dotted key of the YAML mapping ``node``, at every depth. A key given twice in
    one mapping (as the loaded mapping compares keys: ``1`` and ``1.0`` are one key), however deep and under
    lists too, raises ConfigError naming the key (``a.b[2].c``) and both lines. Each node is walked once, so a
    chain of aliases cannot make the walk blow up; a merge key (``<<: *base``) is YAML's way to give defaults
    and may be overridden."""
    lines: dict[str, int] = {}
    keys = yaml.SafeLoader("")  # constructs a key as the document's mapping does
    stack, walked = [(node, "")], set()
    while stack:
        current, where = stack.pop()
        if id(current) in walked:
            continue
        walked.add(id(current))
        if isinstance(current, yaml.SequenceNode):
            stack += [(item, f"{where}[{index}]") for index, item in enumerate(current.value)]
        if not isinstance(current, yaml.MappingNode):
            continue
        first: dict = {}
        for key_node, value_node in current.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                stack.append((value_node, where))
                continue
            key, line = f"{where}.{key_node.value}" if where else key_node.value, key_node.start_mark.line + 1
            name = keys.construct_object(key_node)
            if name in first:
                raise ConfigError(key, f"given twice (first on line {first[name]})", where=f"{path}:{line}")
            first[name] = line
            lines.setdefault(key, line)
            stack.append((value_node, key))
    return lines


def read_yaml(path: str | Path) -> tuple[dict, dict[str, int]]:
    """The mapping in the YAML file ``path`` and the line of each dotted key in it. Raises ValueError naming the
    file (and the line) when it is missing, larger than MAX_CONFIG_BYTES, not UTF-8, not valid YAML, nested
    deeper than MAX_DEPTH, has a key twice in one mapping (at any depth) or is not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("path", f"no config file at {path}")
    with open(path, "rb") as handle:
        raw = handle.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ValueError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes (MAX_CONFIG_BYTES, the limit of a "
                         "config file)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        data, lines = _load_yaml(text, lambda node: _key_lines(node, path))
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ValueError(f"{where}: invalid YAML: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: invalid YAML: {err}") from None
    except _NestingError as err:
        raise ValueError(f"{path}:{err.line}: {err}") from None
    except ConfigError:  # a key given twice, named with its lines
        raise
    except ValueError as err:  # a scalar Python refuses
        raise ValueError(f"{path}: a value cannot be read ({err})") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}:1: expected a mapping of config keys (e.g. 'steps: 6'), got a "
                         f"{type(data).__name__}")
    return data, lines


def _leaf_keys(nested: dict, prefix: str = ""):
    for key, value in nested.items():
        if isinstance(value, dict):
            yield from _leaf_keys(value, f"{prefix}{key}.")
        yield f"{prefix}{key}"


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """DEFAULT, then the YAML file at ``path`` (if given), then each ``key=value`` override, validated. Every
    error names the key; one about a key set in the file also names the file and the line."""
    config = TrainConfig()
    _apply(config, yaml.safe_load(DEFAULT))
    origins: dict[str, str] = {}
    if path is not None:
        data, lines = read_yaml(path)
        origins = {key: f"{path}:{line}" for key, line in lines.items()}
        try:
            _apply(config, data)
        except ConfigError as err:
            raise _located(err, origins) from None
    if sum(len(text) for text in overrides) > MAX_CONFIG_BYTES:
        raise ConfigError("overrides", f"{sum(len(text) for text in overrides)} characters in all, more than "
                          f"{MAX_CONFIG_BYTES} (MAX_CONFIG_BYTES, the limit of config text)")
    for text in overrides:
        nested = _parse_override(text)
        _apply(config, nested)
        for key in _leaf_keys(nested):
            origins.pop(key, None)
    try:
        return validate(config)
    except ConfigError as err:
        raise _located(err, origins) from None


def _located(err: ConfigError, origins: dict[str, str]) -> ConfigError:
    """``err`` with the file and line its key was set on in front, when it was set in a file."""
    key = err.key.split("[")[0]
    where = origins.get(key)
    if where is None and key.startswith("data.task_options."):  # an option the mapping's line holds
        where = origins.get("data.task_options")
    return ConfigError(err.key, str(err)[len(err.key) + 2:], where) if where else err


def flat_dict(config) -> dict:
    """``{dotted key: value}`` of a TrainConfig or of its nested dict (tuples as lists)."""
    nested = to_dict(config) if dataclasses.is_dataclass(config) else config
    flat = {}
    for key, value in nested.items():
        if isinstance(value, dict) and key not in ("vllm", "task_options"):
            flat.update({f"{key}.{k}": v for k, v in flat_dict(value).items()})
        else:
            flat[key] = [*value] if isinstance(value, tuple) else value
    return flat


def resume_changes(saved: dict, config: TrainConfig) -> tuple[dict[str, tuple], list[str]]:
    """Compare a checkpoint's config dict ``saved`` with ``config``: ({key: (saved value, new value)} for each
    key that differs, RESUME_FREE keys left out; the keys only one side has, e.g. from another appo version)."""
    old, new = flat_dict(saved), flat_dict(config)
    changes = {key: (old[key], new[key]) for key in new
               if key in old and key not in RESUME_FREE and old[key] != new[key]}
    return changes, sorted(set(old) ^ set(new))

def to_dict(config) -> dict:
    """Plain nested dict (tuples as lists) that round-trips through YAML/JSON and ``from_dict``."""
    def plain(value):
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(dataclasses.asdict(config))
