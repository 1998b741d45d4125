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


def read_jsonl(path: str | Path) -> list[dict]:
    """All JSON objects of a jsonl file, in order (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
