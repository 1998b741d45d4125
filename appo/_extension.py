"""Build ``appo._C`` on first use when no prebuilt copy is installed.

``pip install --no-build-isolation -e .`` compiles ``appo._C`` at install time, against the torch already
installed. An install that cannot see torch while it builds (``pip install -e .`` with pip's default build
isolation, or an install from the sdist or a pure-Python wheel) has no compiled extension. The first use
of the C++ gather (``appo.prefix_cache.gather_kv`` and what calls it, or a read of
``appo.prefix_cache.EXTENSION_STATUS``) then compiles the same sources here (about 10 s on 2 cores) with
``torch.utils.cpp_extension.load`` and ninja, into a per-user cache; it says so in one line on stderr and
loads the library. Later processes load the cached copy at once. The cache folder is keyed by a hash of the
sources, the flags and the torch/Python versions, so a changed source or a new torch builds a fresh copy.

CUDA sources (``csrc/*.cu``) are compiled too when torch is a CUDA build and a CUDA toolkit is found.
``compile_flags`` and ``wants_cuda`` are the one build definition; setup.py loads this file to use them.
``APPO_BUILD_EXTENSION=0`` turns the build off (the torch references are used). Needs a C++ compiler, the
Python headers and ninja (a dependency of appo).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

NAME = "appo_C"
_SOURCE_SUFFIXES = (".cpp", ".h", ".cu")


def compile_flags(with_cuda: bool) -> dict:
    """The one definition of how ``appo._C`` is compiled, used by setup.py (install time) and by
    ``build_plan`` (first use): {"cxx": [...], "nvcc": [...] (CUDA only), "ldflags": [...],
    "define_macros": [(name, value)]}. OpenMP gives at::parallel_for its threads."""
    flags = {"cxx": ["-O3", "-std=c++17", "-fopenmp"], "ldflags": ["-fopenmp"], "define_macros": []}
    if with_cuda:
        flags["nvcc"] = ["-O3", "-std=c++17", "--use_fast_math"]
        flags["define_macros"] = [("APPO_WITH_CUDA", "1")]
    return flags


def wants_cuda(has_cuda_sources: bool, torch_cuda_version: str | None, cuda_home: str | None) -> bool:
    """Whether to compile the CUDA sources: there are some, torch is a CUDA build, a toolkit is found, and
    ``APPO_FORCE_CPU_EXTENSION=1`` is not set."""
    if os.environ.get("APPO_FORCE_CPU_EXTENSION") == "1":
        return False
    return has_cuda_sources and torch_cuda_version is not None and cuda_home is not None


def source_dir() -> Path | None:
    """The folder with the extension's sources: ``appo/_csrc`` in an installed wheel, else the repository's
    ``csrc/`` beside the package (a clone or an editable install); None when neither exists."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "_csrc", package.parent / "csrc"):
        if any(candidate.glob("*.cpp")):
            return candidate
    return None


def cache_root() -> Path:
    """Where built copies go: ``$APPO_CACHE/extensions`` (default ``~/.cache/appo/extensions``)."""
    return Path(os.environ.get("APPO_CACHE", Path.home() / ".cache" / "appo")) / "extensions"


def build_plan(sources: Path) -> dict:
    """What to compile from ``sources``: {"sources": [paths], "with_cuda", "cflags", "cuda_cflags", "ldflags",
    "directory"}. The directory is ``cache_root()/appo_C-<hash>``, the hash covering every source and header,
    the flags and the torch, CUDA and Python versions."""
    import torch
    from torch.utils import cpp_extension

    cpp = sorted(sources.glob("*.cpp"))
    cuda = sorted(sources.glob("*.cu"))
    with_cuda = wants_cuda(bool(cuda), torch.version.cuda, cpp_extension.CUDA_HOME)
    flags = compile_flags(with_cuda)
    cflags = flags["cxx"] + [f"-D{name}={value}" for name, value in flags["define_macros"]]
    cuda_cflags = flags.get("nvcc", []) + [f"-D{name}={value}" for name, value in flags["define_macros"]]
    ldflags = flags["ldflags"]
    digest = hashlib.sha256()
    for item in (torch.__version__, str(torch.version.cuda), sys.version, sys.platform, *cflags, *cuda_cflags,
                 *ldflags):
        digest.update(item.encode() + b"\0")
    for path in sorted(p for p in sources.iterdir() if p.suffix in _SOURCE_SUFFIXES):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return {"sources": [str(p) for p in cpp + (cuda if with_cuda else [])], "with_cuda": with_cuda,
            "cflags": cflags, "cuda_cflags": cuda_cflags, "ldflags": ldflags,
            "directory": cache_root() / f"{NAME}-{digest.hexdigest()[:16]}"}


def load_or_build() -> tuple[bool, str]:
    """Load the cached build of ``appo._C``, compiling it first when there is none; registers
    ``torch.ops.appo.*``. Returns (loaded, what happened), never raises: a failed build is reported in the
    string and the caller falls back to the torch references."""
    if os.environ.get("APPO_BUILD_EXTENSION", "1") == "0":
        return False, "the on-first-use build is off (APPO_BUILD_EXTENSION=0)"
    sources = source_dir()
    if sources is None:
        return False, "no csrc/ sources to build it from"
    import torch

    try:
        plan = build_plan(sources)
        library = plan["directory"] / f"{NAME}.so"
        if library.is_file():
            torch.ops.load_library(str(library))
            return True, f"built on first use, cached in {plan['directory']}"
        return True, _build(plan)
    except Exception as err:  # a missing compiler, ninja or header: say what and fall back
        message = " ".join(str(err).split())
        return False, f"building it on first use failed ({type(err).__name__}: {message[-600:]})"


def _build(plan: dict) -> str:
    from torch.utils import cpp_extension

    kind = "C++ and CUDA" if plan["with_cuda"] else "C++"
    print(f"appo: compiling the {kind} extension appo._C into {plan['directory']} (first use only; later "
          "runs load it from there)", file=sys.stderr, flush=True)
    plan["directory"].mkdir(parents=True, exist_ok=True)
    cpp_extension.load(NAME, plan["sources"], extra_cflags=plan["cflags"],
                       extra_cuda_cflags=plan["cuda_cflags"], extra_ldflags=plan["ldflags"],
                       build_directory=str(plan["directory"]), with_cuda=plan["with_cuda"],
                       is_python_module=False, verbose=False)
    return f"built on first use into {plan['directory']}"
