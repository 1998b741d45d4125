import ast
import dataclasses
import inspect
import re
import types
import typing
from pathlib import Path

import pytest
import yaml

import appo
from appo.algorithms import ALGORITHMS
from appo.algos import APPOSettings
from appo.config import (RANGES, RENAMED, TASK_OPTION_RANGES, ConfigError, TrainConfig, flat_dict, from_dict,
                         load_config, to_dict)
from appo.rollout.config import RolloutConfig
from appo.settings import field_range, walk


def test_default_parses_as_the_cpu_demo():
    config = load_config()
    assert isinstance(config, TrainConfig)
    assert config.model.name_or_path == "smollm2-135m-instruct"
    assert config.data.tool == "python"
    assert config.algo.name == "appo"
    algo = config.algo
    assert (algo.rollouts_per_prompt, algo.initial_rollouts, algo.appo.branches_per_rollout) == (4, 2, 1)
    assert algo.appo.bs_clip == (1.0, 1.2) and algo.appo.future_scale == 0.5 and algo.appo.combine == "avg"
    assert algo.branch_when == "per_minibatch" and algo.appo.candidates == "strict"
    assert (algo.eps_low, algo.eps_high, algo.kl_coef) == (0.2, 0.28, 0.0)
    rollout = config.rollout
    assert (rollout.temperature, rollout.max_new_tokens_per_turn, rollout.response_prefix) == (0.7, 64, "<python>")
    assert config.attn_implementation == "sdpa"
    assert config == TrainConfig()  # load_config with nothing given is the dataclass defaults


def test_one_class_and_one_set_of_defaults_per_block():
    """The engine and the trainer share RolloutConfig (one set of defaults, the CPU demo's); the trainer's
    algo.appo block is the APPOSettings that TRL and verl build, with its defaults."""
    assert TrainConfig().rollout == RolloutConfig() and type(TrainConfig().rollout) is RolloutConfig
    assert TrainConfig().algo.appo == APPOSettings() and type(TrainConfig().algo.appo) is APPOSettings
    from appo.rollout import engine, tool_loop, vllm
    assert engine.RolloutConfig is tool_loop.RolloutConfig is vllm.RolloutConfig is RolloutConfig


def _literal_tables(tree):
    """Each literal mapping in a module: a dict display, a dict(...) call's keywords, and a string constant
    that YAML reads as a mapping; as [(key, value)] with the values that are literals."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            yield [(k.value, v.value) for k, v in zip(node.keys, node.values)
                   if isinstance(k, ast.Constant) and isinstance(v, ast.Constant)]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "dict":
            yield [(k.arg, k.value.value) for k in node.keywords if isinstance(k.value, ast.Constant)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and ":" in node.value:
            try:
                loaded = yaml.safe_load(node.value)
            except yaml.YAMLError:
                continue
            if isinstance(loaded, dict):
                yield list(flat_dict(loaded).items()) + [(k.rsplit(".", 1)[-1], v)
                                                          for k, v in flat_dict(loaded).items()]


def _defaults_repeated(table, defaults):
    """The names whose value in ``table`` equals (type included) a default of a config field of that name."""
    return {name for name, value in table if isinstance(name, str)
            and any(value == d and type(value) is type(d) for d in defaults.get(name, ()))}


def test_no_second_table_of_the_defaults_exists_in_the_package():
    """Each default is written once, on its field: no module holds a literal table (a dict, a dict(...) call,
    a YAML string) repeating three or more of the config's defaults, as appo/config.py's DEFAULT did."""
    defaults = {}
    for key, value in flat_dict(TrainConfig()).items():
        defaults.setdefault(key.rsplit(".", 1)[-1], []).append(value)
    tables = []
    for path in sorted(Path(appo.__file__).parent.rglob("*.py")):
        for table in _literal_tables(ast.parse(path.read_text())):
            repeated = _defaults_repeated(table, defaults)
            if len(repeated) >= 3:
                tables.append((str(path), sorted(repeated)))
    assert not tables, f"a second table of defaults: {tables}"
    planted = "model: {name_or_path: smollm2-135m-instruct}\nsteps: 16\nprompts_per_step: 4\nseed: 7\n"
    found = [_defaults_repeated(t, defaults) for t in _literal_tables(ast.parse(f"X = {planted!r}"))]
    assert {"name_or_path", "steps", "prompts_per_step"} in found    # the scan does see such a table


def test_config_module_switches_on_no_algorithm_name():
    """The algorithms' rules live with them (appo.algorithms: Algorithm.check); config.py names none."""
    tree = ast.parse(Path(appo.__file__).with_name("config.py").read_text())
    named = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)} & set(ALGORITHMS)
    assert not named


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_every_old_key_fails_with_a_hint_naming_the_new_one(old, tmp_path):
    new = RENAMED[old]
    value = yaml.safe_dump(flat_dict(TrainConfig())[new], default_flow_style=True).strip().removesuffix("...")
    hint = rf"{re.escape(old)}: renamed: use {re.escape(new)} "
    with pytest.raises(ConfigError, match=rf"^{hint}"):
        load_config(None, [f"{old}={value.strip()}"])
    path = tmp_path / "old.yaml"
    *parents, name = old.split(".")
    path.write_text("steps: 3\n" + "".join(f"{'  ' * i}{p}:\n" for i, p in enumerate(parents))
                    + f"{'  ' * len(parents)}{name}: {value.strip()}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:{2 + len(parents)}: {hint}"):
        load_config(path)
    assert len(str(ConfigError(old, "x")).splitlines()) == 1


def test_a_range_is_written_once_on_its_field_and_checked_where_the_block_is_built():
    """bs_gamma has one range, (0, 1], on APPOSettings' field: the trainer's key reads that field's Range, and
    the block refuses a bad value when it is built, whoever builds it (load_config, TRL, verl)."""
    bs_gamma = next(item for item in dataclasses.fields(APPOSettings) if item.name == "bs_gamma")
    assert RANGES["algo.appo.bs_gamma"] is field_range(bs_gamma) and str(field_range(bs_gamma)) == "in (0, 1]"
    assert APPOSettings(bs_gamma=1).bs_gamma == 1.0 and isinstance(APPOSettings(bs_gamma=1).bs_gamma, float)
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match=r"^bs_gamma: must be in \(0, 1\]"):
            APPOSettings(bs_gamma=bad)
        with pytest.raises(ConfigError, match=r"^algo\.appo\.bs_gamma: must be in \(0, 1\]"):
            load_config(None, [f"algo.appo.bs_gamma={bad}"])
    with pytest.raises(ConfigError, match=r"^temperature: must be in \(0, 10\]"):
        RolloutConfig(temperature=0)


def test_every_field_has_help_text():
    missing = [key for key, item, _ in walk(TrainConfig) if not item.metadata.get("help")]
    assert not missing, f"give {missing} a help text (appo.settings.setting)"


def test_yaml_file_then_overrides_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("algo: {name: grpo, rollouts_per_prompt: 8, appo: {bs_clip: [0.9, 1.5]}, eps_high: 1e-1}\n"
                    "optim: {lr: 1}\nsteps: 7\n")
    config = load_config(path, ["algo.rollouts_per_prompt=6", "optim.betas=[0.8, 0.95]", "output_dir=out/x",
                                "algo.appo.one_group=true"])
    assert config.algo.name == "grpo" and config.algo.rollouts_per_prompt == 6 and config.steps == 7
    assert config.algo.appo.bs_clip == (0.9, 1.5) and config.algo.eps_high == 0.1
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    assert config.optim.betas == (0.8, 0.95)
    assert config.output_dir == "out/x" and config.algo.appo.one_group is True
    dumped = tmp_path / "dump.yaml"
    dumped.write_text(yaml.safe_dump(to_dict(config)))
    assert load_config(dumped) == config
    assert from_dict(to_dict(config)) == config


@pytest.mark.parametrize("override, key", [
    ("algo.nope=1", "algo.nope"),
    ("nope=1", "nope"),
    ("model.name_or_path.deeper=1", "model.name_or_path"),
])
def test_unknown_keys_are_named(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("override, key", [
    ("algo.rollouts_per_prompt=two", "algo.rollouts_per_prompt"),
    ("optim.lr=fast", "optim.lr"),
    ("algo.name=ppo", "algo.name"),
    ("algo.appo.bs_clip=[1.0]", "algo.appo.bs_clip"),
    ("tensorboard=maybe", "tensorboard"),
    ("algo.rollouts_per_prompt=5", "algo.rollouts_per_prompt"),           # APPO needs M = (B + 1) * N
    ("steps=0", "steps"),
    ("optim.grad_accumulation=3", "prompts_per_step"),
    ("rollout.max_prompt_tokens=512", "rollout.max_prompt_tokens"),
    ("algo.rollouts_per_prompt", "overrides"),
    ("rollout.backend=sglang", "rollout.backend"),
    ("rollout.vllm=[1]", "rollout.vllm"),
    ("rollout.max_batch_rows=0", "rollout.max_batch_rows"),
])
def test_bad_values_are_named(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_key_in_file_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rollout: {temprature: 0.7}\n")
    with pytest.raises(ValueError, match=r"rollout\.temprature"):
        load_config(path)
    with pytest.raises(ValueError, match="path"):
        load_config(tmp_path / "missing.yaml")


def numeric_fields(cls):
    """The dotted key and field of every numeric field (int, float, a tuple of them, optional or not) of the
    dataclass ``cls`` and of the blocks it nests. Literal choices are not ranges and are left out."""
    return [(key, item) for key, item, hint in walk(cls) if is_numeric(hint)]


def is_numeric(hint):
    if typing.get_origin(hint) in (typing.Union, types.UnionType, tuple):
        return any(is_numeric(arg) for arg in typing.get_args(hint))
    return hint in (int, float)


def task_numeric_options():
    """``data.task_options.<name>`` of every numeric keyword option of every task's constructor."""
    from appo.tasks import TASKS

    return sorted({f"data.task_options.{name}" for task in TASKS.values()
                   for name, param in inspect.signature(task.__init__).parameters.items()
                   if type(param.default) in (int, float)})


def test_every_numeric_field_and_task_option_has_a_bounded_range():
    """A field added later must come with its range on the field (setting(..., within=Range(lo, hi))), both
    bounds given; a task's numeric option, in appo.config.TASK_OPTION_RANGES."""
    fields = numeric_fields(TrainConfig)
    keys = [key for key, _ in fields]
    assert len(keys) > 40 and "optim.lr" in keys and "algo.appo.bs_gamma" in keys
    missing = [key for key, item in fields if field_range(item) is None]
    unbounded = [key for key, item in fields if field_range(item) and None in (field_range(item).lo,
                                                                               field_range(item).hi)]
    assert not missing, f"give {missing} a Range on the field (appo.settings.setting(..., within=...))"
    assert not unbounded, f"give {unbounded} both bounds"
    options = task_numeric_options()
    assert "data.task_options.max_operand" in options and set(options) == set(TASK_OPTION_RANGES)
    assert all(None not in (r.lo, r.hi) for r in TASK_OPTION_RANGES.values())
    assert set(RANGES) == set(keys) | set(options)
    defaults = flat_dict(TrainConfig())
    for key, item in fields:
        values = defaults[key] if isinstance(defaults[key], list) else [defaults[key]]
        assert all(value in field_range(item) for value in values if value is not None), key


def text_fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[item.name]):
            yield from text_fields(hints[item.name], f"{prefix}{item.name}.")
        elif hints[item.name] is str:
            yield f"{prefix}{item.name}"


@pytest.mark.parametrize("key", [key for key in text_fields(TrainConfig)
                                 if key.endswith(("template", "prefix"))])
def test_every_template_refuses_the_models_tags(key):
    """Text the environment writes into a rollout (a *_template or *_prefix field) cannot spell <answer>."""
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: .*it writes '<answer>'"):
        load_config(None, [f"{key}='<answer>{{result}}</answer>'"])
