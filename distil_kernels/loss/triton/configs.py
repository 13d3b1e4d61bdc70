"""Launch configurations of the Triton loss kernels, all in one place.

Each kernel has one fixed default per operand width, chosen for H100 (sm_90) bf16 and
sized to fit an A100's shared memory too, and a list of candidates. With
`DISTIL_KERNELS_AUTOTUNE=1` the first launch for a shape bin times every candidate on
the real inputs and keeps the fastest; the launchers allocate fresh buffers per call,
so trial runs leave nothing behind. The ahead-of-time compile tests
build every config listed here for sm_90 and sm_80 as a launch specialises it and check
its shared memory and register spills.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import triton

from ...backends import major_minor

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
    split_n: int = 1  # the sampler and threshold top-k: adjacent tiles computed from one pass over x (1, 2 or 4)
    tma: bool = False  # x and W slices (and stores, where a kernel has them) by TMA descriptors (sm_90)
    flat: bool = False  # the sampler and threshold top-k, by TMA: one loop over (tile pass, K slice)
    x_registers: bool = False  # the sampler, by TMA: x slices read into registers for wgmma (`wide_tiles`)

    def __str__(self) -> str:
        split = f"-x{self.split_n}" if self.split_n > 1 else ""
        return (f"{self.block_m}x{self.block_n}x{self.block_k}-w{self.num_warps}-s{self.num_stages}"
                f"-g{self.group_m}{split}{'-tma' if self.tma else ''}{'-flat' if self.flat else ''}"
                f"{'-xreg' if self.x_registers else ''}")


@functools.cache
def triton_version() -> tuple[int, int]:
    """(major, minor) of the Triton in use."""
    return major_minor(triton.__version__)


@functools.cache
def tensor_descriptors():
    """Triton's host-side TMA descriptor class, or None before Triton 3.4 (the kernels'
    descriptor loads and stores were checked with 3.6 and 3.9)."""
    if triton_version() < (3, 4):
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor


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
# TMA descriptors load the x and W slices on sm_90: no per-thread addresses or masks
# (Triton 3.6: 211 registers instead of 234 for the default tile; a plain head's 128x128
# tile 127 instead of 168, so two blocks an SM fit at 3 stages, 96 KiB each, one's
# epilogue beside the other's matmul). Timed on an H100 (bench/RESULTS.md, seventh
# session; N=4096, Qwen2.5-7B's head): the plain 128x256 tile by TMA 6.84 ms against
# 8.38 by pointers (1.09x the bare matmul's 6.30), 128x128 8.37 against 9.71. So where
# Triton has descriptors the TMA tiles lead on sm_90; a launch whose operands a
# descriptor cannot address (`descriptors_apply`) takes the same tile by pointers.
FORWARD_TMA_SM90 = (TileConfig(128, 128, 64, num_warps=8, num_stages=4, tma=True),)
# The 128x128 TMA tile at three stages, a candidate of every kind whose four-stage tile
# would let two blocks share an SM by its registers (<= 128 a thread) but holds one by its
# 128 KiB of shared memory: at 96 KiB two blocks fit, one's epilogue beside the other's
# products. Registers as launched on sm_90: a plain head's forward 116-127, a softcap
# head's 125 (Triton 3.6; 154 under 3.9, one block), a plain head's gradient kernel
# 126-128.
TWO_BLOCKS_TMA_SM90 = TileConfig(128, 128, 64, num_warps=8, num_stages=3, tma=True)
FORWARD_PLAIN_TMA_SM90 = (TileConfig(128, 256, 64, num_warps=8, num_stages=3, tma=True), TWO_BLOCKS_TMA_SM90)
_TMA = tensor_descriptors() is not None
FORWARD_SM90_CANDIDATES = (*(FORWARD_TMA_SM90 if _TMA else ()), *FORWARD_CANDIDATES)
FORWARD_PLAIN_SM90_CANDIDATES = (*(FORWARD_PLAIN_TMA_SM90 if _TMA else ()), FORWARD_PLAIN_SM90, *FORWARD_CANDIDATES)
# A head with a softcap but no bias or label smoothing (Gemma 2) keeps nearly the plain
# head's registers: by TMA its 128x256 tile fits as well (240 registers, no spill, Triton
# 3.6; with the bias and the logit sum it spills 256 B), for the plain tile's L2 saving.
# Timed on an H100 (`python -m bench tune`, twelfth session; Gemma-2-2B's head, N=4096,
# against the bare matmul's 6.67 ms): 8.95 ms against the 128x128 TMA tile's 9.70 and the
# two-block tile's 9.41. So it leads for such a head where Triton has descriptors.
FORWARD_SOFTCAP_TMA_SM90 = TileConfig(128, 256, 64, num_warps=8, num_stages=3, tma=True)
FORWARD_SOFTCAP_SM90_CANDIDATES = (*((FORWARD_SOFTCAP_TMA_SM90,) if _TMA else ()), *FORWARD_SM90_CANDIDATES,
                                   *((TWO_BLOCKS_TMA_SM90,) if _TMA else ()))
# fp32 operands take the "ieee" path: no tensor cores, an FMA loop in which each thread
# holds its rows of x and columns of W over the whole K slice. 32-wide slices and 32
# outputs per thread (64x128 over 8 warps) fit the registers with no spill on sm_90 and
# sm_80 under Triton 3.6 and 3.9; 128x128 over 8 warps spills 8-96 B depending on the
# Triton release, and 64x128 over 4 warps spills 16-232 B.
FORWARD_DEFAULT_FP32 = TileConfig(64, 128, 32, num_warps=8, num_stages=3)
FORWARD_CANDIDATES_FP32 = (FORWARD_DEFAULT_FP32,)

# The gradient kernel (backward.py) is the forward's GEMM with another epilogue: the
# tile's gradient (exp, the softcap's chain factor, the slot corrections) rounded to
# the input dtype and stored instead of reduced. On sm_90 the forward's 128x128 tile over
# 8 warps fits (254-255 registers, no spill; wgmma reads its operands from shared
# memory); on sm_80, whose mma keeps more of the operands in registers, it spills
# 88-104 B, and 64x128 fits (165-167 registers, no spill).
GRADIENT_DEFAULT_SM90 = TileConfig(128, 128, 64, num_warps=8, num_stages=4)
# TMA descriptors load the x and W slices and store the gradient tile: no per-thread
# addresses or masks, so the kernel is 31% fewer instructions (2696 against 3888 SASS,
# Triton 3.6), at the same 254 registers and no spill; 128x256 still spills (256 B over
# 16 warps). A 64x128 tile by TMA takes 128 registers, no spill: two blocks an SM, one's
# epilogue beside the other's matmul, for 43 FLOPs per byte of slices instead of 64.
# Timed on an H100 (`python -m bench tune`, seventh session; Qwen2.5-7B's head, N=4096):
# the 128x128 tile by TMA 29.6 ms against 34.1 by pointers, 128x128x128 29.8, 64x128
# 34.8. So the TMA tile leads on sm_90 where Triton has descriptors.
GRADIENT_TMA_SM90 = (
    TileConfig(128, 128, 64, num_warps=8, num_stages=4, tma=True),
    TileConfig(128, 128, 128, num_warps=8, num_stages=3, tma=True),  # half the loop steps, 192 KiB
    TileConfig(64, 128, 64, num_warps=8, num_stages=3, tma=True),  # two blocks an SM
)
GRADIENT_CANDIDATES_SM90 = (
    *(GRADIENT_TMA_SM90 if _TMA else ()),
    GRADIENT_DEFAULT_SM90,
    TileConfig(128, 128, 64, num_warps=8, num_stages=3),  # a stage less smem (96 KiB) for a second block
    TileConfig(64, 128, 64, num_warps=8, num_stages=4),  # twice the programs, for small chunks
)
# A plain head (no bias, softcap or label smoothing: Llama 3, Qwen 2.5) leaves the
# gradient's epilogue an exp, the slot corrections and the store, and by TMA its 128x128
# tile takes 128 registers: 128x256 fits over 8 warps (254, no spill; with the softcap
# alone it spills 464 B), and over 16 warps so do 128x256 and 256x128 (128 each), each
# reading its x and W slices for 85 FLOPs a byte instead of 64, as the plain forward's
# 128x256 tile does (23% faster there); and the two-block tile. Timed on an H100 (`python
# -m bench tune`, twelfth session; Qwen2.5-7B's head, N=4096, the whole backward with its
# GEMMs): 128x256 over 8 warps 20.88 ms, over 16 warps 21.37, 256x128 21.37, the
# 128x128 TMA tile 21.89 (its d_weight pass alone 13.89). So the first leads for a plain
# head where Triton has descriptors.
GRADIENT_PLAIN_TMA_SM90 = (
    TileConfig(128, 256, 64, num_warps=8, num_stages=3, tma=True),
    TileConfig(128, 256, 64, num_warps=16, num_stages=3, tma=True),
    TileConfig(256, 128, 64, num_warps=16, num_stages=3, tma=True),
    TWO_BLOCKS_TMA_SM90,
)
GRADIENT_PLAIN_CANDIDATES_SM90 = (*(GRADIENT_PLAIN_TMA_SM90[:1] if _TMA else ()), *GRADIENT_CANDIDATES_SM90,
                                  *(GRADIENT_PLAIN_TMA_SM90[1:] if _TMA else ()))
GRADIENT_DEFAULT = TileConfig(64, 128, 64, num_warps=8, num_stages=4)
GRADIENT_CANDIDATES = (GRADIENT_DEFAULT,)
# fp32: the forward's FMA-loop tile, 128-182 registers, at most 8 B spilled.
GRADIENT_DEFAULT_FP32 = TileConfig(64, 128, 32, num_warps=8, num_stages=3)
GRADIENT_CANDIDATES_FP32 = (GRADIENT_DEFAULT_FP32,)

# Per kernel kind: (bf16/fp16 candidates, fp32 candidates), the default first.
CANDIDATES = {
    "forward": (FORWARD_CANDIDATES, FORWARD_CANDIDATES_FP32),
    "forward_sm90": (FORWARD_SM90_CANDIDATES, FORWARD_CANDIDATES_FP32),
    "forward_plain_sm90": (FORWARD_PLAIN_SM90_CANDIDATES, FORWARD_CANDIDATES_FP32),
    "forward_softcap_sm90": (FORWARD_SOFTCAP_SM90_CANDIDATES, FORWARD_CANDIDATES_FP32),
    "gradient": (GRADIENT_CANDIDATES, GRADIENT_CANDIDATES_FP32),
    "gradient_sm90": (GRADIENT_CANDIDATES_SM90, GRADIENT_CANDIDATES_FP32),
    "gradient_plain_sm90": (GRADIENT_PLAIN_CANDIDATES_SM90, GRADIENT_CANDIDATES_FP32),
}

# What the backward holds at once, gradient buffers and fp32 accumulators (backward.py):
# with the forward's statistics, within issue 3's 64 MiB of overhead at N = 16384.
BACKWARD_WORKSPACE_BYTES = 56 * 2**20

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
        _TUNED[key] = fastest(candidates, run)
    return _TUNED[key]


def fastest(candidates: tuple[TileConfig, ...], run: Callable[[TileConfig], object]) -> TileConfig:
    """The candidate whose launch `run(config)` takes least time (`triton.testing.do_bench`).

    A candidate that fails to compile or launch here (a TMA tile on a Triton or driver
    without what it needs, say) is skipped with a warning rather than ending the
    training step that tunes; if every candidate fails, the last error is raised.
    """
    timings, error = [], None
    for index, config in enumerate(candidates):
        try:
            timings.append((triton.testing.do_bench(lambda c=config: run(c), warmup=5, rep=25), index))
        except Exception as failure:  # whatever the cause, one candidate less
            error = failure
            warnings.warn(f"distil_kernels autotuning: launch config {config} failed and is skipped "
                          f"({type(failure).__name__}: {str(failure)[:200]})", RuntimeWarning, stacklevel=2)
    if not timings:
        raise error
    return candidates[min(timings)[1]]


def descriptors_apply(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether TMA descriptors can address x and W here: a Triton that has them, an sm_90+
    GPU (or the interpreter), rows of unit stride whose starts are 16-byte aligned.

    A config asking for TMA where this fails launches with pointers instead. (The
    backward's gradient buffers always qualify: whole tiles of columns.)
    """
    on_sm90 = x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9
    # A descriptor needs every dimension positive: no rows (or d = 0) launches nothing anyway.
    if tensor_descriptors() is None or not (interpreting() or on_sm90) or x.numel() == 0 or weight.numel() == 0:
        return False
    return all(t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
               for t in (x, weight))


def kernel_operands(x: torch.Tensor, weight: torch.Tensor, config: TileConfig) -> tuple[object, object, bool]:
    """(x, W, by TMA) as a kernel of `config` takes them: TMA descriptors of its
    [block_m, block_k] and [block_n, block_k] slices where the config asks for TMA and
    `descriptors_apply`, else the tensors themselves."""
    if not (config.tma and descriptors_apply(x, weight)):
        return x, weight, False
    descriptor = tensor_descriptors()
    return (descriptor.from_tensor(x, [config.block_m, config.block_k]),
            descriptor.from_tensor(weight, [config.block_n, config.block_k]), True)
