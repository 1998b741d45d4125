"""What a ``--model`` argument names: a model, or something ``appo train`` wrote.

``appo train`` writes a run folder (``runs/appo-demo`` by default)::

    config.yaml  metrics.jsonl  summary.json  curves.png
    checkpoints/ step-00000003/ (model.safetensors, optimizer.pt, state.pt, meta.json)  latest

``resolve_model`` turns a name or path into (the model to build, the checkpoint to load into it), reading one
meta.json at most, so a wrong path is reported before any model loads.
"""

from __future__ import annotations

from pathlib import Path

EXPECTED = ("an appo run folder (checkpoints/ inside, as `appo train` writes), a checkpoints folder (step-* "
            "inside), one step-* checkpoint (meta.json) or a transformers model folder (config.json)")


def resolve_model(name_or_path: str) -> tuple[str, Path | None]:
    """(the model to build, the appo checkpoint to load into it or None) for a model name or path.

    The model to build is ``name_or_path`` itself for a model name or a transformers model folder; for an appo
    checkpoint it is ``model.name_or_path`` of the run that wrote it. The checkpoint is a step directory or a
    checkpoints folder (``appo.checkpoint.load_checkpoint`` then picks its newest intact step). Raises
    ValueError naming ``model_path (--model)`` and what was expected."""
    from appo.models import SMOLLM2

    path = Path(name_or_path).expanduser()
    if name_or_path == SMOLLM2 and not path.exists():
        return SMOLLM2, None
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise ValueError(f"model_path (--model): {name_or_path} {what}; expected {SMOLLM2!r}, {EXPECTED}")
    checkpoint = checkpoint_in(path)
    if checkpoint is not None:
        base = (trained_config(checkpoint).get("model") or {}).get("name_or_path")
        if not isinstance(base, str):
            raise ValueError(f"model_path (--model): the checkpoint {checkpoint} names no model.name_or_path "
                             "to load its weights into")
        return base, checkpoint
    if (path / "config.json").is_file():
        return str(path), None
    if (path / "config.yaml").is_file() or (path / "metrics.jsonl").is_file():
        raise ValueError(f"model_path (--model): the run folder {name_or_path} holds no checkpoint yet "
                         "(training stopped before its first save, see checkpoint_every)")
    raise ValueError(f"model_path (--model): the folder {name_or_path} holds no model; expected {EXPECTED}")


def checkpoint_in(path: Path) -> Path | None:
    """The appo checkpoint ``path`` is or holds: itself when it is a step directory (meta.json) or a
    checkpoints folder (step-* inside), ``path/checkpoints`` for a run folder; None otherwise."""
    from appo.checkpoint import step_directories

    if (path / "meta.json").is_file() or step_directories(path):
        return path
    if step_directories(path / "checkpoints"):
        return path / "checkpoints"
    return None


def trained_config(checkpoint: Path) -> dict:
    """The config dict saved with ``checkpoint`` (a step directory, or a checkpoints folder: its newest
    step)."""
    from appo.checkpoint import latest_checkpoint, read_meta, step_directories

    step = checkpoint if (checkpoint / "meta.json").is_file() else (
        latest_checkpoint(checkpoint) or step_directories(checkpoint)[-1])
    return read_meta(step)["config"]
