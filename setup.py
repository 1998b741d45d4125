"""Build script: the pure-Python package, the extension's sources, and ``appo._C`` when torch is importable.

``appo._C`` is compiled here from ``csrc/`` only when the build can import torch, i.e. with
``pip install --no-build-isolation``. CUDA sources (``*.cu``) are compiled when the installed torch is a
CUDA build and a CUDA toolkit is found; otherwise the extension is CPU-only. The flags come from
``appo/_extension.py`` (``compile_flags``, ``wants_cuda``), the same definition the on-first-use build uses.

With pip's default build isolation torch is not there (it is deliberately not a build requirement): the
package installs without ``appo._C``, and the first use of the C++ gather compiles it into a cache
(``appo/_extension.py``). For that, the sources travel with every install: ``csrc/`` is installed as the
package data ``appo/_csrc`` (wheel) and grafted in MANIFEST.in (sdist). ``appo.prefix_cache.EXTENSION_STATUS``
says which copy loaded, or why none did.

Packages are discovered (every subpackage of ``appo/`` ships); ``kernels/`` is installed as ``appo.kernels``
(never as a top-level ``kernels`` module) and ``csrc/`` as ``appo._csrc``.
"""

import glob
import importlib.util
import os
import shutil

from setuptools import find_packages, setup

PACKAGES = find_packages(include=["appo", "appo.*"]) + ["appo.kernels", "appo._csrc"]
PACKAGE_DIR = {"appo": "appo", "appo.kernels": "kernels", "appo._csrc": "csrc"}
PACKAGE_DATA = {"appo._csrc": ["*.cpp", "*.h", "*.cu"]}  # the sources appo/_extension.py builds from


def build_definition():
    """``appo/_extension.py`` loaded by path (importing the package would need its dependencies)."""
    spec = importlib.util.spec_from_file_location("_appo_extension", os.path.join("appo", "_extension.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension_modules():
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    if not cpp_sources or os.environ.get("APPO_SKIP_EXTENSION") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # torch is not a build requirement; without it there is nothing to build against
        return [], {}
    definition = build_definition()
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    cuda_home = cpp_extension.CUDA_HOME or shutil.which("nvcc")
    with_cuda = definition.wants_cuda(bool(cuda_sources), torch.version.cuda, cuda_home)
    flags = definition.compile_flags(with_cuda)
    compile_args = {key: flags[key] for key in ("cxx", "nvcc") if key in flags}
    kind = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    ext = kind("appo._C", cpp_sources + (cuda_sources if with_cuda else []), extra_compile_args=compile_args,
               extra_link_args=flags["ldflags"], define_macros=flags["define_macros"])
    use_ninja = shutil.which("ninja") is not None
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=use_ninja)}


ext_modules, cmdclass = extension_modules()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data=PACKAGE_DATA,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
