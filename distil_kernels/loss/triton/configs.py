"""Launch configurations of the Triton loss kernels, all in one place.

Each kernel has one fixed default per operand width, chosen for H100 (sm_90) bf16 and
sized to fit an A100's shared memory too, and a list of candidates. With
`DISTIL_KERNELS_AUTOTUNE=1` the first launch for a shape bin times every candidate on
the real inputs and keeps the fastest; the launchers allocate fresh accumulators and
locks per launch, so trial runs leave nothing behind. The ahead-of-time compile tests
build every config listed here for sm_90 and sm_80 and check its shared memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import triton


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # token rows per program
    block_n: int  # vocabulary columns per tile
    block_k: int  # hidden-dim slice per tl.dot step
    num_warps: int
    num_stages: int
    group_m: int = 8  # token blocks sharing a sweep over vocabulary tiles (L2 reuse of W)

    def __str__(self) -> str:
        return (f"{self.block_m}x{self.block_n}x{self.block_k}-w{self.num_warps}-s{self.num_stages}"
                f"-g{self.group_m}")


# The forward only reduces its tile to (max, sum-exp) per row, so a wide 128x256
# tile keeps the tensor cores busy; 3 stages of 64-wide K slices take 48 KiB of smem.
FORWARD_DEFAULT = TileConfig(128, 256, 64, num_warps=8, num_stages=3)
FORWARD_CANDIDATES = (
    FORWARD_DEFAULT,
    TileConfig(128, 128, 64, num_warps=8, num_stages=4),
    TileConfig(64, 256, 64, num_warps=4, num_stages=4),
    TileConfig(128, 128, 32, num_warps=4, num_stages=4),
)
# fp32 operands take twice the shared memory: 32-wide K slices keep 3 stages of a
# 128x128 tile at 96 KiB, inside the 163 KiB of an A100 as well as an H100's 227 KiB.
FORWARD_DEFAULT_FP32 = TileConfig(128, 128, 32, num_warps=4, num_stages=3)
FORWARD_CANDIDATES_FP32 = (FORWARD_DEFAULT_FP32, TileConfig(64, 128, 32, num_warps=4, num_stages=3))

# The backward holds the fp32 logits tile, its gradient and the d_input / d_weight
# partial products at once: 128x128 keeps that under the register file of 8 warps.
BACKWARD_DEFAULT = TileConfig(128, 128, 64, num_warps=8, num_stages=3)
BACKWARD_CANDIDATES = (
    BACKWARD_DEFAULT,
    TileConfig(64, 128, 64, num_warps=4, num_stages=3),
    TileConfig(128, 64, 64, num_warps=4, num_stages=3),
    TileConfig(64, 64, 64, num_warps=4, num_stages=4),
)

# The indexed dot is a gather-and-reduce: (row, slot) pairs x hidden-dim slices.
INDEXED_DOT_BLOCK_P = 32
INDEXED_DOT_BLOCK_D = 128

# Under TRITON_INTERPRET=1 kernels run on the CPU one program at a time, each numpy op
# paying a fixed cost: tiles small enough that test shapes span many of them (masked
# edges, several splits and groups), large enough to keep the interpreter quick.
INTERPRETER_CONFIG = TileConfig(32, 64, 32, num_warps=1, num_stages=1, group_m=2)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotuning() -> bool:
    return os.environ.get("DISTIL_KERNELS_AUTOTUNE") == "1"


def shape_bin(n: int) -> int:
    """Power-of-two bin of a size, so a new batch size does not retrigger tuning."""
    return 1 << max(int(n) - 1, 0).bit_length()


_TUNED: dict[tuple, TileConfig] = {}


def select_config(kind: str, dtype: torch.dtype, shape: tuple[int, int, int], flags: tuple,
                  run: Callable[[TileConfig], object]) -> TileConfig:
    """The config for a launch: interpreter tiles, the default, or the tuned best."""
    if interpreting():
        return INTERPRETER_CONFIG
    if kind == "forward":
        candidates = FORWARD_CANDIDATES_FP32 if dtype == torch.float32 else FORWARD_CANDIDATES
    else:
        candidates = BACKWARD_CANDIDATES
    if not autotuning():
        return candidates[0]
    n, v, d = shape
    key = (kind, dtype, shape_bin(n), v, d, flags)
    if key not in _TUNED:
        timings = [(triton.testing.do_bench(lambda c=c: run(c), warmup=5, rep=25), i) for i, c in enumerate(candidates)]
        _TUNED[key] = candidates[min(timings)[1]]
    return _TUNED[key]
