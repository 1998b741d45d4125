"""Red team, resume: a run continues only from an intact checkpoint, with the config and data it was saved with
(or changes it is told to apply, really applied and logged), and its metrics.jsonl keeps one record per step.

Runs the real ``appo.trainer.train`` on a tiny random Llama with a character tokenizer and a toy reward (CPU,
about a second a run).
"""

import json

import pytest
import torch
from fakes import CharTokenizer, VowelTask

import appo.models
from appo.checkpoint import CheckpointError, CheckpointWarning, ResumeError, save_checkpoint
from appo.cli import main
from appo.config import load_config
from appo.metrics import read_metrics
from appo.models import tiny_model
from appo.trainer import TaskData, Trainer, train

QUESTIONS = ("abc", "xyz!", "q7", "hello")


def make_config(out, *overrides):
    return load_config(None, [f"output_dir={out}", "device=cpu", "threads=1", "checkpoint_every=1",
                              "keep_checkpoints=3", "prompts_per_step=2", "optim.minibatches_per_step=1",
                              "optim.lr=1e-2", "rollout.temperature=1.0", "rollout.response_prefix=''",
                              "rollout.max_new_tokens_per_turn=6", "rollout.max_total_tokens=16",
                              "rollout.max_prompt_tokens=8", "eval_at_end=false", *overrides])


def run(out, *overrides, steps, questions=QUESTIONS):
    """train() for ``steps`` steps into ``out``; returns its summary."""
    tokenizer = CharTokenizer()
    prompts = [tokenizer.encode(q) for q in questions]
    data = TaskData(VowelTask(), [None] * len(prompts), prompts)
    model = tiny_model("llama", vocab_size=len(tokenizer.vocab), hidden_size=16, layers=1, heads=2,
                       kv_heads=1, seed=0)
    return train(make_config(out, f"steps={steps}", *overrides), model=model, tokenizer=tokenizer,
                 train_data=data, tools={})


def steps_logged(out):
    return [record["step"] for record in read_metrics(out / "metrics.jsonl")]


@pytest.fixture
def count_steps(monkeypatch):
    """The number of training steps run so far (Trainer.step calls)."""
    calls = []
    step = Trainer.step
    monkeypatch.setattr(Trainer, "step", lambda self: calls.append(self.step_count) or step(self))
    return calls


@pytest.fixture
def no_trainer(monkeypatch):
    """Fail the test if a Trainer (model, data, engine) is built: the check must come before it."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("the trainer was built before the resume was checked")

    monkeypatch.setattr(Trainer, "__init__", refuse)


def test_changed_values_are_refused_naming_each_key_before_anything_loads(tmp_path, monkeypatch):
    out = tmp_path / "run"
    run(out, steps=1)
    saved_yaml = (out / "config.yaml").read_text()
    monkeypatch.setattr(Trainer, "__init__", lambda self, *a, **k: pytest.fail("built before the check"))
    with pytest.raises(ResumeError) as error:
        run(out, "optim.lr=2e-2", "optim.weight_decay=0.1", "algo.name=grpo", "prompts_per_step=4", steps=2)
    message = str(error.value)
    for change in ("optim.lr: 0.01 -> 0.02", "optim.weight_decay: 0.0 -> 0.1", "algo.name: 'appo' -> 'grpo'",
                   "prompts_per_step: 2 -> 4"):
        assert change in message, message
    assert "--allow-config-change" in message
    assert (out / "config.yaml").read_text() == saved_yaml and steps_logged(out) == [1]


def test_run_control_keys_may_change_without_the_flag(tmp_path, count_steps):
    out = tmp_path / "run"
    run(out, steps=1)
    run(out, "eval_every=5", "keep_checkpoints=2", "threads=1", steps=2)  # steps and these are free to change
    assert count_steps == [0, 1] and steps_logged(out) == [1, 2]


def test_with_the_flag_a_changed_lr_is_applied_to_the_optimizer_and_logged(tmp_path):
    out = tmp_path / "run"
    run(out, steps=1)
    with pytest.warns(CheckpointWarning, match=r"optim\.lr: 0\.01 -> 0\.05"):
        run(out, "optim.lr=5e-2", "optim.betas=[0.5, 0.9]", "optim.weight_decay=0.1",
            "allow_config_change=true", steps=2)
    optimizer_state = torch.load(out / "checkpoints" / "step-00000002" / "optimizer.pt", weights_only=True)
    group = optimizer_state["param_groups"][0]
    assert (group["lr"], tuple(group["betas"]), group["weight_decay"]) == (5e-2, (0.5, 0.9), 0.1)
    logged = [json.loads(line) for line in (out / "config_changes.jsonl").read_text().splitlines()]
    assert logged == [{"step": 1, "changes": {"optim.lr": {"from": 0.01, "to": 0.05},
                                              "optim.betas": {"from": [0.9, 0.999], "to": [0.5, 0.9]},
                                              "optim.weight_decay": {"from": 0.0, "to": 0.1}}}]
    assert "lr: 0.05" in (out / "config.yaml").read_text()


def test_restore_puts_the_new_lr_into_the_param_groups(tmp_path):
    """What the flag promises, on the Trainer itself: AdamW's saved lr does not win over the config's."""
    out = tmp_path / "run"
    run(out, steps=1)
    tokenizer = CharTokenizer()
    prompts = [tokenizer.encode(q) for q in QUESTIONS]
    model = tiny_model("llama", vocab_size=len(tokenizer.vocab), hidden_size=16, layers=1, heads=2,
                       kv_heads=1, seed=0)
    trainer = Trainer(make_config(out, "optim.lr=3e-2", "allow_config_change=true"), model=model,
                      tokenizer=tokenizer, train_data=TaskData(VowelTask(), [None] * 4, prompts), tools={})
    assert trainer.restore(out / "checkpoints") == 1
    assert [group["lr"] for group in trainer.optimizer.param_groups] == [3e-2] * len(trainer.optimizer.param_groups)
    assert trainer.optimizer.state  # the AdamW moments came from the checkpoint


def test_the_seed_cannot_change_even_with_the_flag(tmp_path, no_trainer):
    out = tmp_path / "run"
    save_checkpoint(out / "checkpoints", 1, torch.nn.Linear(2, 2), None, make_config(out))
    with pytest.raises(ResumeError, match=r"seed: cannot change on resume.*0 -> 5"):
        train(make_config(out, "seed=5", "allow_config_change=true"), model=torch.nn.Linear(2, 2))


def test_metrics_steps_stay_unique_after_a_kill(tmp_path, monkeypatch, count_steps):
    out = tmp_path / "run"
    save = Trainer.save

    def killed_at_step_3(self, directory):
        if self.step_count == 3:
            raise KeyboardInterrupt("SIGKILL stand-in: step 3 logged, its checkpoint never written")
        return save(self, directory)

    monkeypatch.setattr(Trainer, "save", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(out, "checkpoint_every=2", steps=3)
    monkeypatch.setattr(Trainer, "save", save)
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 4, "reward": 0.')  # and a line torn by the kill
    assert steps_logged(out) == [1, 2, 3]
    with pytest.warns(UserWarning, match="removed the records of steps 3..3"):
        run(out, "checkpoint_every=2", steps=4)
    assert steps_logged(out) == [1, 2, 3, 4] and count_steps == [0, 1, 2, 2, 3]
    assert (out / "metrics.jsonl").read_text().endswith("}\n")


def test_a_smaller_dataset_is_a_clear_error_not_an_index_error(tmp_path):
    out = tmp_path / "run"
    run(out, steps=1)
    with pytest.raises(ResumeError, match=r"train data: .* order over 4 prompts, but the training data now has 3"):
        run(out, steps=2, questions=QUESTIONS[:3])


def test_other_prompts_of_the_same_count_are_refused_unless_allowed(tmp_path, count_steps):
    out = tmp_path / "run"
    run(out, steps=1)
    other = ("abd", "xyz?", "q8", "hellO")
    with pytest.raises(ResumeError, match="the 4 training prompts differ"):
        run(out, steps=2, questions=other)
    with pytest.warns(UserWarning, match="going on with them in the saved order"):
        run(out, "allow_config_change=true", steps=2, questions=other)
    assert steps_logged(out) == [1, 2]


def test_resume_false_over_existing_checkpoints_is_refused(tmp_path, no_trainer):
    out = tmp_path / "run"
    save_checkpoint(out / "checkpoints", 3, torch.nn.Linear(2, 2), None, make_config(out))
    with pytest.raises(ResumeError, match="resume: false, but .* holds checkpoints up to step-00000003"):
        train(make_config(out, "resume=false"), model=torch.nn.Linear(2, 2))


@pytest.mark.parametrize("lose", ["latest", "meta.json of the newest"])
def test_a_lost_pointer_or_meta_never_restarts_from_step_0(tmp_path, count_steps, lose):
    out = tmp_path / "run"
    run(out, steps=2)
    if lose == "latest":
        (out / "checkpoints" / "latest").unlink()
        resumed_at = 2
    else:
        (out / "checkpoints" / "step-00000002" / "meta.json").unlink()
        resumed_at = 1
    with pytest.warns(CheckpointWarning):
        run(out, steps=3)
    assert count_steps == [0, 1, *range(resumed_at, 3)]
    assert steps_logged(out) == [1, 2, 3]


def test_a_truncated_newest_checkpoint_resumes_from_the_previous_one(tmp_path, count_steps):
    out = tmp_path / "run"
    run(out, steps=2)
    file = out / "checkpoints" / "step-00000002" / "model.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    with pytest.warns(CheckpointWarning, match=r"step-00000002/model\.safetensors: 100 bytes, expected"):
        run(out, steps=3)
    assert count_steps == [0, 1, 1, 2]  # steps 2 and 3 rerun from the step-1 checkpoint
    assert steps_logged(out) == [1, 2, 3]
    assert (out / "checkpoints" / "damaged-step-00000002" / "model.safetensors").stat().st_size == 100


def test_no_intact_checkpoint_stops_appo_train_in_one_line_before_the_model_loads(tmp_path, capsys,
                                                                                   monkeypatch):
    out = tmp_path / "run"
    model = torch.nn.Linear(2, 2)
    for step in (1, 2):
        save_checkpoint(out / "checkpoints", step, model, None, make_config(out))
        (out / "checkpoints" / f"step-{step:08d}" / "state.pt").write_bytes(b"damaged")
    monkeypatch.setattr(appo.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exit_info, pytest.warns(CheckpointWarning):
        main(["train", f"output_dir={out}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and len(err.strip().splitlines()) == 1
    assert "step-00000002/state.pt" in err and "step-00000001/state.pt" in err
    with pytest.raises(CheckpointError):  # the Python API says the same
        train(make_config(out), model=model)
