"""Build script: the Python package always; CUDA extensions from csrc/ only where they can be built.

The package imports and works without any compiled extension. Extensions are built
when csrc/ holds sources, nvcc is found and torch is a CUDA build; set
DISTIL_KERNELS_SKIP_CUDA_BUILD=1 to skip them, DISTIL_KERNELS_CUDA_ARCHS (default
"8.0;9.0") to choose target architectures, MAX_JOBS to bound parallel compiles.
"""

import os
import shutil
from pathlib import Path

from setuptools import setup


def cuda_extensions():
    sources = sorted(str(p) for p in Path("csrc").glob("**/*.cu")) + sorted(str(p) for p in Path("csrc").glob("**/*.cpp"))
    if not sources or os.environ.get("DISTIL_KERNELS_SKIP_CUDA_BUILD") == "1" or shutil.which("nvcc") is None:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None:
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("DISTIL_KERNELS_CUDA_ARCHS", "8.0;9.0"))
    ext = CUDAExtension(
        "distil_kernels._C",
        sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
