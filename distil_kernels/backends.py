"""Backend names and how `backend="auto"` resolves them.

`auto` picks `triton` on CUDA tensors when Triton is installed (but for float64
input, which the kernels do not take), and `chunked` everywhere else. `triton` also
runs on CPU tensors under `TRITON_INTERPRET=1` (Triton's interpreter, for tests).
`cuda` (the compiled csrc/ extension) runs on CUDA tensors where the install built it.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("torch", "chunked", "triton", "cuda")


# Looked up once: torch.compile (2.11) refuses to trace importlib's find_spec, and
# `resolve_backend` runs inside compiled regions.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def resolve_backend(backend: str, device: torch.device | None, dtype: torch.dtype | None = None) -> str:
    """The concrete backend for `backend` on `device` and `dtype` (None: any); ValueError says why not."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend == "auto":
        if device is not None and device.type == "cuda" and triton_installed() and dtype != torch.float64:
            return "triton"
        return "chunked"
    if backend not in BACKENDS:
        names = ", ".join(repr(n) for n in ("auto", *BACKENDS))
        raise ValueError(f"backend must be one of {names}; got {backend!r}")
    if backend == "triton":
        if not triton_installed():
            raise ValueError("backend='triton' needs the triton package (pip install triton); "
                             "use backend='auto' or 'chunked'")
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
