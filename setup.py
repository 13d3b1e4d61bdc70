"""Build script: the Python package always; CUDA extensions from csrc/ only where they can be built.

The package imports and works without any compiled extension. The extension is built
when csrc/ holds its torch binding (csrc/torch_binding.cpp, the module's entry point;
the kernels' .cu files compile alone, see tests/csrc), nvcc is found and torch is a
CUDA build; set DISTIL_KERNELS_SKIP_CUDA_BUILD=1 to skip it, DISTIL_KERNELS_CUDA_ARCHS
(default "8.0;9.0") to choose target architectures, MAX_JOBS to bound parallel compiles.
"""

import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import setup


def csrc_source_hash(csrc):
    # distil_kernels/cuda_ext.py holds the digest the package checks a build against; it is
    # loaded by path, since importing the package here would need its dependencies.
    spec = importlib.util.spec_from_file_location("_cuda_ext", Path("distil_kernels") / "cuda_ext.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.csrc_source_hash(csrc)


def cuda_extensions():
    csrc = Path("csrc")
    sources = sorted(str(p) for p in csrc.glob("**/*.cu")) + sorted(str(p) for p in csrc.glob("**/*.cpp"))
    binding = csrc / "torch_binding.cpp"
    if (not binding.exists() or os.environ.get("DISTIL_KERNELS_SKIP_CUDA_BUILD") == "1"
            or shutil.which("nvcc") is None):
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
        # No --use_fast_math: the Gumbel transform's logs (csrc/gumbel.h) must be accurate to
        # an ulp, or a seed could draw other ids than on the other backends; kernels call
        # __expf and __fdividef where the fast form is meant.
        extra_compile_args={"cxx": ["-O3", f"-DDISTIL_KERNELS_SOURCE_HASH=h{csrc_source_hash(csrc)}"],
                            "nvcc": ["-O3", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
