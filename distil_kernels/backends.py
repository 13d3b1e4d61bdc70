"""Backend names and how `backend="auto"` resolves them.

`auto` is meant to pick the fused GPU backend on CUDA tensors; until one is built
into this package it picks `chunked`, which runs on every device.
"""

from __future__ import annotations

import torch

# name -> device types it runs on (None: any device)
BACKENDS: dict[str, tuple[str, ...] | None] = {
    "torch": None,
    "chunked": None,
}


def resolve_backend(backend: str, device: torch.device | None) -> str:
    """The concrete backend for `backend` on `device` (None: any); ValueError names what is available."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend == "auto":
        return "chunked"
    if backend not in BACKENDS:
        names = ", ".join(repr(n) for n in ("auto", *BACKENDS))
        raise ValueError(f"backend must be one of {names}; got {backend!r}")
    devices = BACKENDS[backend]
    if device is not None and devices is not None and device.type not in devices:
        raise ValueError(
            f"backend={backend!r} runs on {', '.join(devices)} tensors, but input is on {device}; "
            f"use backend='auto' or 'chunked'"
        )
    return backend
