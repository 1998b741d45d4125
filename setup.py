"""Build script: the pure-Python package plus the optional extension ``appo._C``.

The extension is compiled from ``csrc/`` when sources exist there. CUDA sources (``*.cu``) are
compiled only when the installed torch is a CUDA build and ``nvcc`` is on the machine; otherwise
the extension is CPU-only. If nothing can be built, the package still installs and every op falls
back to its torch reference (``appo.prefix_cache.EXTENSION_STATUS`` says why).
"""

import glob
import os
import shutil

from setuptools import setup

PACKAGES = ["appo", "appo.ops", "appo.rollout", "appo.tools", "appo.tasks", "appo.algos",
            "appo.integrations", "appo.kernels"]
PACKAGE_DIR = {"appo": "appo", "appo.kernels": "kernels"}


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
    extra = {"cxx": ["-O3", "-std=c++17"]}
    if with_cuda:
        extra["nvcc"] = ["-O3", "-std=c++17", "--use_fast_math"]
        ext = cpp_extension.CUDAExtension(
            "appo._C", cpp_sources + cuda_sources, extra_compile_args=extra,
            define_macros=[("APPO_WITH_CUDA", "1")])
    else:
        extra["cxx"].append("-fopenmp")
        ext = cpp_extension.CppExtension(
            "appo._C", cpp_sources, extra_compile_args=extra, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = extension_modules()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
