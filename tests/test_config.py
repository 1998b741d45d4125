import dataclasses
import inspect
import re
import types
import typing

import pytest
import yaml

from appo.config import DEFAULT, RANGES, ConfigError, TrainConfig, flat_dict, from_dict, load_config, to_dict


def test_default_parses_as_the_cpu_demo():
    config = load_config()
    assert isinstance(config, TrainConfig)
    assert config.model.name_or_path == "smollm2-135m-instruct"
    assert config.data.tool == "python"
    assert config.algo.algo == "appo"
    assert (config.algo.M, config.algo.N, config.algo.B) == (4, 2, 1)
    assert config.algo.bs_clip == (1.0, 1.2) and config.algo.b == 0.5 and config.algo.combine == "avg"
    assert config.algo.branch_when == "per_minibatch" and config.algo.candidates == "strict"
    assert (config.algo.eps_low, config.algo.eps_high, config.algo.kl_coef) == (0.2, 0.28, 0.0)
    assert config.attn_implementation == "sdpa"
    assert yaml.safe_load(DEFAULT)["algo"]["algo"] == "appo"
    assert config == TrainConfig()  # the embedded YAML and the dataclass defaults agree


def test_yaml_file_then_overrides_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("algo: {algo: grpo, M: 8, bs_clip: [0.9, 1.5], eps_high: 1e-1}\noptim: {lr: 1}\nsteps: 7\n")
    config = load_config(path, ["algo.M=6", "optim.betas=[0.8, 0.95]", "output_dir=out/x",
                                "algo.one_group=true"])
    assert config.algo.algo == "grpo" and config.algo.M == 6 and config.steps == 7
    assert config.algo.bs_clip == (0.9, 1.5) and config.algo.eps_high == 0.1
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    assert config.optim.betas == (0.8, 0.95)
    assert config.output_dir == "out/x" and config.algo.one_group is True
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
    ("algo.M=two", "algo.M"),
    ("optim.lr=fast", "optim.lr"),
    ("algo.algo=ppo", "algo.algo"),
    ("algo.bs_clip=[1.0]", "algo.bs_clip"),
    ("tensorboard=maybe", "tensorboard"),
    ("algo.M=5", "algo.M"),           # APPO needs M = (B + 1) * N
    ("steps=0", "steps"),
    ("optim.grad_accumulation=3", "prompts_per_step"),
    ("rollout.max_prompt_tokens=512", "rollout.max_prompt_tokens"),
    ("algo.M", "overrides"),
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


def numeric_fields(cls, prefix=""):
    """The dotted key of every numeric field (int, float, a tuple of them, optional or not) of the dataclass
    ``cls`` and of the dataclasses it nests. Literal choices are not ranges and are left out."""
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        hint, key = hints[item.name], f"{prefix}{item.name}"
        if dataclasses.is_dataclass(hint):
            yield from numeric_fields(hint, f"{key}.")
        elif is_numeric(hint):
            yield key


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
    """A field added later must come with its range in appo.config.RANGES, both bounds given."""
    keys = [*numeric_fields(TrainConfig), *task_numeric_options()]
    assert len(keys) > 40 and "optim.lr" in keys and "data.task_options.max_operand" in keys
    missing = [key for key in keys if key not in RANGES]
    unbounded = [key for key in keys if key in RANGES and None in (RANGES[key].lo, RANGES[key].hi)]
    assert not missing, f"add a Range for {missing} to appo.config.RANGES"
    assert not unbounded, f"give {unbounded} both bounds in appo.config.RANGES"
    assert not set(RANGES) - set(keys), f"RANGES names no field: {sorted(set(RANGES) - set(keys))}"
    defaults = flat_dict(TrainConfig())
    for key in numeric_fields(TrainConfig):
        values = defaults[key] if isinstance(defaults[key], list) else [defaults[key]]
        assert all(value in RANGES[key] for value in values if value is not None), key


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
