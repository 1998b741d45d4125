"""Build script: the pure-Python package, the extension's sources, and ``appo._C`` when torch is importable.

``appo._C`` is compiled here from ``csrc/`` only when the build can import torch, i.e. with
``pip install --no-build-isolation``. CUDA sources (``*.cu``) are compiled when the installed torch is a
CUDA build and a CUDA toolkit is found; otherwise the extension is CPU-only.

With pip's default build isolation torch is not there (it is deliberately not a build requirement): the
package installs without ``appo._C``, and the first import of ``appo.prefix_cache`` compiles it into a cache
(``appo/_extension.py``). For that, the sources travel with every install: ``csrc/`` is installed as the
package data ``appo/_csrc`` (wheel) and grafted in MANIFEST.in (sdist). ``appo.prefix_cache.EXTENSION_STATUS``
says which copy loaded, or why none did.
"""

import glob
import os
import shutil

from setuptools import setup

PACKAGES = ["appo", "appo.ops", "appo.rollout", "appo.tools", "appo.tasks", "appo.algos",
            "appo.integrations", "appo.kernels", "appo._csrc"]
PACKAGE_DIR = {"appo": "appo", "appo.kernels": "kernels", "appo._csrc": "csrc"}
PACKAGE_DATA = {"appo._csrc": ["*.cpp", "*.h", "*.cu"]}  # the sources appo/_extension.py builds from


def extension_modules():
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    if not cpp_sources or os.environ.get("APPO_SKIP_EXTENSION") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # torch is not a build requirement; without it there is nothing to build against
        return [], {}
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    with_cuda = bool(cuda_sources) and torch.version.cuda is not None and (
        shutil.which("nvcc") is not None or cpp_extension.CUDA_HOME is not None)
    if os.environ.get("APPO_FORCE_CPU_EXTENSION") == "1":
        with_cuda = False
    extra = {"cxx": ["-O3", "-std=c++17", "-fopenmp"]}  # OpenMP: at::parallel_for's threads
    if with_cuda:
        extra["nvcc"] = ["-O3", "-std=c++17", "--use_fast_math"]
        ext = cpp_extension.CUDAExtension(
            "appo._C", cpp_sources + cuda_sources, extra_compile_args=extra, extra_link_args=["-fopenmp"],
            define_macros=[("APPO_WITH_CUDA", "1")])
    else:
        ext = cpp_extension.CppExtension(
            "appo._C", cpp_sources, extra_compile_args=extra, extra_link_args=["-fopenmp"])
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
