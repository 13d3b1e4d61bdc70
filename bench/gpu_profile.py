"""Where one GPU call's time goes: its kernels, the idle gaps between them, the host.

`print_profile(fn, label)` prints, for one call of `fn` after a warm-up:
- wall: CUDA events around one call (what the benches time), and the mean of 10
  back-to-back calls (where the host cannot keep up with the GPU, this is host time);
- the GPU kernels' own time and count, and the span from the first kernel's start to the
  last one's end: wall well above the kernels' time means the GPU waited, on the host
  (Python, launches, a sync) or on a gap between kernels;
- the kernels by their own time, and the widest gaps between consecutive kernels with the
  kernel before each, which says where the GPU waited.
Used by `python -m bench loss|sample|topk --device cuda --profile`.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from .report import progress

BACK_TO_BACK = 10


def _own_us(event) -> float:
    # `self_cuda_time_total` was renamed `self_device_time_total` in torch 2.4's profiler.
    return float(getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0))


def _is_device(event) -> bool:
    return str(getattr(event, "device_type", "")).endswith(("CUDA", "PrivateUse1"))


def _event_ms(fn: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def print_profile(fn: Callable[[], object], label: str, top: int = 8, gaps: int = 5) -> None:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    wall_ms = min(_event_ms(fn) for _ in range(3))
    started = time.perf_counter()
    for _ in range(BACK_TO_BACK):
        fn()
    torch.cuda.synchronize()
    back_to_back_ms = (time.perf_counter() - started) * 1e3 / BACK_TO_BACK
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()

    kernels = sorted((e for e in prof.events() if _is_device(e)), key=lambda e: e.time_range.start)
    busy_ms = sum(e.time_range.end - e.time_range.start for e in kernels) / 1e3
    span_ms = (kernels[-1].time_range.end - kernels[0].time_range.start) / 1e3 if kernels else 0.0
    progress(f"  profile {label}: wall {wall_ms:.3f} ms (events, one call), {back_to_back_ms:.3f} ms a call back to "
             f"back; kernels {busy_ms:.3f} ms in {len(kernels)} launches over a {span_ms:.3f} ms span")
    by_name = sorted((e for e in prof.key_averages() if _own_us(e) > 0), key=_own_us, reverse=True)
    for event in by_name[:top]:
        progress(f"    {_own_us(event) / 1e3:9.3f} ms  x{event.count:<4d} {event.key[:96]}")
    widest = sorted(((b.time_range.start - a.time_range.end, a, b) for a, b in zip(kernels, kernels[1:])),
                    key=lambda item: item[0], reverse=True)
    for gap_us, before, after in widest[:gaps]:
        if gap_us < 5.0:
            break
        progress(f"    gap {gap_us / 1e3:7.3f} ms after {before.name[:60]} (before {after.name[:40]})")
