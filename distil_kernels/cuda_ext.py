"""The compiled CUDA extension `distil_kernels._C` (csrc/), where the install built it.

`setup.py` builds it when nvcc and a CUDA build of torch are present; everything else in
the package works without it, and only `backend="cuda"` asks for it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from pathlib import Path
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


# An editable install keeps csrc/ beside the package: there a build older than the sources
# it sits next to is caught before it runs (its bindings may lack an argument or a kernel,
# or a kernel may keep a fixed bug), instead of failing later or computing other numbers.
_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_loaded: ModuleType | None = None


def csrc_source_hash(csrc: Path) -> str:
    """A digest of every source in `csrc` (names and bytes); setup.py compiles it into the build."""
    digest = hashlib.sha256()
    for path in sorted(p for p in csrc.rglob("*") if p.suffix in (".cu", ".cpp", ".h")):
        digest.update(path.relative_to(csrc).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def extension() -> ModuleType:
    """The extension module; a RuntimeError that says how to get it when it is missing or stale."""
    global _loaded
    if _loaded is not None:
        return _loaded
    if not extension_available():
        raise RuntimeError(f"backend='cuda' needs the compiled extension distil_kernels._C, which this install "
                           f"lacks: {_HOW_TO_BUILD}")
    module = importlib.import_module("distil_kernels._C")
    if (_CSRC / "torch_binding.cpp").exists():
        built = getattr(module, "source_hash", "(none recorded)")
        current = csrc_source_hash(_CSRC)
        if built != current:
            raise RuntimeError(f"distil_kernels._C was built from other csrc/ sources than {_CSRC} holds now "
                               f"(built from {built}, the sources are {current}): rebuild it with "
                               f"pip install -e . --no-build-isolation")
    _loaded = module
    return module
