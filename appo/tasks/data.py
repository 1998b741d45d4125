"""Where a task's rows come from, and reading them.

A task that needs data (GSM8K, HotpotQA) looks in this order and takes the first source that has it:

1. ``path``: the config's ``data.path``, a .jsonl file or a folder holding the task's file
   (``<folder>/gsm8k/train.jsonl`` or ``<folder>/train.jsonl``);
2. ``$APPO_DATA_DIR``: a folder laid out as ``gsm8k/train.jsonl`` and ``hotpotqa/dev_distractor_50.jsonl``;
3. the Hugging Face hub through ``datasets.load_dataset`` (``openai/gsm8k``, ``hotpotqa/hotpot_qa``), with
   the ``datasets`` cache (offline from that cache with ``HF_DATASETS_OFFLINE=1``).

The rows are the same in all three: the hub datasets have the fields of the jsonl files. The procedural
arithmetic task reads nothing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


@dataclass(frozen=True)
class Source:
    """Where one task's rows live: ``file`` inside a data folder, and the hub dataset with the same fields
    (``repo``, its ``config`` name and ``split``). ``fields``: what every row of a local file must hold (a
    missing or mistyped one is a ValueError naming the file, the line and the field)."""

    file: str
    repo: str
    config: str
    split: str
    fields: tuple[tuple[str, type], ...]


SOURCES = {
    "gsm8k": Source("gsm8k/train.jsonl", "openai/gsm8k", "main", "train",
                    (("question", str), ("answer", str))),
    "hotpotqa": Source("hotpotqa/dev_distractor_50.jsonl", "hotpotqa/hotpot_qa", "distractor", "validation",
                       (("question", str), ("answer", str), ("supporting_facts", dict), ("context", dict))),
}


def data_dir() -> Path | None:
    """``$APPO_DATA_DIR`` as a Path, or None when it is unset or empty.

    Raises FileNotFoundError naming the variable when it is set to something that is not a folder."""
    configured = os.environ.get("APPO_DATA_DIR")
    if not configured:
        return None
    path = Path(configured)
    if not path.is_dir():
        raise FileNotFoundError(f"$APPO_DATA_DIR: {path} is not a folder (it should hold gsm8k/, hotpotqa/)")
    return path


def find_local(task: str, path: str | Path | None = None) -> Path | None:
    """The local .jsonl file of ``task`` ("gsm8k" | "hotpotqa"): from ``path`` when given, else from
    ``$APPO_DATA_DIR``; None when neither is set or $APPO_DATA_DIR lacks the file (then the hub is next).

    Raises FileNotFoundError when ``path`` is given but is neither such a file nor a folder holding it."""
    source = _source(task)
    if path is not None:
        path = Path(path).expanduser()
        if path.is_file():
            return path
        if not path.is_dir():
            raise FileNotFoundError(f"path (data.path): no such file or folder: {path}")
        for candidate in (path / source.file, path / Path(source.file).name):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"path (data.path): the folder {path} holds neither {source.file} nor "
                                f"{Path(source.file).name}")
    folder = data_dir()
    if folder is not None and (folder / source.file).is_file():
        return folder / source.file
    return None


def load_rows(task: str, path: str | Path | None = None) -> tuple[dict, ...]:
    """All rows of ``task`` ("gsm8k" | "hotpotqa") as dicts, in the source's order, from the first of:
    ``path``, ``$APPO_DATA_DIR``, the Hugging Face hub (module docstring). Loaded once per source and process.

    Raises FileNotFoundError listing every place looked at when no source has the data."""
    local = find_local(task, path)
    if local is not None:
        return _local_rows(str(local.resolve()), task)
    return _hub_rows(task)


def describe_sources(task: str) -> str:
    """One line saying where ``task``'s data is looked for (for error messages and docs)."""
    source = _source(task)
    return (f"data.path (a .jsonl file or a folder with {source.file}), then $APPO_DATA_DIR/{source.file}, "
            f"then the Hugging Face hub dataset {source.repo} ({source.config}, split {source.split}) "
            "through `datasets`")


def _source(task: str) -> Source:
    if task not in SOURCES:
        raise ValueError(f"task: {task!r} reads no data file; tasks with data: {sorted(SOURCES)}")
    return SOURCES[task]


@lru_cache(maxsize=8)
def _local_rows(path: str, task: str) -> tuple[dict, ...]:
    return tuple(read_jsonl(path, required=dict(_source(task).fields)))


@lru_cache(maxsize=4)
def _hub_rows(task: str) -> tuple[dict, ...]:
    source = _source(task)
    try:
        import datasets
    except ImportError:
        raise FileNotFoundError(f"no {task} data: looked in {describe_sources(task)}, but `datasets` is not "
                                "installed (pip install datasets) and no local file is set") from None
    try:
        rows = datasets.load_dataset(source.repo, source.config, split=source.split)
    except Exception as err:  # offline without a cache, a missing dataset, ...: one error saying what to do
        raise FileNotFoundError(f"no {task} data: looked in {describe_sources(task)}; the hub failed with "
                                f"{type(err).__name__}: {err}") from err
    return tuple(dict(row) for row in rows)


def read_jsonl(path: str | Path, required: dict[str, type | tuple[type, ...]] | None = None) -> list[dict]:
    """All JSON objects of a jsonl file, in order (blank lines skipped).

    required: fields every row must have, each with the type(s) its value must be (e.g.
    ``{"question": str, "answer": (str, int, float)}``). Raises FileNotFoundError when the file is missing, and
    ValueError naming the file and the line for a line that is not UTF-8, not valid JSON, not a JSON object, or
    lacks a required field (named) or has it of another type.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    rows = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{number}: not UTF-8 text ({err.reason} at byte {err.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: invalid JSON: {err.msg} (column {err.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            for field, kinds in (required or {}).items():
                if field not in row:
                    raise ValueError(f"{path}:{number}: the row has no {field!r} field")
                kinds = kinds if isinstance(kinds, tuple) else (kinds,)
                if isinstance(row[field], bool) or not isinstance(row[field], kinds):
                    expected = " or ".join(kind.__name__ for kind in kinds)
                    raise ValueError(f"{path}:{number}: field {field!r} must be {expected}, got "
                                     f"{type(row[field]).__name__}")
            rows.append(row)
    return rows
