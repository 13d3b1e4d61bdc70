"""Shared harness of `python -m bench sample` and `python -m bench topk`.

Each provider is one way of getting the same answer from hidden states [B, d] and a
head [V, d]: ours (`linear_sample` / `linear_topk`, the `auto` backend), and what a user
writes with PyTorch (matmul, softmax, multinomial or topk), eagerly and under
`torch.compile`. Time is the median (p20, p80) of repeated calls after a warm-up:
`triton.testing.do_bench` on CUDA, `time.perf_counter` on the CPU. Rows are appended to
bench/out/<suite>_<device>.csv with the machine, versions and commit.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from .report import OUT_DIR, Column, append_csv, fixed, format_table, machine_info, progress

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Provider:
    name: str
    build: Callable[[torch.Tensor, torch.Tensor], Callable[[], object]]  # (x, weight) -> call


def time_ms(call: Callable[[], object], device: str, repeats: int) -> tuple[float, float, float]:
    if device == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(call, warmup=10, rep=100, quantiles=[0.5, 0.2, 0.8]))
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return statistics.median(times), pick(0.2), pick(0.8)


COLUMNS = [
    Column("provider", "provider", left=True), Column("dtype", "dtype", left=True),
    Column("B", "B"), Column("d", "d"), Column("V", "V"),
    Column("time_ms", "time_ms", fixed(2)), Column("p20_ms", "p20", fixed(2)), Column("p80_ms", "p80", fixed(2)),
    Column("vs_matmul", "vs matmul", fixed(2)),
]
CSV_FIELDS = ["timestamp", "host", "cpu", "torch", "commit", "device", "suite", "provider", "dtype", "B", "d", "V",
              "time_ms", "p20_ms", "p80_ms", "vs_matmul"]


def run_suite(suite: str, providers: list[Provider], shapes: list[tuple[int, int, int]], dtypes: list[str],
              device: str, repeats: int, csv: str | None) -> int:
    """Time every provider on every shape and dtype; print a table; append CSV rows."""
    info = machine_info()
    csv_path = Path(csv) if csv else OUT_DIR / f"{suite}_{device}.csv"
    rows = []
    for batch, dim, vocab in shapes:
        for dtype in dtypes:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(batch, dim, generator=gen).to(device, DTYPES[dtype])
            weight = (torch.randn(vocab, dim, generator=gen) * (4.0 / dim**0.5)).to(device, DTYPES[dtype])
            matmul = None
            for provider in providers:
                progress(f"{suite}: {provider.name} {dtype} B={batch} d={dim} V={vocab} ...")
                median, p20, p80 = time_ms(provider.build(x, weight), device, repeats)
                if provider.name == "matmul":
                    matmul = median
                rows.append({
                    "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), **info,
                    "device": device, "suite": suite, "provider": provider.name, "dtype": dtype,
                    "B": batch, "d": dim, "V": vocab, "time_ms": round(median, 3), "p20_ms": round(p20, 3),
                    "p80_ms": round(p80, 3), "vs_matmul": None if matmul is None else round(median / matmul, 3),
                })
                append_csv(csv_path, rows[-1:], CSV_FIELDS)
    print(f"{suite} on {device}: {info['cpu']}, torch {info['torch']}, commit {info['commit']}")
    print(format_table(rows, COLUMNS, group_by=lambda r: (r["B"], r["d"], r["V"], r["dtype"])))
    print(f"\n{len(rows)} rows appended to {csv_path}")
    return 0


def compiled(fn: Callable) -> Callable:
    """torch.compile'd `fn`, compiled on first use."""
    return torch.compile(fn, dynamic=False)
