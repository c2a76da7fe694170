"""Builds the native ops in ``ops/`` into ``scene3d._C`` (metadata lives in pyproject.toml).

CPU kernels (``ops/*_cpu.cpp`` and the schema in ``ops/*.cpp``) are always compiled. CUDA kernels
(``ops/*.cu``) are compiled when torch is a CUDA build and nvcc is found (``CUDA_HOME``), or when
``SCENE3D_FORCE_CUDA=1``; ``SCENE3D_NO_CUDA=1`` skips them. Install with ``--no-build-isolation`` so the
extension is built against the torch already in the environment.
"""

from __future__ import annotations

import glob
import os

from setuptools import setup

ext_modules = []
cmdclass = {}
sources_cpp = sorted(glob.glob("ops/*.cpp"))
if sources_cpp and os.environ.get("SCENE3D_NO_EXT") != "1":
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources_cu = sorted(glob.glob("ops/*.cu"))
    want_cuda = os.environ.get("SCENE3D_FORCE_CUDA") == "1" or (
        torch.version.cuda is not None and CUDA_HOME is not None
    )
    want_cuda = want_cuda and bool(sources_cu) and os.environ.get("SCENE3D_NO_CUDA") != "1"
    extra = {"cxx": ["-O3", "-std=c++17"]}
    if want_cuda:
        extra["nvcc"] = ["-O3", "-std=c++17"]
        ext = CUDAExtension(
            "scene3d._C", sources_cpp + sources_cu, include_dirs=[os.path.abspath("ops")],
            define_macros=[("SCENE3D_WITH_CUDA", "1")], extra_compile_args=extra,
        )
    else:
        ext = CppExtension(
            "scene3d._C", sources_cpp, include_dirs=[os.path.abspath("ops")], extra_compile_args=extra,
        )
    ext_modules.append(ext)
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=False)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
