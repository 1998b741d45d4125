"""kernels/ is installed as ``appo.kernels``, never as a top-level ``kernels`` module: that name belongs to
the Hugging Face ``kernels`` package, which transformers probes with ``importlib.util.find_spec("kernels")``.

The checks run in a fresh interpreter started from the repository root, where the current directory is first
on sys.path (as with ``python -c`` or ``python -m pytest``): the worst case for shadowing.
"""

import json
import subprocess
import sys
from pathlib import Path

import appo.kernels

REPO_ROOT = Path(__file__).resolve().parents[2]
KERNEL_MODULES = sorted(path.stem for path in (REPO_ROOT / "kernels").glob("*.py") if path.stem != "__init__")

PROBE = """
import importlib, importlib.metadata, importlib.util, json, sys
loaded = [importlib.import_module("appo.kernels." + name).__name__ for name in {modules!r}]
top_level_after_appo = "kernels" in sys.modules
try:
    hf_kernels = importlib.metadata.version("kernels")
except importlib.metadata.PackageNotFoundError:
    hf_kernels = None
spec = importlib.util.find_spec("kernels")
from transformers.utils.import_utils import is_kernels_available
print(json.dumps({{"loaded": loaded, "top_level_after_appo": top_level_after_appo, "hf_kernels": hf_kernels,
                  "kernels_origin": spec.origin if spec else None,
                  "transformers_sees": is_kernels_available()}}))
"""


def probe_from_repo_root() -> dict:
    script = PROBE.format(modules=KERNEL_MODULES)
    completed = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=120)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_appo_kernels_is_the_repository_kernels_directory():
    assert Path(appo.kernels.__file__).resolve().parent == REPO_ROOT / "kernels"
    assert appo.kernels.__name__ == "appo.kernels"


def test_kernel_modules_import_without_a_top_level_kernels_module():
    result = probe_from_repo_root()
    assert KERNEL_MODULES and result["loaded"] == [f"appo.kernels.{name}" for name in KERNEL_MODULES]
    # a kernel file that did `from kernels.x import y` would register the top-level name here
    assert not result["top_level_after_appo"]
    # transformers must see the Hugging Face package exactly when it is installed, never our directory
    assert result["transformers_sees"] == (result["hf_kernels"] is not None)
    if result["hf_kernels"] is not None:
        assert result["kernels_origin"] is None or not result["kernels_origin"].startswith(
            str(REPO_ROOT / "kernels")), "the repository's kernels/ shadows the Hugging Face kernels package"
