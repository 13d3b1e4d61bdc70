"""Time and peak memory of one benchmark workload, measured in a fresh process.

PyTorch keeps no allocator statistics for CPU tensors, so the peak is read from the
kernel's counters of the process: VmHWM (peak resident set) after writing "5" to
/proc/self/clear_refs, which resets it to the current VmRSS. Two things make that
counter follow the tensors:

- glibc keeps freed heap blocks mapped and hands them to the next allocation, so a
  tensor freed by one provider would hide part of the next one's peak, and RSS would
  never come down between steps. The child runs with MALLOC_MMAP_THRESHOLD_=65536:
  every allocation of 64 KiB or more gets its own mmap and is unmapped on free.
- One-time costs (thread pools, oneDNN primitive caches, the first page faults) land
  in a warm-up step before the counter is reset.

Each workload runs in its own subprocess (`python -m bench.measure`, a JSON request on
stdin and a JSON `Measurement` on the last line of stdout), so no provider inherits
another's heap, caches or threads. The child:

1. builds the workload (its inputs) with the named factory;
2. runs one warm-up step and drops the gradients;
3. resets the peak, reads VmRSS, runs one step, reads VmHWM: the step's peak is
   VmHWM - VmRSS_before, and its overhead is that peak less the buffers every
   implementation must allocate (`Workload.required_bytes`: the gradients);
4. times `repeats` steps, gradients dropped between them (as `zero_grad(set_to_none=True)`
   does in training, so each step allocates its gradients again), stopping early once
   the timed steps have used `max_time_s`.

The machine may be shared (other sessions' tests on the same two cores halve a GEMM's
speed), so the child also reports how much CPU other processes and the hypervisor
(steal) took while it timed its steps: /proc/stat's busy ticks less its own.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# Allocations at or above this size are mmap'd and returned to the OS on free.
MMAP_THRESHOLD_BYTES = 64 << 10
MIB = float(1 << 20)


@dataclass(frozen=True)
class Workload:
    """One benchmark step and what it must allocate."""

    step: Callable[[], None]  # one forward + backward
    reset: Callable[[], None]  # drop the gradients of the previous step
    required_bytes: int  # buffers every implementation allocates: the gradients of the inputs


@dataclass(frozen=True)
class Measurement:
    """What the child reports: per-step times and the peak of one step."""

    times_ms: tuple[float, ...]  # each timed step, in order (empty for a memory-only run)
    peak_mib: float  # VmHWM - VmRSS before the step
    overhead_mib: float  # peak_mib less Workload.required_bytes
    threads: int  # torch intra-op threads in the child
    others_cpu_pct: float | None  # CPU taken by others during the timed steps, % of all cores

    @property
    def repeats(self) -> int:
        return len(self.times_ms)

    def quantile_ms(self, q: float) -> float | None:
        return float(np.quantile(self.times_ms, q)) if self.times_ms else None

    @property
    def time_ms(self) -> float | None:
        return self.quantile_ms(0.5)

    @property
    def p20_ms(self) -> float | None:
        return self.quantile_ms(0.2)

    @property
    def p80_ms(self) -> float | None:
        return self.quantile_ms(0.8)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Measurement":
        fields = json.loads(text)
        fields["times_ms"] = tuple(fields["times_ms"])
        return cls(**fields)


# --------------------------------------------------------------------------------------
# Peak memory and time of a workload, in this process (the child's side)
# --------------------------------------------------------------------------------------


def cpu_memory_unsupported() -> str | None:
    """Why this process cannot measure its peak memory, or None when it can."""
    if not os.path.exists("/proc/self/clear_refs"):
        return "peak memory needs Linux /proc/self/clear_refs (VmHWM reset)"
    return None


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field} line")


def step_peak_bytes(workload: Workload) -> int:
    """Resident-memory growth of one step at its peak, gradients dropped afterwards."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # VmHWM := VmRSS
    before = _status_bytes("VmRSS")
    workload.step()
    peak = _status_bytes("VmHWM")
    workload.reset()
    return peak - before


def _machine_busy_ticks() -> int:
    with open("/proc/stat") as stat:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, stat.readline().split()[1:9])
    return user + nice + system + irq + softirq + steal


def _own_ticks() -> int:
    with open("/proc/self/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()  # the command name may hold spaces
    return int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)


class OthersCpu:
    """`with OthersCpu() as others:` ... `others.pct`: the CPU that other processes and the
    hypervisor (steal) took while the block ran, in % of all cores."""

    pct: float | None = None

    def __enter__(self) -> OthersCpu:
        self._busy, self._own, self._wall = _machine_busy_ticks(), _own_ticks(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        others = (_machine_busy_ticks() - self._busy) - (_own_ticks() - self._own)
        capacity = (time.perf_counter() - self._wall) * os.sysconf("SC_CLK_TCK") * os.cpu_count()
        self.pct = max(100.0 * others / capacity, 0.0)


def time_steps_ms(workload: Workload, repeats: int, max_time_s: float | None
                  ) -> tuple[tuple[float, ...], float | None]:
    """Wall time of up to `repeats` steps (stopping after any step once `max_time_s` is
    used), and the CPU others took meanwhile in % of all cores (None without steps)."""
    times_ms = []
    spent_s = 0.0
    with OthersCpu() as others:
        for _ in range(repeats):
            start = time.perf_counter()
            workload.step()
            elapsed_s = time.perf_counter() - start
            workload.reset()
            times_ms.append(elapsed_s * 1e3)
            spent_s += elapsed_s
            if max_time_s is not None and spent_s >= max_time_s:
                break
    return tuple(times_ms), (others.pct if times_ms else None)


def measure(workload: Workload, repeats: int, max_time_s: float | None = None) -> Measurement:
    """Warm-up, one memory-measured step, then the timed steps (steps 2-4 above)."""
    workload.reset()
    workload.step()
    workload.reset()
    peak_bytes = step_peak_bytes(workload)
    times_ms, others_cpu_pct = time_steps_ms(workload, repeats, max_time_s)
    return Measurement(times_ms, peak_bytes / MIB, (peak_bytes - workload.required_bytes) / MIB,
                       torch.get_num_threads(), others_cpu_pct)


# --------------------------------------------------------------------------------------
# The subprocess (the parent's side)
# --------------------------------------------------------------------------------------


def measure_in_subprocess(factory: str, spec: dict, *, repeats: int, max_time_s: float | None = None
                          ) -> Measurement:
    """Measure `factory(spec)` (a "module:function" returning a `Workload`) in a fresh process.

    The child's stderr (warnings, progress) is passed on; a failure raises RuntimeError
    with its last line.
    """
    request = {"factory": factory, "spec": spec, "repeats": repeats, "max_time_s": max_time_s}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD_BYTES))
    proc = subprocess.run([sys.executable, "-m", "bench.measure"], input=json.dumps(request),
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    if proc.stderr:
        sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        raise RuntimeError(f"measuring {spec} failed: {last[0]}")
    return Measurement.from_json(proc.stdout.strip().splitlines()[-1])


def _child_main() -> None:
    request = json.load(sys.stdin)
    module_name, function_name = request["factory"].split(":")
    factory = getattr(importlib.import_module(module_name), function_name)
    workload = factory(request["spec"])
    result = measure(workload, request["repeats"], request["max_time_s"])
    print(result.to_json(), flush=True)


if __name__ == "__main__":
    _child_main()
