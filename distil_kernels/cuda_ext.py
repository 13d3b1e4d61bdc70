"""The compiled CUDA extension `distil_kernels._C` (csrc/), where the install built it.

`setup.py` builds it when nvcc and a CUDA build of torch are present; everything else in
the package works without it, and only `backend="cuda"` asks for it.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

_HOW_TO_BUILD = (
    "reinstall where nvcc and a CUDA build of torch are present (pip install -e . --no-build-isolation, "
    "without DISTIL_KERNELS_SKIP_CUDA_BUILD=1), or use backend='triton' or 'chunked'"
)


# Looked up once: `backend="cuda"` asks on every call, and torch.compile (2.11) refuses to
# trace importlib's find_spec.
_EXTENSION_AVAILABLE = importlib.util.find_spec("distil_kernels._C") is not None


def extension_available() -> bool:
    return _EXTENSION_AVAILABLE


def extension() -> ModuleType:
    """The extension module; a RuntimeError that says how to get it when it is missing."""
    if not extension_available():
        raise RuntimeError(f"backend='cuda' needs the compiled extension distil_kernels._C, which this install "
                           f"lacks: {_HOW_TO_BUILD}")
    return importlib.import_module("distil_kernels._C")
