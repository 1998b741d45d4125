"""The README's command sequence on a bare clone, shrunk to a tiny model: `appo train` writes a run folder,
`appo eval --model <that folder>` evaluates it, `appo plot` draws its curves; all through the real command
line (``appo.cli.main``), with the procedural arithmetic task (no data) and the sandboxed python tool. A wrong
``--model`` is refused in one line that says what was expected."""

import json

import pytest
import torch

from appo.cli import main


@pytest.fixture(scope="module")
def sandbox():
    """The python tool runs model code only inside its sandbox (bubblewrap; scripts/install.sh installs it):
    without one, `appo train` refuses to start, and so does this test, saying why."""
    from appo.tools.python_sandbox import PythonTool, SandboxUnavailable

    try:
        PythonTool()
    except SandboxUnavailable as err:
        pytest.skip(f"the python tool has no sandbox on this machine: {err}")


def small(model_dir) -> list[str]:
    """The overrides that shrink the CPU demo to seconds (everything else is the default config)."""
    return [f"model.name_or_path={model_dir}", "device=cpu", "threads=1", "steps=2", "prompts_per_step=2",
            "optim.minibatches_per_step=1", "data.train_size=8", "data.eval_size=3", "data.few_shot=1",
            "rollout.max_prompt_tokens=1500", "rollout.max_total_tokens=1540",
            "rollout.max_new_tokens_per_turn=8", "checkpoint_every=1"]


def test_train_then_eval_the_run_folder_then_plot(sandbox, tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the README's relative paths: runs/appo-demo, curves.png
    torch.manual_seed(0)

    assert main(["train", *small(tiny_model_dir)]) == 0
    summary_text = capsys.readouterr().out
    run = tmp_path / "runs" / "appo-demo"
    assert "appo train: appo, 2 steps -> runs/appo-demo" in summary_text
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((run / "summary.json").read_text())["eval"]["items"] == 3

    assert main(["eval", "--model", "runs/appo-demo", "--limit", "2", "--samples", "2",
                 *small(tiny_model_dir)[1:]]) == 0  # the model comes from the run folder, not an override
    result = json.loads(capsys.readouterr().out)
    assert (result["items"], result["k"]) == (2, 2) and 0.0 <= result["pass@1"] <= result["pass@k"] <= 1.0

    assert main(["plot", "runs/appo-demo/metrics.jsonl", "--out", "curves.png"]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_loads_the_run_folders_weights_into_the_runs_model(tiny_model_dir, tmp_path):
    """`appo eval --model runs/x` loads the newest checkpoint of the run into the model the run started from
    (named in the checkpoint), whatever the eval config's model.name_or_path says."""
    from appo.checkpoint import save_checkpoint
    from appo.config import load_config
    from appo.trainer import load_policy

    config = load_config(None, small(tiny_model_dir))
    model, _ = load_policy(config, torch.device("cpu"))
    for step in (1, 2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        save_checkpoint(tmp_path / "run" / "checkpoints", step, model, None, config)
    eval_config = load_config(None, small(tiny_model_dir)[1:])  # model.name_or_path: SmolLM2, not the run's
    for where in ("run", "run/checkpoints", "run/checkpoints/step-00000002"):
        loaded, tokenizer = load_policy(eval_config, torch.device("cpu"), str(tmp_path / where))
        assert tokenizer.eos_token == "<|im_end|>" and len(tokenizer) == model.config.vocab_size
        assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in loaded.named_parameters())


@pytest.mark.parametrize("make, expected", [
    (lambda root: root / "nope", "does not exist; expected 'smollm2-135m-instruct', an appo run folder"),
    (lambda root: root, "holds no model; expected an appo run folder"),
    (lambda root: (root / "config.yaml").write_text("steps: 1\n") and root, "holds no checkpoint yet"),
], ids=["missing", "empty-folder", "run-without-checkpoint"])
def test_wrong_model_path_says_what_was_expected(make, expected, tmp_path, capsys):
    target = make(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(target)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("appo eval: error: model_path (--model)") and expected in error
    assert len(error.strip().splitlines()) == 1
