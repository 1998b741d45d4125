"""Run metrics: one JSON line per step (flushed at once), optional TensorBoard, and a PNG of the curves."""

from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from pathlib import Path

import torch

# Curves ``plot_metrics`` draws by default: (metric key, panel title). Keys starting with "time/" share a
# panel.
DEFAULT_PANELS = (("reward", "reward"), ("accuracy", "accuracy"),
                  ("response_length", "response length (tokens)"))


def _plain(value):
    """JSON-friendly scalar: tensors and numpy numbers become Python numbers."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metrics: only scalar tensors can be logged, got shape {tuple(value.shape)}")
        return value.item()
    if isinstance(value, bool) or isinstance(value, (str, type(None))):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise ValueError(f"metrics: cannot log a value of type {type(value).__name__}")


class MetricsWriter:
    """Appends ``{"step": s, **metrics}`` lines to ``path`` (a .jsonl file), flushing after each line.

    Steps must increase: writing a step at or below the file's last one raises ValueError (a resumed run first
    cuts the file back with ``truncate_metrics``). A torn last line left by a crash is removed on opening.

    tensorboard=True also writes scalars with ``torch.utils.tensorboard`` into ``path``'s directory; it raises
    ValueError when the ``tensorboard`` package is not installed. Use as a context manager or call ``close``.
    """

    def __init__(self, path: str | Path, *, tensorboard: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        records = _rewrite_without_torn_tail(self.path)
        self.last_step = max((r["step"] for r in records if isinstance(r.get("step"), int)), default=None)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tensorboard = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ValueError("tensorboard: the 'tensorboard' package is not installed") from err
            self._tensorboard = SummaryWriter(log_dir=str(self.path.parent / "tensorboard"))

    def write(self, step: int, metrics: dict) -> dict:
        """Log one step; returns the JSON-ready record. NaN/Inf are written as null."""
        if self.last_step is not None and int(step) <= self.last_step:
            raise ValueError(f"step: {step} is not after step {self.last_step}, the last one in {self.path} "
                             "(steps in a metrics file are unique and increasing)")
        record = {"step": int(step)}
        for key, value in metrics.items():
            value = _plain(value)
            record[key] = None if isinstance(value, float) and not math.isfinite(value) else value
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.last_step = record["step"]
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(key, value, record["step"])
            self._tensorboard.flush()
        return record

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics .jsonl file. A torn last line from a crash is skipped silently; any other line
    that is not a JSON object with an integer "step" is skipped with a warning naming the file and the line."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and type(record.get("step")) is int:
            records.append(record)
        elif number < len(lines):  # not the unterminated last line: damage, not a crash mid-write
            warnings.warn(f"{path}:{number}: not a metrics record; skipped", stacklevel=2)
    return records


def truncate_metrics(path: str | Path, step: int) -> list[dict]:
    """Cut the metrics file ``path`` back to the records with step <= ``step`` (a run resuming from checkpoint
    ``step`` writes the later ones again), rewriting it atomically. Returns the records removed; a missing file
    is left missing."""
    path = Path(path)
    if not path.is_file():
        return []
    records = read_metrics(path)
    kept = [r for r in records if r["step"] <= step]
    _replace(path, kept)
    return [r for r in records if r["step"] > step]


def _rewrite_without_torn_tail(path: Path) -> list[dict]:
    """The records of ``path``; if its last line is unterminated (a crash mid-write), rewrite it without."""
    if not path.is_file():
        return []
    records = read_metrics(path)
    text = path.read_bytes()
    if text and not text.endswith(b"\n"):
        _replace(path, records)
    return records


def _replace(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def plot_metrics(jsonl_paths: list[str | Path] | str | Path, out_png: str | Path, *,
                 panels: tuple[tuple[str, str], ...] = DEFAULT_PANELS) -> Path:
    """Plot reward / accuracy / response length and the ``time/*`` phases against step, one line per run.

    jsonl_paths: one or several metrics files (each run labelled by its parent directory's name); out_png: the
    image to write. Panels with no data in any run are left out. Returns ``out_png`` as a Path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [Path(jsonl_paths)] if isinstance(jsonl_paths, (str, Path)) else [Path(p) for p in jsonl_paths]
    if not paths:
        raise ValueError("jsonl_paths: need at least one metrics file")
    runs = []
    for path in paths:
        if not path.is_file():
            raise ValueError(f"jsonl_paths: no such file {path}")
        runs.append((path.parent.name or path.stem, read_metrics(path)))
    time_keys = sorted({k for _, records in runs for r in records for k in r if k.startswith("time/")})
    wanted = [(key, title) for key, title in panels
              if any(r.get(key) is not None for _, records in runs for r in records)]
    count = len(wanted) + (1 if time_keys else 0)
    if count == 0:
        raise ValueError("jsonl_paths: the files hold none of the plotted metrics")
    figure, axes = plt.subplots(1, count, figsize=(4.2 * count, 3.4), squeeze=False)
    for axis, (key, title) in zip(axes[0], wanted):
        for label, records in runs:
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                axis.plot(*zip(*points), label=label, marker="." if len(points) < 30 else None)
        axis.set_title(title)
        axis.set_xlabel("step")
    if time_keys:
        axis = axes[0][-1]
        for label, records in runs:
            for key in time_keys:
                points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
                if points:
                    name = key[len("time/"):] if len(runs) == 1 else f"{label}: {key[len('time/'):]}"
                    axis.plot(*zip(*points), label=name, marker="." if len(points) < 30 else None)
        axis.set_title("time per phase (s)")
        axis.set_xlabel("step")
    for axis in axes[0]:
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    return save_figure(figure, out_png)


def save_figure(figure, out_png: str | Path) -> Path:
    """Lay out ``figure``, write it as a PNG (creating the directory), close it and return the path."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=110)
    plt.close(figure)
    return out_png
