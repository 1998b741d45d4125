"""The trainer's configuration: typed blocks, a YAML file and dotted ``key=value`` overrides.

``load_config(path, ["algo.name=grpo", "optim.lr=2e-6"])`` starts from the dataclass defaults (``TrainConfig()``:
the CPU demo), applies the YAML file, then the overrides (each value parsed with ``yaml.safe_load``). Every
default, range and help text is written once, on its field (``appo.settings.setting``); the blocks are
ModelConfig, DataConfig, ``appo.rollout.config.RolloutConfig`` (rollout), ``appo.algorithms.AlgoConfig``
(algo, with ``appo.algos.chain.APPOSettings`` as algo.appo), OptimConfig and TrainConfig. ``appo train
--print-config`` prints the effective config as YAML that ``--config`` reads back. Unknown keys, old key names
(RENAMED: a one-line hint naming the new key) and bad values (type, range, choice; ``validate``) raise
ConfigError, a ValueError naming the key, and the file and line when the key was set in a file.

Config text is input, hostile or not: a file holds at most MAX_CONFIG_BYTES, the overrides as many together,
nothing nests deeper than MAX_DEPTH levels (a file, an override's value or the mappings data.task_options and
rollout.vllm, aliases expanded), and a key given twice in one mapping, at any depth, is refused naming the key
and both lines. Every numeric field has a bounded range (on the field; RANGES lists them with the tasks'
options), and the text the environment writes into a rollout (rollout.result_template, rollout.response_prefix)
cannot spell a tag the model writes or a special token (``check_result_template``, ``check_response_prefix``).
"""

from __future__ import annotations

import dataclasses
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from appo.algorithms import AlgoConfig, check_algo
from appo.rollout.config import RolloutConfig
from appo.settings import (MAX_DEPTH, ConfigError, Range, check_fields, check_tree, field_range, prefixed,
                           setting, shown, walk)

__all__ = ["RANGES", "RENAMED", "AlgoConfig", "ConfigError", "DataConfig", "ModelConfig", "OptimConfig",
           "Range", "RolloutConfig", "TrainConfig", "dump_yaml", "from_dict", "load_config", "to_dict",
           "validate"]

# Upper bounds: far above any run this library can make, low enough that a typo (threads=1e8, optim.lr=1e308)
# is refused before anything loads instead of hanging or diverging later.
_ITEMS, _GROUP = 10**7, 4096  # a data split or a run's steps; rollouts or updates
_SEED = Range(0, 2**32 - 1)


@dataclass
class ModelConfig:
    """The policy."""

    name_or_path: str = setting("smollm2-135m-instruct", "'smollm2-135m-instruct' or a transformers model "
                                "folder (appo.models.load_model)")
    dtype: Literal["float32", "bfloat16", "float16"] = setting("float32", "the weights' dtype")

    def __post_init__(self):
        check_fields(self)


@dataclass
class DataConfig:
    """The task (``appo.tasks.get_task``) and its splits."""

    task: Literal["gsm8k", "arithmetic", "hotpotqa"] = setting(
        "arithmetic", "the task; arithmetic is generated (nothing to download), gsm8k and hotpotqa read data")
    path: str | None = setting(None, "a local .jsonl file, or a folder holding the task's file (gsm8k, "
                               "hotpotqa); null looks in $APPO_DATA_DIR, then on the Hugging Face hub")
    tool: Literal["python", "calculator", "search"] = setting("python", "the tool's tag")
    train_size: int = setting(256, "the first items of the task's train split", within=Range(1, _ITEMS))
    eval_size: int = setting(32, "the first items of the task's dev split (held-out evaluation)",
                             within=Range(0, _ITEMS))
    few_shot: int = setting(1, "demonstrations in the prompt (appo.tasks.render_prompt)", within=Range(0, 64))
    task_options: dict = setting(
        help="keyword options of the task's constructor, e.g. the arithmetic task's difficulty {max_operands: "
        "4, max_operand: 200} and split sizes {num_dev: 256}; checked against the task's signature and "
        "RANGES; an override data.task_options.max_operand=50 changes that one option", factory=dict)

    def __post_init__(self):
        check_fields(self)


@dataclass
class OptimConfig:
    """AdamW and the PPO mini-batch schedule: a step's prompts are split into ``minibatches_per_step``
    optimizer updates, each accumulated over ``grad_accumulation`` micro-batches (split by prompt)."""

    lr: float = setting(2e-5, "AdamW learning rate; 0 is a real diagnostic (no update, so no mini-batch sees "
                        "a policy shift)", within=Range(0, 1))
    betas: tuple[float, float] = setting((0.9, 0.999), "AdamW betas", within=Range(0, 1, open_hi=True))
    weight_decay: float = setting(0.0, "AdamW weight decay", within=Range(0, 10))
    grad_clip: float = setting(1.0, "gradient norm clip", within=Range(0, 10**6, open_lo=True))
    minibatches_per_step: int = setting(2, "optimizer updates per step", within=Range(1, _GROUP))
    grad_accumulation: int = setting(1, "micro-batches per update", within=Range(1, _GROUP))

    def __post_init__(self):
        check_fields(self)


@dataclass
class TrainConfig:
    """Everything one run needs; the defaults are the CPU demo.

    The demo: SmolLM2-135M-Instruct on the procedural arithmetic task (nothing to download) with a python tool
    and one demonstration in the prompt; 16 steps of APPO with a tiny budget (4 prompts x N=2, B=1 -> M=4),
    then a held-out evaluation on 32 dev questions (README, "Quick start", has what it measured). Checkpoints
    at steps 8 and 16 (1.6 GB each: weights and AdamW state). The response opens with "<python>" so the 135M
    model starts with a tool call (rollout.response_prefix). GSM8K is one override away: data.task=gsm8k (data
    from data.path, $APPO_DATA_DIR or the Hugging Face hub). Override any key on the command line, e.g.
    ``appo train steps=2 algo.name=grpo``.
    """

    model: ModelConfig = setting(help="the policy", factory=ModelConfig)
    data: DataConfig = setting(help="the task and its splits", factory=DataConfig)
    rollout: RolloutConfig = setting(help="sampling and the tool loop (appo.rollout.config)",
                                     factory=RolloutConfig)
    algo: AlgoConfig = setting(help="the algorithm and its blocks (appo.algorithms)", factory=AlgoConfig)
    optim: OptimConfig = setting(help="AdamW and the mini-batch schedule", factory=OptimConfig)
    prompts_per_step: int = setting(4, "prompts per step", within=Range(1, 2**16))
    steps: int = setting(16, "optimizer steps of the run (each of optim.minibatches_per_step updates)",
                         within=Range(1, _ITEMS))
    seed: int = setting(0, "seeds torch, the data order, the rollout engine and the algorithms' draws",
                        within=_SEED)
    output_dir: str = setting("runs/appo-demo", "metrics.jsonl, checkpoints/, config.yaml and curves.png")
    device: str = setting("auto", "auto (the GPU when there is one), cpu, cuda or cuda:<index>")
    threads: int = setting(0, "torch CPU threads (0: torch's default, all cores); give each of several jobs "
                           "sharing a machine its own share (e.g. 1): oversubscribed threads slow small "
                           "matmuls down by an order of magnitude", within=Range(0, 1024))
    eval_every: int = setting(0, "held-out evaluation every this many steps (0: never during training)",
                              within=Range(0, _ITEMS))
    eval_at_end: bool = setting(True, "held-out evaluation after the last step")
    eval_samples: int = setting(1, "rollouts per held-out question (pass@k with k = eval_samples)",
                                within=Range(1, 1024))
    checkpoint_every: int = setting(8, "save a checkpoint every this many steps (and at the last)",
                                    within=Range(1, _ITEMS))
    keep_checkpoints: int = setting(2, "checkpoints kept (the newest; 0 keeps all)", within=Range(0, 10**4))
    attn_implementation: str = setting("sdpa", "transformers attention: one of ATTENTION (sdpa, eager, "
                                       "flash_attention_2/3/4, flex_attention) or a hub kernel 'org/repo'")
    bf16: bool = setting(True, "autocast to bf16 on GPU (ignored on CPU)")
    tensorboard: bool = setting(False, "also log to tensorboard (needs the tensorboard package)")
    resume: bool = setting(True, "continue from output_dir's latest checkpoint")
    allow_config_change: bool = setting(False, "resume with a config that differs from the checkpoint's "
                                        "(each change is applied and logged)")

    def __post_init__(self):
        check_fields(self)


# Old key names (the issue of one home per setting renamed what did not explain itself and moved APPO's knobs
# into their block): each fails with a one-line hint naming the new key.
RENAMED: dict[str, str] = {
    "algo.algo": "algo.name", "algo.M": "algo.rollouts_per_prompt", "algo.N": "algo.initial_rollouts",
    "algo.B": "algo.appo.branches_per_rollout", "algo.b": "algo.appo.future_scale",
    "algo.per": "algo.appo.select_per", "algo.arpo_k": "algo.arpo.entropy_window",
    "algo.arpo_beta": "algo.arpo.entropy_weight", "algo.arpo_tau": "algo.arpo.branch_threshold",
    **{f"algo.{name}": f"algo.appo.{name}" for name in (
        "bs_gamma", "bs_clip", "candidates", "fut_gamma", "fut_clip", "combine", "entropy_only", "one_group",
        "min_gap", "include_token", "uniform_points", "shift_tolerance")},
}
# The ranges of the tasks' numeric constructor options (data.task_options.<name>), which are not fields.
TASK_OPTION_RANGES: dict[str, Range] = {
    "data.task_options.num_train": Range(0, _ITEMS), "data.task_options.num_dev": Range(0, _ITEMS),
    "data.task_options.dev_size": Range(0, _ITEMS), "data.task_options.min_operands": Range(1, 64),
    "data.task_options.max_operands": Range(1, 64), "data.task_options.max_operand": Range(1, 10**12),
    "data.task_options.seed": _SEED,
}
# Every numeric key's range, read off the fields (a view for tests and docs; the fields are the source).
RANGES: dict[str, Range] = {**{key: field_range(item) for key, item, _ in walk(TrainConfig)
                               if field_range(item) is not None}, **TASK_OPTION_RANGES}
ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
# Keys that may differ between a run and its resume without allow_config_change: where the run is, how long it
# runs, how often it evaluates and saves, and how fast it computes; not what it trains on or how.
RESUME_FREE = frozenset({
    "steps", "output_dir", "resume", "allow_config_change", "device", "threads", "attn_implementation",
    "eval_every", "eval_at_end", "eval_samples", "checkpoint_every", "keep_checkpoints", "tensorboard",
    "data.eval_size", "data.path", "rollout.max_batch_rows", "rollout.reuse_cache",
})

# Limits on config text: a config file's bytes (and the overrides' characters, all together), and the nesting
# of a file and of an override's value (aliases expanded; appo.settings.MAX_DEPTH, which also bounds a mapping
# option). The deepest key the config has is 3 levels down (data.task_options.<name>, algo.appo.<name>).
MAX_CONFIG_BYTES = 256 * 1024


def _apply(block, updates: dict, prefix: str = ""):
    """A copy of the dataclass ``block`` with the nested mapping ``updates`` written in (each block built anew,
    so its constructor checks the values). Unknown and renamed keys raise ConfigError naming them."""
    if not isinstance(updates, dict):
        raise ConfigError(prefix.rstrip(".") or "config", f"expected a mapping, got {shown(updates)}")
    names = [item.name for item in dataclasses.fields(block)]
    changes = {}
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if key in RENAMED:
            raise ConfigError(key, f"renamed: use {RENAMED[key]} (docs/method.md, section 2)")
        if name not in names:
            raise ConfigError(key, f"unknown config key (known: {', '.join(sorted(names))})")
        current = getattr(block, name)
        if dataclasses.is_dataclass(current):
            changes[name] = _apply(current, value, f"{key}.")
        elif name == "task_options" and isinstance(current, dict) and isinstance(value, dict):
            changes[name] = {**current, **value}  # one option at a time
        else:
            changes[name] = value
    try:
        return dataclasses.replace(block, **changes)
    except ConfigError as err:
        raise prefixed(err, prefix) from None


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
    """``"algo.name=grpo"`` -> ``{"algo": {"name": "grpo"}}`` (the value parsed as YAML, as ``yaml.safe_load``
    does, nested at most MAX_DEPTH deep)."""
    if "=" not in text:
        raise ConfigError("overrides", f"expected key=value, got {shown(text)}")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if not all(parts) or len(parts) > MAX_DEPTH:
        raise ConfigError("overrides", f"malformed key in {shown(text)}")
    try:
        value = _load_yaml(raw)[0] if raw.strip() else ""
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError("overrides", f"{shown(text)}: the value is not valid YAML ({problem})") from None
    except ValueError as err:  # _NestingError, or a scalar Python refuses
        raise ConfigError("overrides", f"{shown(text)}: the value is {err}") from None
    nested: dict = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    return nested


def _check_text(config: TrainConfig) -> None:
    """The string fields: non-empty names and paths, the device and attention choices, the result template."""
    for key, value in (("model.name_or_path", config.model.name_or_path), ("output_dir", config.output_dir),
                       ("data.path", getattr(config.data, "path", None))):
        if value is not None and (not value.strip() or "\0" in value):
            raise ConfigError(key, f"expected a non-empty name or path, got {shown(value)}")
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
                          f"writes {extra[0]!r}, got {shown(text)}")


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
                          f"{shown(template)}")
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
                              f"{problem}, got {shown(template)}")


def _check_rules(config: TrainConfig) -> None:
    """The rules between fields."""
    optim, rollout = config.optim, config.rollout
    check_algo(config.algo)  # the algorithm's own rules (appo.algorithms: Algorithm.check)
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
            raise ConfigError(key, f"expected {kind.__name__}, got {shown(value)}")
        allowed = TASK_OPTION_RANGES.get(key)
        if allowed is not None and value not in allowed:
            raise ConfigError(key, f"must be {allowed}, got {shown(value)}")
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
    """Check every value of ``config`` as its blocks' constructors do (type, range, choices; numbers converted
    in place: int -> float, list -> tuple), for a config changed after it was built, then the rules between
    fields and blocks (the algorithm's own: ``appo.algorithms.check_algo``). Returns ``config``. Raises
    ConfigError (a ValueError) naming the dotted key. Cheap and machine-independent (``check_available``
    checks what the machine has), so it runs before anything loads."""
    check_tree(config)
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
    return validate(_apply(TrainConfig(), data))


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
    """The dataclass defaults (``TrainConfig()``), then the YAML file at ``path`` (if given), then each
    ``key=value`` override, validated. Every error names the key; one about a key set in the file also names
    the file and the line."""
    merged: dict = {}
    origins: dict[str, str] = {}
    if path is not None:
        merged, lines = read_yaml(path)
        origins = {key: f"{path}:{line}" for key, line in lines.items()}
    if sum(len(text) for text in overrides) > MAX_CONFIG_BYTES:
        raise ConfigError("overrides", f"{sum(len(text) for text in overrides)} characters in all, more than "
                          f"{MAX_CONFIG_BYTES} (MAX_CONFIG_BYTES, the limit of config text)")
    for text in overrides:
        nested = _parse_override(text)
        _merge(merged, nested)
        for key in _leaf_keys(nested):
            origins.pop(key, None)
    try:  # one pass over file and overrides together: an override may replace a bad value of the file
        return validate(_apply(TrainConfig(), merged))
    except ConfigError as err:
        raise _located(err, origins) from None


def _merge(into: dict, updates: dict) -> None:
    """Write the nested mapping ``updates`` (an override) into ``into`` (the file's mapping): mappings merge
    key by key down to a field, except that a field's new value replaces the old one whole (data.task_options
    merges option by option when ``_apply`` writes it)."""
    for name, value in updates.items():
        if isinstance(value, dict) and isinstance(into.get(name), dict) and name not in ("vllm", "task_options"):
            _merge(into[name], value)
        elif name == "task_options" and isinstance(value, dict) and isinstance(into.get(name), dict):
            into[name] = {**into[name], **value}
        else:
            into[name] = value


def _located(err: ConfigError, origins: dict[str, str]) -> ConfigError:
    """``err`` with the file and line its key was set on in front, when it was set in a file."""
    key = err.key.split("[")[0]
    where = origins.get(key)
    if where is None and key.startswith("data.task_options."):  # an option the mapping's line holds
        where = origins.get("data.task_options")
    return ConfigError(err.key, err.message, where) if where else err


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
    old = {RENAMED.get(key, key): value for key, value in flat_dict(saved).items()}  # an older run's names
    new = flat_dict(config)
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


class _Dumper(yaml.SafeDumper):
    """YAML with a multi-line string written as one double-quoted scalar ("...\\n")."""


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style='"' if "\n" in text else None))


def dump_yaml(config: TrainConfig) -> str:
    """``config`` as the YAML text ``load_config`` reads back to an equal config (``appo train --print-config``
    prints it; a run writes it to output_dir/config.yaml), keys in declaration order."""
    return yaml.dump(to_dict(config), Dumper=_Dumper, sort_keys=False)
