"""Launch configurations of the Triton loss kernels, all in one place.

Each kernel has one fixed default per operand width, chosen for H100 (sm_90) bf16 and
sized to fit an A100's shared memory too, and a list of candidates. With
`DISTIL_KERNELS_AUTOTUNE=1` the first launch for a shape bin times every candidate on
the real inputs and keeps the fastest; the launchers allocate fresh accumulators and
locks per launch, so trial runs leave nothing behind. The ahead-of-time compile tests
build every config listed here for sm_90 and sm_80 as a launch specialises it and check
its shared memory and register spills.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import triton

# FMA contraction in the kernels' arithmetic, as every measurement and test here was made:
# Triton's default through 3.9, which warns that 3.10 turns it off unless asked.
ENABLE_FP_FUSION = True


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # token rows per program
    block_n: int  # vocabulary columns per tile
    block_k: int  # hidden-dim slice per tl.dot step
    num_warps: int
    num_stages: int
    group_m: int = 8  # token blocks sharing a sweep over vocabulary tiles (L2 reuse of W)
    split_n: int = 1  # the sampler: adjacent tiles computed from one pass over x (1, 2 or 4)

    def __str__(self) -> str:
        split = f"-x{self.split_n}" if self.split_n > 1 else ""
        return (f"{self.block_m}x{self.block_n}x{self.block_k}-w{self.num_warps}-s{self.num_stages}"
                f"-g{self.group_m}{split}")


# Registers bound these tiles before shared memory does. As launched (unit inner strides,
# 16-aligned operands: tests/loss/test_triton_aot.py), Triton pipelines the x and W
# slices through shared memory, `num_stages` buffers on sm_90 and one fewer on sm_80, and
# every fp32 value of a tile lives in registers: 255 per thread at most, 65536 per SM.
#
# The forward only reduces its tile to (max, sum-exp, sum) per row, but the epilogue
# (bias, tanh softcap, exp) keeps a few fp32 copies of the tile live at once. 64
# accumulators per thread fit (128x128 over 8 warps: 234 registers on sm_90, 255 on
# sm_80, no spill); 128 do not: the usual H100 GEMM tile 128x256 over 8 warps spills
# 408 B per thread, and over 16 warps (128 registers each) 264 B. A 128-wide square tile
# reads each x and W slice for 128 outputs, the most reuse without spilling; 4 stages of
# 64-wide K slices take 128 KiB on sm_90 (96 KiB on sm_80) and hide the load latency at
# the one block per SM that the registers allow anyway.
FORWARD_DEFAULT = TileConfig(128, 128, 64, num_warps=8, num_stages=4)
FORWARD_CANDIDATES = (
    FORWARD_DEFAULT,
    TileConfig(128, 128, 64, num_warps=8, num_stages=3),  # a stage less smem (96 KiB) for a second block
    TileConfig(64, 256, 64, num_warps=8, num_stages=4),
    TileConfig(64, 128, 64, num_warps=4, num_stages=4),  # twice the programs, for small N
)
# A plain head (no bias, softcap or label smoothing) leaves the epilogue a max, an exp and
# a sum: on sm_90 a 128x256 tile fits (221-235 registers under Triton 3.6 and 3.9, no
# spill; bias and the logit sum spill 400-500 B) and reads 85 FLOPs per byte of x and W
# slices instead of 128x128's 64, the L2 traffic that bounds this GEMM on an H100. On
# sm_80 it spills 88-232 B: A100s keep the default.
FORWARD_PLAIN_SM90 = TileConfig(128, 256, 64, num_warps=8, num_stages=3)
FORWARD_PLAIN_SM90_CANDIDATES = (FORWARD_PLAIN_SM90, *FORWARD_CANDIDATES)
# fp32 operands take the "ieee" path: no tensor cores, an FMA loop in which each thread
# holds its rows of x and columns of W over the whole K slice. 32-wide slices and 32
# outputs per thread (64x128 over 8 warps) fit the registers with no spill on sm_90 and
# sm_80 under Triton 3.6 and 3.9; 128x128 over 8 warps spills 8-96 B depending on the
# Triton release, and 64x128 over 4 warps spills 16-232 B.
FORWARD_DEFAULT_FP32 = TileConfig(64, 128, 32, num_warps=8, num_stages=3)
FORWARD_CANDIDATES_FP32 = (FORWARD_DEFAULT_FP32,)

# The backward holds the fp32 logits tile, tanh of the softcap, the gradient tile and
# its bf16 copy, then per K slice the d_input and d_weight partial products [BLOCK_M,
# BLOCK_K] and [BLOCK_N, BLOCK_K]: more live values per tile entry than the forward. A
# 128x128 tile fits sm_90 (wgmma reads its operands from shared memory) but spills
# 144 B on sm_80, 64 B even with 32-wide K slices; a tall 256x64 tile of the same size
# with 32-wide K slices spills on neither (254 registers). Tall, because GROUP_M row
# blocks sweep the vocabulary together: their x rows and d_input stay in L2 while W and
# the fp32 d_weight accumulator (V x d, the large ones) stream from HBM once per group,
# N / (GROUP_M * BLOCK_M) times. 4 stages take 80 KiB on sm_90, 64 KiB on sm_80.
BACKWARD_DEFAULT = TileConfig(256, 64, 32, num_warps=8, num_stages=4)
BACKWARD_CANDIDATES = (
    BACKWARD_DEFAULT,
    TileConfig(64, 256, 32, num_warps=8, num_stages=4),  # the mirror image, for a vocabulary that fits L2
    TileConfig(128, 64, 64, num_warps=8, num_stages=4),  # 64-wide slices: half the lock round trips
    # Many programs for small N. 32-wide K slices: with 64-wide ones the atomic-add backward
    # spills 104 B per thread on sm_80 under Triton 3.9 (none under 3.6).
    TileConfig(64, 64, 32, num_warps=4, num_stages=4),
)
# When d_input takes a pass of its own (its fp32 [N, d] exceeds the workspace, see
# backward.py), each pass adds into one accumulator only, and its tile can be shaped
# for that: a program adds BLOCK_M x d to d_input after 2 BLOCK_M BLOCK_N d FLOPs of
# gradient product, so d_input's pass takes wide tiles (64 x 256: 256 columns of
# products per atomic add, 4x the one-pass default's 64) and d_weight's pass tall ones
# (256 x 64, the same 256 per add). Together 2.5x fewer atomic adds than one pass of
# 256 x 64 tiles, for a third more FLOPs (the extra recomputation of the logits).
# d_input's pass keeps 16 row blocks on a vocabulary sweep, 1024 rows of x in L2.
# 254-255 registers, no spill on sm_90 or sm_80 (Triton 3.6 and 3.9).
BACKWARD_DX_DEFAULT = TileConfig(64, 256, 32, num_warps=8, num_stages=4, group_m=16)
BACKWARD_DX_CANDIDATES = (BACKWARD_DX_DEFAULT, TileConfig(128, 128, 32, num_warps=8, num_stages=4))
BACKWARD_DW_DEFAULT = TileConfig(256, 64, 32, num_warps=8, num_stages=4)
BACKWARD_DW_CANDIDATES = (BACKWARD_DW_DEFAULT, TileConfig(128, 128, 32, num_warps=8, num_stages=4))

# fp32 ("ieee") dots are FMA loops in which each thread holds the whole contraction
# dimension of its operand rows; for the d_input and d_weight products that is BLOCK_N
# and BLOCK_M, not BLOCK_K. 64x64 over 8 warps with 16-wide slices fits (190 registers
# at most); with 32-wide slices it spills 176 B, and the old 128x128x64 default 12 KB.
BACKWARD_DEFAULT_FP32 = TileConfig(64, 64, 16, num_warps=8, num_stages=4)
BACKWARD_CANDIDATES_FP32 = (BACKWARD_DEFAULT_FP32, TileConfig(64, 32, 32, num_warps=8, num_stages=3))

# Per kernel kind: (bf16/fp16 candidates, fp32 candidates), the default first. The fp32
# tiles serve both passes: their contraction is BLOCK_N or BLOCK_M either way.
CANDIDATES = {
    "forward": (FORWARD_CANDIDATES, FORWARD_CANDIDATES_FP32),
    "forward_plain_sm90": (FORWARD_PLAIN_SM90_CANDIDATES, FORWARD_CANDIDATES_FP32),
    "backward": (BACKWARD_CANDIDATES, BACKWARD_CANDIDATES_FP32),
    "backward_dx": (BACKWARD_DX_CANDIDATES, BACKWARD_CANDIDATES_FP32),
    "backward_dw": (BACKWARD_DW_CANDIDATES, BACKWARD_CANDIDATES_FP32),
}

# Each fp32 gradient accumulator of the backward covers at most this much at a time: the
# d_weight chunk (1792 rows of a d=4096 head; with bf16 weights never a [V, d] fp32 copy
# of the head, 2 GiB for Llama-3-8B) and d_input, over token chunks when [N, d] fp32
# does not fit. Both together and the forward's statistics stay within 64 MiB at any N,
# and each stays in the H100's 50 MB L2 while the atomics land in it.
ACCUMULATOR_BYTES = 28 * 2**20

# The indexed dot is a gather-and-reduce: (row, slot) pairs x hidden-dim slices.
INDEXED_DOT_BLOCK_P = 32
INDEXED_DOT_BLOCK_D = 128

# Under TRITON_INTERPRET=1 kernels run on the CPU one program at a time, each numpy op
# paying a fixed cost: tiles small enough that test shapes span many of them (masked
# edges, several splits and groups), large enough to keep the interpreter quick.
# Never launched on a GPU, so left out of the AOT specs: compiled, one warp holding a
# whole 32x64 fp32 tile spills kilobytes.
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
    candidates = CANDIDATES[kind][1 if dtype == torch.float32 else 0]
    if not autotuning():
        return candidates[0]
    n, v, d = shape
    key = (kind, dtype, shape_bin(n), v, d, flags)
    if key not in _TUNED:
        timings = [(triton.testing.do_bench(lambda c=c: run(c), warmup=5, rep=25), i) for i, c in enumerate(candidates)]
        _TUNED[key] = candidates[min(timings)[1]]
    return _TUNED[key]
