"""Where the benchmark data lives, and reading it.

``data_dir()`` is ``$APPO_DATA_DIR`` when set, else the ``shared/data`` folder next to the repository
(``<repo>/../shared/data``; the repository is the folder above the ``appo`` package).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    """The data folder (Path). Raises FileNotFoundError naming both places looked at when it is missing."""
    configured = os.environ.get("APPO_DATA_DIR")
    path = Path(configured) if configured else _REPO_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        source = "$APPO_DATA_DIR" if configured else "the default <repo>/../shared/data"
        raise FileNotFoundError(f"appo data folder not found: {path} (from {source}); set APPO_DATA_DIR "
                                "to the folder holding gsm8k/ and hotpotqa/")
    return path


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
