"""Backend names and how `backend="auto"` resolves them.

`auto` picks `triton` on CUDA tensors when Triton >= 3.2 is installed (but for float64
input, which the kernels do not take), and `chunked` everywhere else. `triton` also
runs on CPU tensors under `TRITON_INTERPRET=1` (Triton's interpreter, for tests).
`cuda` (the compiled csrc/ extension) runs on CUDA tensors where the install built it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re

import torch

BACKENDS = ("torch", "chunked", "triton", "cuda")


# The oldest Triton the kernels compile under. Triton 3.0 and 3.1 (torch 2.4's and 2.5's)
# refuse them ("arange's arguments must be of type tl.constexpr" under their interpreters).
MIN_TRITON = (3, 2)


def major_minor(version: str) -> tuple[int, int]:
    """(major, minor) of a version string: "3.2.0", "2.4.1+cu121", "4.53.0.dev0"."""
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def _installed_triton_version() -> tuple[int, int] | None:
    """(major, minor) of the installed Triton, None without one. Read from the package's
    metadata rather than by importing it: importing Triton takes about half a second."""
    if importlib.util.find_spec("triton") is None:
        return None
    for distribution in ("triton", "pytorch-triton", "pytorch-triton-rocm", "pytorch-triton-xpu"):
        try:
            version = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
        break
    else:  # a source build with no package metadata
        import triton

        version = triton.__version__
    return major_minor(version)


# Looked up once: torch.compile (2.11) refuses to trace importlib's find_spec, and
# `resolve_backend` runs inside compiled regions.
_TRITON_VERSION = _installed_triton_version()


def triton_supported() -> bool:
    """Triton is installed, at a version the kernels support (>= 3.2)."""
    return _TRITON_VERSION is not None and _TRITON_VERSION >= MIN_TRITON


def resolve_backend(backend: str, device: torch.device | None, dtype: torch.dtype | None = None) -> str:
    """The concrete backend for `backend` on `device` and `dtype` (None: any); ValueError says why not."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend == "auto":
        if device is not None and device.type == "cuda" and triton_supported() and dtype != torch.float64:
            return "triton"
        return "chunked"
    if backend not in BACKENDS:
        names = ", ".join(repr(n) for n in ("auto", *BACKENDS))
        raise ValueError(f"backend must be one of {names}; got {backend!r}")
    if backend == "triton":
        if _TRITON_VERSION is None:
            raise ValueError("backend='triton' needs the triton package (pip install 'triton>=3.2'); "
                             "use backend='auto' or 'chunked'")
        if not triton_supported():
            found = ".".join(map(str, _TRITON_VERSION))
            raise ValueError(f"backend='triton' needs triton >= 3.2, found {found} (torch 2.4 and 2.5 "
                             f"bring Triton 3.0 and 3.1): pip install 'triton>=3.2', or use backend='auto' "
                             f"or 'chunked'")
        if device is not None and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' runs on cuda tensors (or on the CPU under TRITON_INTERPRET=1), "
                f"but input is on {device}; use backend='auto' or 'chunked'"
            )
    if backend == "cuda":
        from .cuda_ext import extension

        if device is not None and device.type != "cuda":
            raise ValueError(f"backend='cuda' runs on cuda tensors, but input is on {device}; "
                             f"use backend='auto' or 'chunked'")
        extension()  # a RuntimeError saying how to build it when the install lacks it
    return backend


def check_backend_dtype(backend: str, dtype: torch.dtype) -> None:
    if backend in ("triton", "cuda") and dtype == torch.float64:
        raise TypeError(f"backend={backend!r} takes float16, bfloat16 or float32 input, got torch.float64; "
                        "use backend='chunked' or 'torch' for float64")
