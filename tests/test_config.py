import pytest
import yaml

from appo.config import DEFAULT, TrainConfig, from_dict, load_config, to_dict


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
    path.write_text("algo: {algo: grpo, M: 8, bs_clip: [0.9, 1.5], eps_high: 1e-1}\noptim: {lr: 3}\nsteps: 7\n")
    config = load_config(path, ["algo.M=6", "optim.betas=[0.8, 0.95]", "output_dir=out/x",
                                "algo.one_group=true"])
    assert config.algo.algo == "grpo" and config.algo.M == 6 and config.steps == 7
    assert config.algo.bs_clip == (0.9, 1.5) and config.algo.eps_high == 0.1
    assert config.optim.lr == 3.0 and isinstance(config.optim.lr, float)
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
