import json
import sys
import types

import pytest
import yaml

from appo.algorithms import ALGORITHMS
from appo.cli import build_parser, main
from appo.config import TrainConfig, load_config, to_dict


@pytest.fixture
def fake_trainer(monkeypatch):
    """Replace appo.trainer by a recorder, so the CLI is tested without training anything."""
    calls = []
    module = types.ModuleType("appo.trainer")

    def train(config):
        calls.append(("train", config))
        return {"algo": config.algo.name, "steps": config.steps, "output_dir": "runs/x",
                "metrics": "runs/x/metrics.jsonl", "plot": "runs/x/curves.png",
                "last_step": {"reward": 0.25, "accuracy": 0.5, "tool_calls": 1.0, "time/step": 3.0,
                              "time/rollout": 2.0, "time/update": 1.0},
                "mean_reward": 0.2, "mean_time_per_step": 3.5,
                "eval": {"items": 4, "pass@1": 0.25, "pass@k": 0.5, "k": 2, "tool_calls": 1.5}}

    module.train = train

    def evaluate(config, **kwargs):
        calls.append(("eval", config, kwargs))
        return {"accuracy": 0.5, "items": 2}

    module.evaluate = evaluate
    monkeypatch.setitem(sys.modules, "appo.trainer", module)
    return calls


def test_train_applies_file_then_algo_then_overrides(tmp_path, fake_trainer):
    path = tmp_path / "run.yaml"
    path.write_text("algo: {rollouts_per_prompt: 8}\nsteps: 3\n")
    assert main(["train", "--config", str(path), "--algo", "grpo", "steps=5", "optim.lr=2e-6"]) == 0
    (kind, config), = fake_trainer
    assert kind == "train"
    assert config.algo.name == "grpo" and config.algo.rollouts_per_prompt == 8
    assert config.steps == 5 and config.optim.lr == 2e-6


def test_train_ends_with_a_summary_and_the_plot_path(capsys, fake_trainer):
    assert main(["train", "steps=2"]) == 0
    out = capsys.readouterr().out
    assert "appo, 2 steps" in out and "runs/x/curves.png" in out
    assert "pass@1 0.250, pass@2 0.500" in out and "rollout 2.0 s" in out


def test_allow_config_change_flag_sets_the_config_key(fake_trainer):
    assert main(["train", "steps=2"]) == 0 and main(["train", "--allow-config-change", "steps=2"]) == 0
    assert [config.allow_config_change for _, config in fake_trainer] == [False, True]


def test_overrides_before_and_after_options_all_apply(fake_trainer, capsys):
    assert main(["train", "steps=2", "--allow-config-change", "seed=3", "--algo", "grpo", "optim.lr=1e-6"]) == 0
    (_, config), = fake_trainer
    assert (config.steps, config.seed, config.optim.lr, config.algo.name) == (2, 3, 1e-6, "grpo")
    assert config.allow_config_change
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "steps=2", "--print-config", "--bogus", "seed=3"])
    assert exit_info.value.code == 2 and "--bogus" in capsys.readouterr().err


def test_train_print_config_does_not_train(capsys, fake_trainer):
    assert main(["train", "--algo", "arpo", "--print-config", "algo.rollouts_per_prompt=6"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["algo"]["name"] == "arpo" and printed["algo"]["rollouts_per_prompt"] == 6
    assert fake_trainer == []


def test_print_config_alone_prints_the_dataclass_defaults(capsys, tmp_path):
    assert main(["train", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert yaml.safe_load(text) == to_dict(TrainConfig())
    path = tmp_path / "printed.yaml"
    path.write_text(text)
    assert load_config(path) == TrainConfig()          # the printed YAML is a config file giving the defaults


def test_print_config_prints_the_effective_config_that_config_reads_back(capsys, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("algo: {name: grpo, rollouts_per_prompt: 8}\nrollout: {result_template: \"<result>\\n"
                    "{result}\\n</result>\\n\"}\n")
    argv = ["--config", str(path), "steps=3", "algo.eps_high=0.3", "data.task_options.max_operand=50"]
    assert main(["train", "--print-config", *argv]) == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    effective = load_config(path, argv[2:])
    assert effective.steps == 3 and effective.algo.rollouts_per_prompt == 8
    assert load_config(printed) == effective


def test_algo_choices_come_from_the_registry(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--algo", "ppo"])
    listed = capsys.readouterr().err.split("choose from")[1]
    assert {name for name in ("appo", "grpo", "arpo", "toy") if f"'{name}'" in listed} == set(ALGORITHMS)

    class Toy(ALGORITHMS["grpo"]):
        """A registered algorithm is a CLI choice and a config value, with no list to edit by hand."""

    monkeypatch.setitem(ALGORITHMS, "toy", Toy)
    assert main(["train", "--algo", "toy", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["algo"]["name"] == "toy"


@pytest.mark.parametrize("argv, message", [
    (["train", "algo.bogus=1"], "algo.bogus"),
    (["train", "steps"], "overrides"),
    (["eval", "--data", "x.jsonl", "--limit", "0"], "--limit"),
    (["eval", "--data", "x.jsonl", "--samples", "0"], "--samples"),
])
def test_bad_input_exits_2_naming_the_argument(argv, message, capsys, fake_trainer):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert fake_trainer == []


def test_unknown_algo_and_missing_command_rejected_by_argparse(capsys):
    for argv in (["train", "--algo", "ppo"], []):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args(argv)
        assert exit_info.value.code == 2


def test_eval_passes_paths_and_prints_summary(tmp_path, capsys, fake_trainer):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "1 + 1?", "answer": "2"}\n{"question": "2 * 3?", "answer": 6}\n')
    (tmp_path / "ckpt" / "step-1").mkdir(parents=True)
    (tmp_path / "ckpt" / "step-1" / "config.json").write_text("{}")  # a transformers model folder
    model = str(tmp_path / "ckpt" / "step-1")
    assert main(["eval", "--model", model, "--data", str(data), "--limit", "3", "--samples", "4",
                 "rollout.max_new_tokens_per_turn=64"]) == 0
    (kind, config, kwargs), = fake_trainer
    assert kind == "eval" and config.rollout.max_new_tokens_per_turn == 64
    assert kwargs == {"model_path": model, "data_path": str(data), "limit": 3, "samples": 4,
                      "out_path": None}
    assert json.loads(capsys.readouterr().out) == {"accuracy": 0.5, "items": 2}


def test_plot_writes_png(tmp_path, capsys):
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.parent.mkdir()
    metrics.write_text("".join(json.dumps({"step": s, "reward": s / 3, "time/rollout": 1.5}) + "\n"
                               for s in range(4)))
    out = tmp_path / "curves.png"
    assert main(["plot", str(metrics), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
