import json
import math

import pytest
import torch

from appo.metrics import MetricsWriter, plot_metrics, read_metrics


def test_one_flushed_line_per_step_readable_while_open(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    with MetricsWriter(path) as writer:
        writer.write(0, {"reward": torch.tensor(0.25), "accuracy": 0.5, "phase": "train",
                         "n": torch.tensor(3)})
        assert json.loads(path.read_text()) == {"step": 0, "reward": 0.25, "accuracy": 0.5, "phase": "train",
                                                "n": 3}
        writer.write(1, {"reward": float("nan"), "time/rollout": 1.25})
    records = read_metrics(path)
    assert [r["step"] for r in records] == [0, 1]
    assert records[1]["reward"] is None and records[1]["time/rollout"] == 1.25


def test_torn_last_line_is_skipped_and_bad_values_rejected(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "reward": 1.0}\n{"step": 1, "rew')
    assert read_metrics(path) == [{"step": 0, "reward": 1.0}]
    with MetricsWriter(tmp_path / "other.jsonl") as writer, pytest.raises(ValueError, match="metrics"):
        writer.write(0, {"reward": torch.ones(2)})


def test_plot_several_runs(tmp_path):
    paths = []
    for name, slope in (("grpo", 0.1), ("appo", 0.2)):
        path = tmp_path / name / "metrics.jsonl"
        with MetricsWriter(path) as writer:
            for step in range(5):
                writer.write(step, {"reward": slope * step + math.sin(step), "response_length": 40 + step,
                                    "time/rollout": 2.0, "time/update": 0.5})
        paths.append(path)
    out = plot_metrics(paths, tmp_path / "plots" / "curves.png")
    assert out.stat().st_size > 1000 and out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="jsonl_paths"):
        plot_metrics([tmp_path / "missing.jsonl"], tmp_path / "x.png")
