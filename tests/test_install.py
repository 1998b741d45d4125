"""The installs a user gets, each in a fresh venv with torch installed first (as scripts/install.sh does):

- the sdist (built with build isolation, like the wheel) carries csrc/, installs only the core dependencies,
  and computes ``appo.branching_score()`` without importing the training stack;
- without a compiled ``appo._C`` (torch is never a build requirement), the first use of the C++ gather in
  ``appo.prefix_cache`` compiles it into the cache and the C++ gather runs, both from the sdist install and
  from ``pip install -e .`` with pip's default build isolation.

The venv tests are slow (pip and two compiles: a few minutes); one fast test checks in this environment that
the scoring API imports nothing of the training stack.
"""

import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("csrc/prefix_cache.cpp", "csrc/prefix_cache.h", "csrc/prefix_cache_cuda.cu")
TRAINING_STACK = ("yaml", "tqdm", "matplotlib", "safetensors", "transformers", "bm25s", "triton")

CORE_SCRIPT = """
import sys, importlib.util
import torch
loaded_by_torch = set(sys.modules)  # torch.hub itself imports tqdm when it is installed
import appo
torch.manual_seed(0)
B, T, V = 3, 40, 500
logits = torch.randn(B, T, V)
tokens = torch.distributions.Categorical(logits=logits).sample()
mask = torch.ones(B, T, dtype=torch.bool); mask[:, :5] = False
stats = appo.token_stats(logits, tokens)
bs = appo.branching_score(tokens=tokens, old_logprobs=stats.logprobs + 0.1 * torch.randn(B, T), mask=mask,
                          logits=logits)
rows, positions = appo.select_branch_points(bs.score, k=2)
assert bs.score.shape == (B, T) and torch.isfinite(bs.score[bs.candidates]).all() and len(rows) == 2 * B
print("imported:", sorted(m for m in %r if m in set(sys.modules) - loaded_by_torch))
print("installed:", sorted(m for m in %r if importlib.util.find_spec(m) is not None))
""" % (TRAINING_STACK, TRAINING_STACK)

GATHER_SCRIPT = """
import torch
from appo import prefix_cache as pc
assert pc.EXTENSION_LOADED, pc.EXTENSION_STATUS
print(pc.EXTENSION_STATUS)
torch.manual_seed(0)
keys, values = [torch.randn(3, 2, 9, 4) for _ in range(2)], [torch.randn(3, 2, 9, 4) for _ in range(2)]
src, length = torch.tensor([2, 0, 2]), torch.tensor([5, 8, 1])
fast = pc.gather_kv(keys, values, src, length, 8, impl="cpp")
slow = pc.gather_kv_reference(keys, values, src, length, 8)
assert all(torch.equal(a, b) for a, b in zip(fast[0] + fast[1], slow[0] + slow[1]))
print("gather ok")
"""


def run(*args, cwd=None, env=None, timeout=900) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    command = " ".join(map(str, args))
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv with torch (this machine's version, the local wheel when there is one) installed first;
    each test then installs appo into it its own way."""
    folder = tmp_path_factory.mktemp("venv")
    run(sys.executable, "-m", "venv", folder)
    python = folder / "bin" / "python"
    run(python, "-m", "pip", "install", "--quiet", f"torch=={torch.__version__.split('+')[0]}")
    return python


def clean_env(python: Path, home: Path) -> dict:
    """A minimal environment: the venv first on PATH (its ninja), a fresh HOME and appo cache."""
    return {"PATH": f"{python.parent}:/usr/bin:/bin", "HOME": str(home), "APPO_CACHE": str(home / "cache")}


def source_copy(folder: Path) -> Path:
    """The repository's files as a clone has them (tracked and not ignored, as they are on disk now)."""
    listed = run("git", "ls-files", "--cached", "--others", "--exclude-standard", cwd=REPO).stdout.split("\n")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """The sdist and the wheel, built from a copy of the repository with build isolation."""
    pytest.importorskip("build", reason="the `build` package is part of appo[test]")
    root = tmp_path_factory.mktemp("dist")
    source = source_copy(root / "src")
    run(sys.executable, "-m", "build", "--outdir", root / "out", source)
    return next((root / "out").glob("appo-*.tar.gz")), next((root / "out").glob("appo-*.whl")), source


def test_scoring_api_imports_no_training_stack():
    """`import appo` and appo.branching_score() load none of yaml, tqdm, matplotlib, safetensors,
    transformers (here they are installed, so importing them would show; torch's own imports aside)."""
    result = run(sys.executable, "-c", CORE_SCRIPT, cwd=REPO / "tests")
    assert "imported: []" in result.stdout, result.stdout


@pytest.mark.slow
def test_sdist_and_wheel_carry_the_extension_sources(dist):
    sdist, wheel, _ = dist
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert set(SOURCES) <= names
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {f"appo/_csrc/{Path(s).name}" for s in SOURCES} <= names
    assert not any(n.endswith(".so") for n in names)  # built without torch: a pure-Python wheel


@pytest.mark.slow
def test_sdist_in_a_core_only_venv(dist, venv, tmp_path):
    sdist, _, _ = dist
    run(venv, "-m", "pip", "install", "--quiet", sdist)
    core = run(venv, "-c", CORE_SCRIPT, cwd=tmp_path).stdout
    assert "imported: []" in core and "installed: []" in core, core  # torch + numpy (+ ninja) only
    first = run(venv, "-c", GATHER_SCRIPT, cwd=tmp_path, env=clean_env(venv, tmp_path))
    assert "compiling the C++ extension appo._C" in first.stderr and "gather ok" in first.stdout
    assert "built on first use" in first.stdout
    again = run(venv, "-c", GATHER_SCRIPT, cwd=tmp_path, env=clean_env(venv, tmp_path))
    assert "compiling" not in again.stderr and "gather ok" in again.stdout  # loaded from the cache


@pytest.mark.slow
def test_editable_install_with_build_isolation_gets_the_extension(dist, venv, tmp_path):
    _, _, source = dist
    run(venv, "-m", "pip", "install", "--quiet", "-e", source)  # pip's default: build isolation
    assert not list((source / "appo").glob("_C*.so"))  # nothing compiled at install time
    result = run(venv, "-c", GATHER_SCRIPT, cwd=tmp_path, env=clean_env(venv, tmp_path))
    assert "built on first use" in result.stdout and "gather ok" in result.stdout
    assert str(source / "appo") in run(venv, "-c", "import appo; print(appo.__file__)", cwd=tmp_path).stdout


TOOL_SCRIPT = """
from appo.tools.python_sandbox import PythonTool
print(PythonTool().run("import sys; print(sum(range(10)), sys.prefix)"))
"""


@pytest.fixture(scope="module")
def train_venv(tmp_path_factory, dist) -> Path:
    """A fresh venv with torch, then the [train] dependencies at constraints.txt's versions (pulled in by the
    wheel, which is then removed): each artifact's install below resolves them again, already satisfied."""
    folder = tmp_path_factory.mktemp("train-venv")
    run(sys.executable, "-m", "venv", folder)
    python = folder / "bin" / "python"
    run(python, "-m", "pip", "install", "--quiet", f"torch=={torch.__version__.split('+')[0]}")
    run(python, "-m", "pip", "install", "--quiet", "-c", REPO / "constraints.txt", f"{dist[1]}[train]")
    run(python, "-m", "pip", "uninstall", "--quiet", "--yes", "appo")
    return python


@pytest.mark.slow
@pytest.mark.parametrize("artifact", ["wheel", "sdist"])
def test_a_non_editable_install_runs_the_python_tool_and_a_training_step(artifact, dist, train_venv,
                                                                          tiny_model_dir, tmp_path):
    """`pip install <wheel or sdist>[train]` into a fresh venv (torch first, then the tested versions of
    constraints.txt), run from outside the repository: every subpackage is there (the sandbox included), the
    python tool runs confined, and `appo train steps=1` completes a step with it."""
    from appo.tools.python_sandbox import PythonTool, SandboxUnavailable

    try:
        PythonTool()
    except SandboxUnavailable as err:
        pytest.skip(f"the python tool has no sandbox on this machine: {err}")
    sdist, wheel, _ = dist
    python, folder = train_venv, train_venv.parents[1]
    package = wheel if artifact == "wheel" else sdist
    run(python, "-m", "pip", "install", "--quiet", "-c", REPO / "constraints.txt", f"{package}[train]")
    try:
        _tool_and_step(python, folder, tiny_model_dir, tmp_path)
    finally:
        run(python, "-m", "pip", "uninstall", "--quiet", "--yes", "appo")


def _tool_and_step(python: Path, folder: Path, tiny_model_dir, tmp_path: Path) -> None:
    """From outside the repository: appo is the installed copy, the python tool runs, one step trains."""
    work = tmp_path / "work"
    work.mkdir()
    env = {**clean_env(python, tmp_path / "home"), "APPO_BUILD_EXTENSION": "0"}
    where = run(python, "-c", "import appo; print(appo.__file__)", cwd=work, env=env).stdout
    assert str(folder) in where and str(REPO) not in where  # the installed copy, not the clone
    tool = run(python, "-c", TOOL_SCRIPT, cwd=work, env=env).stdout
    assert "45" in tool and "error" not in tool.lower(), tool
    appo_cli = folder / "bin" / "appo"
    result = run(appo_cli, "train", f"model.name_or_path={tiny_model_dir}", "device=cpu", "threads=1",
                 "steps=1", "prompts_per_step=2", "optim.minibatches_per_step=1", "data.train_size=4",
                 "eval_at_end=false", "rollout.max_prompt_tokens=1500", "rollout.max_total_tokens=1540",
                 "rollout.max_new_tokens_per_turn=8", f"output_dir={work / 'run'}", cwd=work, env=env)
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "step" in r][:1] == [1], result.stdout[-2000:]
