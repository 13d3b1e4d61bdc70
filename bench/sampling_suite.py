"""Shared harness of `python -m bench sample` and `python -m bench topk`.

Each provider is one way of getting the same answer from hidden states [B, d] and a
head [V, d]: ours (`linear_sample` / `linear_topk`: the `auto` backend, and on CUDA the
`triton` and `chunked` backends by name), and what a user writes with PyTorch (matmul,
softmax, multinomial or topk), eagerly and under `torch.compile`, and on CUDA FlashInfer
when it is installed. Time is the median (p20, p80) of repeated calls after a warm-up:
`triton.testing.do_bench` on CUDA, `time.perf_counter` on the CPU. On CUDA `temp_mib` is
the call's temporary memory: the peak allocated during one call minus the allocation
before it (outputs included), from `torch.cuda.max_memory_allocated`. Rows are appended
to bench/out/<suite>_<device>.csv with the machine, versions and commit (and on CUDA
the GPU, Triton's version and temp_mib).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .report import OUT_DIR, Column, append_csv, fixed, format_table, machine_info, progress

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Provider:
    name: str
    build: Callable[[torch.Tensor, torch.Tensor], Callable[[], object]]  # (x, weight) -> call
    # A competitor outside this repository (FlashInfer): if it fails, one line says so
    # and the suite goes on without its row.
    optional: bool = False


def time_ms(call: Callable[[], object], device: str, repeats: int, rep_ms: int = 100) -> tuple[float, float, float]:
    """(median, p20, p80) in ms; on CUDA `do_bench` repeats for about `rep_ms` after its warm-up."""
    if device == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(call, warmup=max(rep_ms // 10, 5), rep=rep_ms,
                                             quantiles=[0.5, 0.2, 0.8]))
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    # Linearly interpolated quantiles, as do_bench and bench/measure.py compute them (the
    # element at int(q * n) made p80 the slowest call at 3 or 5 repeats).
    median, p20, p80 = np.quantile(times, [0.5, 0.2, 0.8])
    return float(median), float(p20), float(p80)


def temporary_mib(call: Callable[[], object]) -> float:
    """Peak CUDA memory allocated during one call beyond what was allocated before it, MiB."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return peak / 2**20


COLUMNS = [
    Column("provider", "provider", left=True), Column("dtype", "dtype", left=True),
    Column("B", "B"), Column("d", "d"), Column("V", "V"),
    Column("time_ms", "time_ms", fixed(2)), Column("p20_ms", "p20", fixed(2)), Column("p80_ms", "p80", fixed(2)),
    Column("vs_matmul", "vs matmul", fixed(2)),
]
CUDA_COLUMNS = COLUMNS + [Column("temp_mib", "temp_mib", fixed(2))]
CSV_FIELDS = ["timestamp", "host", "cpu", "torch", "commit", "device", "suite", "provider", "dtype", "B", "d", "V",
              "time_ms", "p20_ms", "p80_ms", "vs_matmul"]
CUDA_CSV_FIELDS = CSV_FIELDS[:4] + ["gpu", "triton"] + CSV_FIELDS[4:] + ["temp_mib"]


def make_inputs(batch: int, dim: int, vocab: int, dtype: str, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x ~ N(0, 1) [B, d] and weight ~ N(0, (4 / sqrt(d))^2) [V, d]: logits about N(0, 16)."""
    if device == "cuda":
        # Made on the GPU: a 152064 x 3584 head takes seconds to draw on the CPU.
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(batch, dim, generator=gen, device="cuda").to(DTYPES[dtype])
        weight = (torch.randn(vocab, dim, generator=gen, device="cuda") * (4.0 / dim**0.5)).to(DTYPES[dtype])
        return x, weight
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, dim, generator=gen).to(device, DTYPES[dtype])
    weight = (torch.randn(vocab, dim, generator=gen) * (4.0 / dim**0.5)).to(device, DTYPES[dtype])
    return x, weight


def run_suite(suite: str, providers: list[Provider], shapes: list[tuple[int, int, int]], dtypes: list[str],
              device: str, repeats: int, csv: str | None, rep_ms: int = 100, profile: bool = False
              ) -> tuple[list[dict], list[str]]:
    """Time every provider on every shape and dtype; print a table; append CSV rows; return the rows
    and one line per failure of our own providers (each failure ends only its own row)."""
    info = machine_info()
    cuda = device == "cuda"
    if cuda:
        import triton

        info = {**info, "gpu": torch.cuda.get_device_name(), "triton": triton.__version__}
    csv_path = Path(csv) if csv else OUT_DIR / f"{suite}_{device}.csv"
    fields = CUDA_CSV_FIELDS if cuda else CSV_FIELDS
    rows, failures = [], []
    for batch, dim, vocab in shapes:
        for dtype in dtypes:
            x, weight = make_inputs(batch, dim, vocab, dtype, device)
            matmul = None
            for provider in providers:
                progress(f"{suite}: {provider.name} {dtype} B={batch} d={dim} V={vocab} ...")
                try:
                    call = provider.build(x, weight)
                    median, p20, p80 = time_ms(call, device, repeats, rep_ms)
                    temp = temporary_mib(call) if cuda else None
                    if cuda and profile:
                        from .gpu_profile import print_profile

                        print_profile(call, f"{suite} {provider.name} {dtype} B={batch}")
                except Exception as error:
                    why = f"{type(error).__name__}: {str(error)[:160]}"
                    if not provider.optional:
                        failures.append(f"{provider.name} {dtype} B={batch}: {why}")
                    print(f"{suite}: {provider.name} {'FAILED' if not provider.optional else 'skipped'} ({why})")
                    continue
                if provider.name == "matmul":
                    matmul = median
                row = {
                    "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), **info,
                    "device": device, "suite": suite, "provider": provider.name, "dtype": dtype,
                    "B": batch, "d": dim, "V": vocab, "time_ms": round(median, 3), "p20_ms": round(p20, 3),
                    "p80_ms": round(p80, 3), "vs_matmul": None if matmul is None else round(median / matmul, 3),
                }
                if cuda:
                    row["temp_mib"] = round(temp, 3)
                rows.append(row)
                append_csv(csv_path, rows[-1:], fields)
            del x, weight
            if cuda:
                gc.collect()
                torch.cuda.empty_cache()
    if cuda:
        print(f"{suite} on {info['gpu']}: torch {info['torch']}, triton {info['triton']}, commit {info['commit']}")
    else:
        print(f"{suite} on {device}: {info['cpu']}, torch {info['torch']}, commit {info['commit']}")
    print(format_table(rows, CUDA_COLUMNS if cuda else COLUMNS,
                       group_by=lambda r: (r["B"], r["d"], r["V"], r["dtype"])))
    print(f"\n{len(rows)} rows appended to {csv_path}")
    for failure in failures:
        print(f"FAILED {failure}")
    return rows, failures


def find_row(rows: list[dict], provider: str, dtype: str, shape: tuple[int, int, int]) -> dict | None:
    batch, dim, vocab = shape
    return next((r for r in rows if r["provider"] == provider and r["dtype"] == dtype
                 and (r["B"], r["d"], r["V"]) == (batch, dim, vocab)), None)


def print_target(name: str, value: float | None, op: str, limit: float, unit: str = "x") -> None:
    """One line `PASS|FAIL|SKIP  name: value (target op limit)`; SKIP when this run did not measure it."""
    if value is None:
        print(f"SKIP  {name}: not measured in this run (target {op} {limit}{unit})")
        return
    ok = value <= limit if op == "<=" else value >= limit
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {value:.2f}{unit} (target {op} {limit}{unit})")


def flashinfer_module(suite: str):
    """FlashInfer if it imports, else None after one line saying its providers are skipped."""
    try:
        import flashinfer
        import flashinfer.sampling  # noqa: F401
    except Exception as error:  # not installed, or built for another torch / CUDA
        print(f"{suite}: FlashInfer providers skipped ({type(error).__name__}: {str(error)[:120]})")
        return None
    return flashinfer


def compiled(fn: Callable) -> Callable:
    """torch.compile'd `fn`, compiled on first use."""
    return torch.compile(fn, dynamic=False)


def torch_providers(name: str, compiled_name: str, fn: Callable, with_compiled: bool) -> list[Provider]:
    """The eager torch baseline `fn(x, w)` and, with `with_compiled` (compiling costs ~20 s a
    function on a fresh GPU machine), its torch.compile'd twin."""
    out = [Provider(name, lambda x, w: (lambda: fn(x, w)))]
    if with_compiled:
        fn_compiled = compiled(fn)
        out.append(Provider(compiled_name, lambda x, w: (lambda: fn_compiled(x, w))))
    return out
