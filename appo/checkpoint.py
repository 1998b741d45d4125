"""Atomic checkpoints with exact resume.

Layout under ``directory``::

    step-00000010/  model.safetensors  optimizer.pt  state.pt (RNG states + extra)  meta.json (step, config)
    latest          text file naming the newest complete step directory

A checkpoint is written into a hidden temporary directory, flushed to disk, then renamed into place;
``latest`` is replaced with ``os.replace``. An interrupted save therefore leaves the previous checkpoint (and
``latest``) intact. RNG states cover Python's ``random``, NumPy's global generator, torch's CPU (and CUDA)
default generators and any ``torch.Generator`` objects the caller passes by name, so the next random draws
after a resume are identical.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model

LATEST = "latest"
_PREFIX = "step-"


@dataclass
class Checkpoint:
    """What ``load_checkpoint`` read: the step, the config dict, the caller's ``extra`` and the directory."""

    step: int
    config: dict
    extra: dict
    path: Path


def _fsync_tree(directory: Path) -> None:
    for item in directory.iterdir():
        with open(item, "rb") as handle:
            os.fsync(handle.fileno())
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _global_rng_state() -> dict:
    version, mt_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "mt": list(mt_state), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_global_rng(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["mt"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["position"],
                         npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_directories(directory: str | Path) -> list[Path]:
    """Complete checkpoint directories under ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)
             and p.name[len(_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def save_checkpoint(directory: str | Path, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, config,
                    rng_state: dict[str, torch.Generator] | None = None, extra: dict | None = None, *,
                    keep: int = 2) -> Path:
    """Atomically write checkpoint ``step`` under ``directory`` and point ``latest`` at it.

    model: weights saved as safetensors (tied weights handled); optimizer: its state_dict (torch.save);
    config: a dataclass or dict, stored as JSON; rng_state: named ``torch.Generator`` objects whose states are
    saved beside the global Python/NumPy/torch RNG states; extra: tensors / numbers / strings / lists / dicts
    the caller needs to resume (e.g. the data cursor). keep: how many step directories to keep (older ones are
    deleted; 0 keeps all). Returns the checkpoint's directory.
    """
    if step < 0:
        raise ValueError(f"step: must be >= 0, got {step}")
    if keep < 0:
        raise ValueError(f"keep: must be >= 0, got {keep}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(f".tmp-{_PREFIX}*"):  # debris of an interrupted save
        shutil.rmtree(stale, ignore_errors=True)
    config_dict = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config or {})
    name = f"{_PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=directory))
    os.chmod(tmp, 0o755)  # mkdtemp creates 0700; a checkpoint is as readable as any other output
    try:
        save_safetensors_model(model, str(tmp / "model.safetensors"))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        generators = {key: gen.get_state() for key, gen in (rng_state or {}).items()}
        state = {"rng": _global_rng_state(), "generators": generators, "extra": extra or {}}
        torch.save(state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, "config": config_dict}, indent=1))
        _fsync_tree(tmp)
        final = directory / name
        if final.exists():  # re-saving a step: move the old copy aside first (rename needs an empty target)
            old = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-old-", dir=directory))
            os.replace(final, old / name)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = directory / f".{LATEST}.tmp"
    pointer.write_text(name)
    os.replace(pointer, directory / LATEST)
    if keep:
        for old_dir in step_directories(directory)[:-keep]:
            if old_dir.name != name:
                shutil.rmtree(old_dir, ignore_errors=True)
    return final


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The directory ``latest`` names, or None when there is no complete checkpoint."""
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    path = Path(directory) / pointer.read_text().strip()
    return path if (path / "meta.json").is_file() else None


def load_checkpoint(directory: str | Path, model: torch.nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None,
                    generators: dict[str, torch.Generator] | None = None, *, restore_rng: bool = True,
                    map_location: str | torch.device = "cpu") -> Checkpoint:
    """Restore a checkpoint in place for an exact resume and return its step, config and extra.

    directory: a run directory (its ``latest`` checkpoint is used) or one ``step-*`` directory. model /
    optimizer: loaded in place when given (strict); generators: named ``torch.Generator`` objects whose states
    are restored (each name must have been saved); restore_rng: also restore the global Python/NumPy/torch
    RNGs.
    """
    directory = Path(directory)
    path = directory if (directory / "meta.json").is_file() else latest_checkpoint(directory)
    if path is None:
        raise ValueError(f"directory: no complete checkpoint under {directory}")
    meta = json.loads((path / "meta.json").read_text())
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    if model is not None:
        load_safetensors_model(model, str(path / "model.safetensors"), device=str(map_location))
    if optimizer is not None:
        optimizer_file = path / "optimizer.pt"
        if not optimizer_file.is_file():
            raise ValueError(f"optimizer: checkpoint {path} holds no optimizer state")
        optimizer.load_state_dict(torch.load(optimizer_file, map_location=map_location, weights_only=True))
    for key, gen in (generators or {}).items():
        if key not in state["generators"]:
            raise ValueError(f"generators: no saved state for {key!r} (saved: {sorted(state['generators'])})")
        gen.set_state(state["generators"][key])
    if restore_rng:
        _restore_global_rng(state["rng"])
    return Checkpoint(step=meta["step"], config=meta["config"], extra=state["extra"], path=path)
