"""The ends of the dependency ranges that pyproject.toml claims, each in a side environment (slow).

The package metadata states ranges for transformers and TRL (``[train]``, ``[trl]``); constraints.txt pins the
versions the rest of the suite runs with. Here a venv that sees this environment's packages (torch, datasets,
...) gets, on top, either the lowest versions the ranges allow (each range's lower bound) or the newest ones
pip resolves from the index, then ``pip install -e .`` of this checkout, and runs the trainer and TRL tests
with them. The venvs are kept under ``$APPO_CACHE/ranges-*`` (default ``~/.cache/appo``) and rebuilt when the
versions they should hold change.

Run with ``pytest -m ranges`` before changing a range: it downloads and takes about 15 minutes, so neither the
default run nor CI (``pytest -m slow``) includes it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("transformers", "trl")
TESTS = ("tests/test_trainer.py", "tests/integrations/test_trl.py")


def claimed_ranges() -> dict[str, Requirement]:
    """The requirement pyproject.toml states for each of PACKAGES (searched in every extra)."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    found = {}
    for requirements in extras.values():
        for text in requirements:
            requirement = Requirement(text)
            if requirement.name in PACKAGES:
                found[requirement.name] = requirement
    return found


def lowest(requirement: Requirement) -> str:
    """The version of the range's lower bound (``>=X``): the oldest release the metadata lets users have."""
    bounds = [s.version for s in requirement.specifier if s.operator == ">="]
    assert len(bounds) == 1, f"{requirement}: expected one '>=' lower bound"
    return bounds[0]


def newest(requirement: Requirement) -> str:
    """The newest release on the index inside the range, as pip resolves it."""
    report = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-deps",
                             "--ignore-installed", "--report", "-", str(requirement)],
                            capture_output=True, text=True, timeout=300, check=False)
    assert report.returncode == 0, report.stderr[-2000:]
    return json.loads(report.stdout)["install"][0]["metadata"]["version"]


def side_env(name: str, versions: dict[str, str]) -> Path:
    """A venv over this environment's site-packages holding ``versions`` and this checkout (editable)."""
    folder = Path(os.environ.get("APPO_CACHE", Path.home() / ".cache" / "appo")) / f"ranges-{name}"
    python = folder / "bin" / "python"
    stamp = folder / "appo-versions.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == versions and python.is_file():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", "--system-site-packages", folder], check=True)
    pins = [f"{package}=={version}" for package, version in versions.items()]
    for command in ([*pins], ["--no-deps", "--no-build-isolation", "-e", str(REPO)]):
        done = subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                               *command], capture_output=True, text=True, timeout=900, check=False,
                              env={**os.environ, "APPO_SKIP_EXTENSION": "1"})
        assert done.returncode == 0, f"pip install {' '.join(command)}:\n{done.stderr[-3000:]}"
    stamp.write_text(json.dumps(versions))
    return python


@pytest.mark.ranges
@pytest.mark.parametrize("end", ["lowest", "newest"])
def test_the_trainer_and_trl_tests_pass_at_each_end_of_the_claimed_ranges(end):
    ranges = claimed_ranges()
    assert set(ranges) == set(PACKAGES), f"pyproject.toml states no range for {set(PACKAGES) - set(ranges)}"
    pick = lowest if end == "lowest" else newest
    versions = {package: pick(requirement) for package, requirement in ranges.items()}
    python = side_env(end, versions)
    probe = "import transformers, trl; print(transformers.__version__, trl.__version__)"
    seen = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert [Version(v) for v in seen] == [Version(versions[p]) for p in PACKAGES], seen   # 5.0 == 5.0.0
    # -P: the checkout's root stays off sys.path (its kernels/ folder would shadow the `kernels` package
    # that newer transformers import)
    result = subprocess.run([python, "-P", "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *TESTS],
                            cwd=REPO, capture_output=True, text=True, timeout=1800, check=False)
    summary = result.stdout.strip().splitlines()[-1:] if result.stdout.strip() else []
    assert result.returncode == 0, (f"{end} ({versions}):\n{result.stdout[-4000:]}\n{result.stderr[-2000:]}")
    print(end, versions, summary)
