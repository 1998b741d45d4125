"""Red team, config values: every key's bad values are refused before anything loads, and the error names the key.

Probes: each value the issue found accepted (then failing after the model loaded, after all training, or
silently corrupting the run), then at least one bad value for every other key, through `appo train` on the
command line (one line on stderr, exit status 2, the model never loads) and through ``train(config)`` with a
config changed after loading.
"""

import re

import pytest
import torch

import appo.models
from appo.cli import main
from appo.config import TrainConfig, flat_dict, load_config
from appo.trainer import train

# The values issue 12 found accepted: key -> override.
FOUND = {
    "checkpoint_every": "checkpoint_every=0",
    "keep_checkpoints": "keep_checkpoints=-1",
    "eval_samples": "eval_samples=0",
    "optim.grad_clip": "optim.grad_clip=-1",   # would flip the gradient's sign
    "optim.lr": "optim.lr=-1e-5",
    "optim.betas": "optim.betas=[0.9, 1.0]",
    "data.few_shot": "data.few_shot=-1",
    "device": "device=tpu",
}

# At least one bad value for every key of the config (a type error counts for strings and switches).
BAD = {
    "model.name_or_path": ["''", "7"],
    "model.dtype": ["float8", "fp32"],
    "data.task": ["mnist"],
    "data.path": ["''", "[a]"],
    "data.tool": ["shell"],
    "data.train_size": ["0", "-3", "2.5"],
    "data.eval_size": ["-1"],
    "data.few_shot": ["-1", "99", "true"],
    "data.task_options": ["[1]", "7"],           # each option's checks: tests/test_task_options.py
    "rollout.temperature": ["0", "-0.5", ".nan", ".inf"],
    "rollout.top_p": ["0", "1.5", "-1"],
    "rollout.max_prompt_tokens": ["0", "480"],   # 480: not below max_total_tokens
    "rollout.max_new_tokens_per_turn": ["0"],
    "rollout.max_total_tokens": ["1", "-5"],
    "rollout.max_tool_calls": ["-1"],
    "rollout.result_template": ["'<r></r>'", "'<r>{result}{x}</r>'", "'{result'", "3"],
    "rollout.response_prefix": ["5", "[a]"],
    "rollout.max_batch_rows": ["0", "-2"],
    "rollout.backend": ["sglang"],
    "rollout.vllm": ["[1]", "'{1: 2}'", "{1: 2}"],
    "rollout.stop_tags": ["'</python>'", "[1, 2]"],
    "rollout.reuse_cache": ["sometimes"],
    "algo.name": ["ppo"],
    "algo.rollouts_per_prompt": ["0", "5", "two"],   # 5: APPO needs M = (B + 1) * N
    "algo.initial_rollouts": ["0", "-1"],
    "algo.eps_low": ["-0.1", "1.0"],
    "algo.eps_high": ["-0.1"],
    "algo.tis_cap": ["0", "-2"],
    "algo.kl_coef": ["-0.1"],
    "algo.branch_when": ["always"],
    "algo.warmup_update": ["2"],
    "algo.appo": ["3", "[1]"],
    "algo.appo.branches_per_rollout": ["-1"],
    "algo.appo.bs_gamma": ["0", "1.5", "-0.5"],
    "algo.appo.bs_clip": ["[1.3, 1.2]", "[-1, 1]", "[1.0]"],
    "algo.appo.candidates": ["some"],
    "algo.appo.select_per": ["token"],
    "algo.appo.min_gap": ["-1"],
    "algo.appo.include_token": ["2"],
    "algo.appo.entropy_only": ["maybe", "1"],
    "algo.appo.uniform_points": ["often"],
    "algo.appo.shift_tolerance": ["-1", "21"],
    "algo.appo.fut_gamma": ["0", "2"],
    "algo.appo.fut_clip": ["[1.3, 1.2]", "[-0.5, 1.2]"],
    "algo.appo.future_scale": ["-0.5"],
    "algo.appo.combine": ["max"],
    "algo.appo.one_group": ["yes please"],
    "algo.appo.eps": ["0", "2"],
    "algo.arpo": ["3"],
    "algo.arpo.entropy_window": ["0"],
    "algo.arpo.entropy_weight": ["-0.2"],
    "algo.arpo.branch_threshold": ["1.5", "-0.1"],
    "optim.lr": ["-1e-5", ".nan", ".inf", "fast"],   # 0 is allowed: a no-update diagnostic
    "optim.betas": ["[0.9, 1.0]", "[-0.1, 0.99]", "[0.9]"],
    "optim.weight_decay": ["-0.01"],
    "optim.grad_clip": ["-1", "0"],
    "optim.minibatches_per_step": ["0", "3"],    # 3: 4 prompts do not split into 3 updates
    "optim.grad_accumulation": ["0", "3"],
    "prompts_per_step": ["0", "3"],
    "steps": ["0", "-1"],
    "seed": ["-1", "4294967296"],
    "output_dir": ["''"],
    "device": ["tpu", "cuda:x", "gpu", "7"],
    "threads": ["-1"],
    "eval_every": ["-1"],
    "eval_at_end": ["sometimes"],
    "eval_samples": ["0"],
    "checkpoint_every": ["0", "-3"],
    "keep_checkpoints": ["-1"],
    "attn_implementation": ["fast", "''"],
    "bf16": ["half"],
    "tensorboard": ["on please"],
    "resume": ["perhaps"],
    "allow_config_change": ["maybe"],
}


def names(key):
    """A pattern matching ``key`` as a whole dotted name in an error message ("key:" or "key=")."""
    return re.compile(rf"(^|[^\w.]){re.escape(key)}(\[\d\])?[:=]")


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if anything tries to load a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(appo.models, "load_model", refuse)
    monkeypatch.setattr(appo.models, "tiny_model", refuse)


def test_every_config_key_has_bad_values_probed():
    missing = sorted(set(flat_dict(TrainConfig())) - set(BAD))
    assert not missing, f"add bad values for the new config keys {missing} to BAD (and checks to appo.config)"


@pytest.mark.parametrize("key, value", [(key, value) for key, values in BAD.items() for value in values])
def test_each_bad_value_is_refused_naming_its_key(key, value):
    with pytest.raises(ValueError) as error:
        load_config(None, [f"{key}={value}"])
    assert names(key).search(str(error.value)), str(error.value)


@pytest.mark.parametrize("key", sorted(FOUND))
def test_found_values_stop_appo_train_before_the_model_loads(key, tmp_path, capsys, no_model_load):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", f"output_dir={tmp_path / 'run'}", FOUND[key]])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert names(key).search(err) and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key, value", [
    ("optim.grad_clip", -1.0), ("optim.lr", -1e-5), ("optim.betas", (0.9, 1.0)), ("checkpoint_every", 0),
    ("keep_checkpoints", -1), ("eval_samples", 0), ("data.few_shot", -1), ("device", "tpu"),
    ("optim.lr", float("nan")), ("steps", "6"), ("algo.rollouts_per_prompt", 4.0),
])
def test_train_rechecks_a_config_changed_after_loading(key, value, tmp_path, no_model_load):
    config = load_config(None, [f"output_dir={tmp_path / 'run'}"])
    *parents, name = key.split(".")
    target = config
    for part in parents:
        target = getattr(target, part)
    setattr(target, name, value)
    with pytest.raises(ValueError, match=names(key)):
        train(config)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="probes a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_refused_before_loading(tmp_path, capsys, no_model_load):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", f"output_dir={tmp_path}", "device=cuda"])
    assert exit_info.value.code == 2 and names("device").search(capsys.readouterr().err)


@pytest.mark.parametrize("override, key", [
    ("model.name_or_path=/no/such/model", "model.name_or_path"),
    ("data.path=/no/such/data.jsonl", "data.path"),
])
def test_missing_model_or_data_is_refused_before_loading(override, key, tmp_path, capsys, no_model_load):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", f"output_dir={tmp_path / 'run'}", override])
    assert exit_info.value.code == 2 and names(key).search(capsys.readouterr().err)
