"""Atomic, checksummed checkpoints with exact resume.

Layout under ``directory``::

    step-00000010/  model.safetensors  optimizer.pt  state.pt (RNG states + extra)  meta.json
    latest          text file naming the newest complete step directory

meta.json holds the step, the run's config, the size and SHA-256 of every other file, and a SHA-256 of its own
content. A checkpoint is written into a hidden temporary directory, flushed to disk, then renamed into place;
``latest`` is replaced with ``os.replace``. An interrupted save therefore leaves the previous checkpoint intact.

Loading verifies every checksum. A run directory resumes from its newest *intact* step directory, found by
name (``latest`` is only a hint): a damaged, truncated or incomplete newer one is skipped with a
CheckpointWarning naming the file and the fault; when step directories exist but none is intact, CheckpointError
names each fault; a run never silently restarts from step 0.

A checkpoints folder's checkpoints are the ``step-*`` directories inside it, verified or not: ``latest`` may hold
only such a name (anything else, e.g. ``../other/step-00000009`` or an absolute path, is a CheckpointError naming
the pointer), and a step directory that resolves outside the folder (a symbolic link leading out) is never
loaded from the folder. RNG states cover Python's ``random``, NumPy's
global generator, torch's CPU (and CUDA) default generators and any ``torch.Generator`` objects the caller
passes by name, so the next random draws after a resume are identical.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model

LATEST = "latest"
META = "meta.json"
FORMAT = 2  # 1: meta.json without checksums (appo before 0.2), still loaded, with a warning
_PREFIX = "step-"
_REQUIRED = ("model.safetensors", "state.pt")
_FILE_NAME = re.compile(r"[\w.-]+")
_STEP_NAME = re.compile(rf"{_PREFIX}\d+")
_POINTER_BYTES = 256  # a pointer holds one step name; a larger file is not one


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, incomplete or damaged. The message names the file."""


class ResumeError(CheckpointError):
    """An intact checkpoint that does not fit the run resuming from it (its config or its data)."""


class CheckpointWarning(UserWarning):
    """A damaged checkpoint was skipped, a ``latest`` pointer was missing or stale, or a checkpoint written by
    an older appo was loaded without checksums; the message says which and why."""


@dataclass
class Checkpoint:
    """What ``load_checkpoint`` read: the step, the config dict, the caller's ``extra`` and the directory."""

    step: int
    config: dict
    extra: dict
    path: Path


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(value) -> str:
    """Hex SHA-256 of a JSON-able value (e.g. the token ids of a run's prompts), to tell data apart."""
    return hashlib.sha256(json.dumps(value, separators=(",", ":")).encode()).hexdigest()


def _meta_sha256(meta: dict) -> str:
    return fingerprint({key: value for key, value in meta.items() if key != "sha256"})


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


def _step_of(path: Path) -> int | None:
    digits = path.name[len(_PREFIX):]
    return int(digits) if path.name.startswith(_PREFIX) and digits.isdigit() else None


def step_directories(directory: str | Path) -> list[Path]:
    """The ``step-*`` directories under ``directory``, oldest first (intact or not: see
    ``verify_checkpoint``)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and _step_of(p) is not None]
    return sorted(found, key=_step_of)


def save_checkpoint(directory: str | Path, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, config,
                    rng_state: dict[str, torch.Generator] | None = None, extra: dict | None = None, *,
                    keep: int = 2) -> Path:
    """Atomically write checkpoint ``step`` under ``directory`` and point ``latest`` at it.

    model: weights saved as safetensors (tied weights handled); optimizer: its state_dict (torch.save);
    config: a dataclass or dict, stored as JSON; rng_state: named ``torch.Generator`` objects whose states are
    saved beside the global Python/NumPy/torch RNG states; extra: tensors / numbers / strings / lists / dicts
    the caller needs to resume (e.g. the data cursor). keep: how many step directories to keep (older ones are
    deleted; 0 keeps all). meta.json records each file's size and SHA-256. Returns the checkpoint's directory.
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
        files = {item.name: {"bytes": item.stat().st_size, "sha256": file_sha256(item)}
                 for item in sorted(tmp.iterdir())}
        meta = {"format": FORMAT, "step": step, "config": config_dict, "files": files}
        meta["sha256"] = _meta_sha256(meta)
        (tmp / META).write_text(json.dumps(meta, indent=1))
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
    with open(pointer, "w", encoding="utf-8") as handle:  # flushed first: a crash never leaves it empty
        handle.write(name)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(pointer, directory / LATEST)
    if keep:
        for old_dir in step_directories(directory)[:-keep]:
            if old_dir.name != name:
                shutil.rmtree(old_dir, ignore_errors=True)
    return final


def read_meta(path: str | Path) -> dict:
    """The meta.json of the step directory ``path``, checked for shape (step, config) but not for checksums.
    Raises CheckpointError naming the file."""
    meta_file = Path(path) / META
    if not meta_file.is_file():
        raise CheckpointError(f"{meta_file}: missing (the checkpoint is incomplete or damaged)")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{meta_file}: unreadable ({err})") from None
    except RecursionError:
        raise CheckpointError(f"{meta_file}: unreadable (nested too deep to be an appo meta.json)") from None
    if not isinstance(meta, dict) or type(meta.get("step")) is not int or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{meta_file}: not an appo checkpoint's meta.json (needs an integer step and a "
                              "config)")
    return meta


def verify_checkpoint(path: str | Path) -> dict:
    """Check the step directory ``path`` against its meta.json: meta.json's own checksum, then each file's
    presence, size and SHA-256. Returns the meta dict. Raises CheckpointError naming the file and the fault.
    A checkpoint from an older appo (no checksums) only gets its files checked for presence, with a
    CheckpointWarning."""
    path = Path(path)
    meta = read_meta(path)
    meta_file = path / META
    if _step_of(path) is not None and meta["step"] != _step_of(path):
        raise CheckpointError(f"{meta_file}: says step {meta['step']}, but the directory is {path.name}")
    if "files" not in meta:
        for name in _REQUIRED:
            if not (path / name).is_file():
                raise CheckpointError(f"{path / name}: missing (the checkpoint is incomplete)")
        warnings.warn(f"{path}: written by an older appo without checksums; loaded unverified",
                      CheckpointWarning, stacklevel=2)
        return meta
    files = meta["files"]
    if meta.get("sha256") != _meta_sha256(meta) or not isinstance(files, dict):
        raise CheckpointError(f"{meta_file}: its checksum does not match its content (the file is damaged)")
    for name in (*_REQUIRED, *files):
        if name not in files or not _FILE_NAME.fullmatch(name):
            raise CheckpointError(f"{meta_file}: lists no valid entry for {name!r}")
        file, expected = path / name, files[name]
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (the checkpoint is incomplete)")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{file}: {size} bytes, expected {expected['bytes']} (truncated or partly "
                                  "written)")
        if file_sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{file}: SHA-256 does not match meta.json (the file is damaged)")
    return meta


def read_pointer(directory: str | Path) -> str | None:
    """The step directory name the ``latest`` pointer of the checkpoints folder ``directory`` holds; None when
    there is no pointer or it is empty (a save interrupted on a file system that lost its content). Raises
    CheckpointError naming the pointer when it holds anything but a ``step-*`` name (a path such as
    ``../other/step-00000009`` or ``/abs/step-1``, several lines, bytes that are not UTF-8): a pointer names a
    checkpoint inside its own folder or nothing."""
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    with open(pointer, "rb") as handle:
        raw = handle.read(_POINTER_BYTES + 1)
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        name = None
    if name == "":
        return None
    if len(raw) > _POINTER_BYTES or name is None or not _STEP_NAME.fullmatch(name):
        shown = repr(name[:80]) if name is not None else "bytes that are not UTF-8"
        raise CheckpointError(f"{pointer}: holds {shown}, not the name of a {_PREFIX}* directory inside "
                              f"{Path(directory)} (the only thing a latest pointer may name)")
    return name


def _outside(directory: Path, path: Path) -> Path | None:
    """Where ``path`` (an entry of ``directory``) really is, when that is not directly inside ``directory``
    (a symbolic link leading out); None when it is inside."""
    real = path.resolve()
    return real if real.parent != directory.resolve() else None


def find_checkpoint(directory: str | Path) -> Path | None:
    """The newest intact step directory under ``directory`` (a checkpoints folder), verified; None when it
    holds no step directory at all.

    Step directories are found by name, so a missing or stale ``latest`` pointer never loses a checkpoint (it
    is reported with a CheckpointWarning). A newer directory that fails ``verify_checkpoint`` is skipped with a
    CheckpointWarning naming the file and the fault. Raises CheckpointError naming every fault when step
    directories exist but none is intact.
    """
    directory = Path(directory)
    named = read_pointer(directory)
    faults, skipped = [], []
    for path in reversed(step_directories(directory)):
        try:
            if (real := _outside(directory, path)) is not None:
                raise CheckpointError(f"{path}: a link to {real}, outside {directory}")
            verify_checkpoint(path)
        except CheckpointError as err:
            faults.append(str(err))
            skipped.append(path.name)
            warnings.warn(f"skipping checkpoint {path}: {err}", CheckpointWarning, stacklevel=2)
            continue
        if named != path.name and named not in skipped:
            state = f"names {named!r}" if named else "is missing"
            warnings.warn(f"{directory / LATEST} {state}; using {path.name}, the newest intact checkpoint",
                          CheckpointWarning, stacklevel=2)
        return path
    if faults:
        raise CheckpointError(f"no intact checkpoint under {directory}: " + "; ".join(faults))
    return None


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The step directory ``latest`` names, else the newest one holding a meta.json; None when there is none.
    Cheap (no checksums): ``find_checkpoint`` is the verified choice. Raises CheckpointError when the pointer
    holds anything but a step name (``read_pointer``) or the chosen step directory resolves outside
    ``directory``."""
    directory = Path(directory)
    named = read_pointer(directory)
    complete = [p for p in step_directories(directory) if (p / META).is_file()]
    chosen = directory / named if named is not None and (directory / named / META).is_file() else (
        complete[-1] if complete else None)
    if chosen is not None and (real := _outside(directory, chosen)) is not None:
        raise CheckpointError(f"{chosen}: a link to {real}, outside {directory} (a checkpoint of a folder "
                              "lies inside it)")
    return chosen


def load_checkpoint(directory: str | Path, model: torch.nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None,
                    generators: dict[str, torch.Generator] | None = None, *, restore_rng: bool = True,
                    map_location: str | torch.device = "cpu", verify: bool = True) -> Checkpoint:
    """Restore a checkpoint in place for an exact resume and return its step, config and extra.

    directory: a checkpoints folder (its newest intact step directory is used, see ``find_checkpoint``) or one
    ``step-*`` directory (used as it is; a fault raises). model / optimizer: loaded in place when given
    (strict); generators: named ``torch.Generator`` objects whose states are restored (each name must have been
    saved); restore_rng: also restore the global Python/NumPy/torch RNGs. verify=False skips the checksums
    (only for a directory ``find_checkpoint`` or ``verify_checkpoint`` has just checked). Raises
    CheckpointError (a ValueError) naming the file.
    """
    directory = Path(directory)
    if (directory / META).is_file() or _step_of(directory) is not None:
        path = directory
        meta = verify_checkpoint(path) if verify else read_meta(path)
    else:
        path = find_checkpoint(directory) if verify else latest_checkpoint(directory)
        if path is None:
            raise CheckpointError(f"directory: no checkpoint under {directory}")
        meta = read_meta(path)
    state = _load_file(path / "state.pt", lambda file: torch.load(file, map_location="cpu", weights_only=True))
    if model is not None:
        _load_file(path / "model.safetensors",
                   lambda file: load_safetensors_model(model, str(file), device=str(map_location)))
    if optimizer is not None:
        optimizer_file = path / "optimizer.pt"
        if not optimizer_file.is_file():
            raise CheckpointError(f"optimizer: checkpoint {path} holds no optimizer state")
        optimizer.load_state_dict(_load_file(optimizer_file, lambda file: torch.load(
            file, map_location=map_location, weights_only=True)))
    for key, gen in (generators or {}).items():
        if key not in state["generators"]:
            raise CheckpointError(f"generators: no saved state for {key!r} in {path / 'state.pt'} (saved: "
                                  f"{sorted(state['generators'])})")
        gen.set_state(state["generators"][key])
    if restore_rng:
        _restore_global_rng(state["rng"])
    return Checkpoint(step=meta["step"], config=meta["config"], extra=state["extra"], path=path)


def _load_file(file: Path, load):
    """``load(file)``, with any failure (a damaged file, or weights that do not fit the model) reported as a
    CheckpointError naming the file."""
    try:
        return load(file)
    except Exception as err:  # safetensors, pickle and shape errors have no common base class
        raise CheckpointError(f"{file}: cannot be loaded ({type(err).__name__}: {err})") from err


# Keys that cannot change on resume even with allow_config_change, and why.
FIXED_ON_RESUME = {"seed": "the RNG states come from the checkpoint, so a new seed would not be applied; start a "
                           "new output_dir to train with another seed"}


def plan_resume(directory: str | Path, config) -> tuple[Path | None, dict[str, tuple]]:
    """Where a run with ``config`` (a TrainConfig) continues, decided before anything loads: (the newest intact
    checkpoint under ``directory``, verified, or None for a fresh start; {key: (saved, new)} the config changes
    that will apply).

    Raises ResumeError when ``config.resume`` is false but ``directory`` holds checkpoints (a fresh run would
    mix its checkpoints and metrics with the old run's), and when the config differs from the checkpoint's in
    a key outside ``appo.config.RESUME_FREE``, naming each key with both values, unless
    ``config.allow_config_change`` (then each change is warned about; FIXED_ON_RESUME keys are refused anyway).
    Raises CheckpointError when checkpoints exist but none is intact. Newer damaged step directories are
    renamed ``damaged-step-*`` (kept for inspection, out of the way of later saves and loads).
    """
    from appo.config import resume_changes

    directory = Path(directory)
    existing = step_directories(directory)
    if not config.resume:
        if existing:
            raise ResumeError(f"resume: false, but {directory} holds checkpoints up to {existing[-1].name}; a "
                              "fresh run there would mix with them. Use a new output_dir, delete the "
                              "checkpoints, or set resume: true")
        return None, {}
    path = find_checkpoint(directory)
    if path is None:
        return None, {}
    for newer in existing[existing.index(path) + 1:]:
        aside = directory / f"damaged-{newer.name}"
        while aside.exists():
            aside = aside.with_name(aside.name + "-again")
        os.replace(newer, aside)
        warnings.warn(f"moved the damaged {newer} aside to {aside}", CheckpointWarning, stacklevel=2)
    changes, unmatched = resume_changes(read_meta(path)["config"], config)
    if unmatched:
        warnings.warn(f"{path / META}: config keys {unmatched} exist in only one of the checkpoint's config and "
                      "this one (another appo version); they are not compared", CheckpointWarning, stacklevel=2)
    listing = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())
    if changes and not config.allow_config_change:
        raise ResumeError(f"the config differs from checkpoint {path}'s: {listing}. Resume with the same "
                          "values, or pass --allow-config-change (allow_config_change=true) to apply them")
    for key in changes.keys() & FIXED_ON_RESUME.keys():
        raise ResumeError(f"{key}: cannot change on resume, even with allow_config_change ({changes[key][0]!r} "
                          f"-> {changes[key][1]!r}): {FIXED_ON_RESUME[key]}")
    if changes:
        warnings.warn(f"resuming from {path} with config changes (applied): {listing}", CheckpointWarning,
                      stacklevel=2)
    return path, changes
