"""Ahead-of-time compilation of every loss kernel and config, for a GPU target, on any host.

`triton.compile` lowers a kernel to PTX and a cubin for a named architecture without a
GPU, so compile errors and shared-memory budgets are caught on CPU-only CI. Each spec
names a kernel, the type of every runtime argument, and its constexprs.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .backward import backward_kernel
from .configs import (
    BACKWARD_CANDIDATES,
    FORWARD_CANDIDATES,
    FORWARD_CANDIDATES_FP32,
    INDEXED_DOT_BLOCK_D,
    INDEXED_DOT_BLOCK_P,
    INTERPRETER_CONFIG,
    TileConfig,
)
from .indexed_dot import indexed_dot_kernel
from .lse_forward import lse_forward_kernel

# Largest dynamic shared memory per block: sm_90 (H100) 227 KiB, sm_80 (A100) 163 KiB.
SHARED_MEMORY_LIMIT = {90: 232448, 80: 166912}
_TRITON_DTYPE = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


@dataclass(frozen=True)
class CompileSpec:
    name: str
    kernel: object
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int


def _types(kernel, pointer_types: dict, float_args: tuple = ()) -> dict:
    """Signature: named pointers get their element type, floats fp32, other args i32."""
    signature = {}
    for name in kernel.arg_names:
        if name in pointer_types:
            signature[name] = "*" + pointer_types[name]
        elif name in float_args:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def _with_constexprs(signature: dict, constexprs: dict) -> dict:
    return {k: ("constexpr" if k in constexprs else v) for k, v in signature.items()}


def forward_spec(config: TileConfig, dtype: str) -> CompileSpec:
    t = _TRITON_DTYPE[dtype]
    pointers = {"x_ptr": t, "w_ptr": t, "b_ptr": "fp32", "part_max_ptr": "fp32", "part_sum_ptr": "fp32",
                "part_zsum_ptr": "fp32", "block_max_ptr": "fp32"}
    constexprs = {"BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k,
                  "HAS_BIAS": True, "HAS_SOFTCAP": True, "LOGIT_SUM": True,
                  "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    sig = _with_constexprs(_types(lse_forward_kernel, pointers, ("softcap", "inv_temp")), constexprs)
    return CompileSpec(f"lse_forward[{dtype},{config}]", lse_forward_kernel, sig, constexprs,
                       config.num_warps, config.num_stages)


def backward_spec(config: TileConfig, dtype: str, deterministic: bool, filtered: bool) -> CompileSpec:
    t = _TRITON_DTYPE[dtype]
    pointers = {"x_ptr": t, "w_ptr": t, "b_ptr": "fp32", "ids_ptr": "i64", "slot_coef_ptr": "fp32",
                "lse_ptr": "fp32", "row_coef_ptr": "fp32", "uniform_ptr": "fp32", "block_max_ptr": "fp32",
                "dx_ptr": "fp32", "dw_ptr": "fp32", "db_ptr": "fp32", "lock_x_ptr": "i32", "lock_w_ptr": "i32",
                "lock_b_ptr": "i32", "skipped_ptr": "i32"}
    constexprs = {"BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k,
                  "GROUP_M": config.group_m, "HAS_BIAS": True, "HAS_SOFTCAP": True, "HAS_UNIFORM": True,
                  "NEED_DX": True, "NEED_DW": True, "NEED_DB": True, "FILTER": filtered,
                  "DETERMINISTIC": deterministic, "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    sig = _with_constexprs(_types(backward_kernel, pointers, ("softcap", "inv_temp", "log_filter_eps")), constexprs)
    flags = ("det," if deterministic else "") + ("filter," if filtered else "")
    return CompileSpec(f"backward[{dtype},{flags}{config}]", backward_kernel, sig, constexprs,
                       config.num_warps, config.num_stages)


def indexed_dot_spec(dtype: str) -> CompileSpec:
    t = _TRITON_DTYPE[dtype]
    pointers = {"x_ptr": t, "w_ptr": t, "b_ptr": "fp32", "ids_ptr": "i64", "out_ptr": "fp32"}
    constexprs = {"BLOCK_P": INDEXED_DOT_BLOCK_P, "BLOCK_D": INDEXED_DOT_BLOCK_D, "HAS_BIAS": True, "HAS_SOFTCAP": True}
    sig = _with_constexprs(_types(indexed_dot_kernel, pointers, ("softcap", "inv_temp")), constexprs)
    return CompileSpec(f"indexed_dot[{dtype}]", indexed_dot_kernel, sig, constexprs, 4, 2)


def all_specs() -> list[CompileSpec]:
    """Every kernel x config x dtype that can be launched, filter and deterministic variants included."""
    specs = []
    for dtype in ("bf16", "fp32"):
        specs += [forward_spec(c, dtype) for c in (FORWARD_CANDIDATES_FP32 if dtype == "fp32" else FORWARD_CANDIDATES)]
        for c in BACKWARD_CANDIDATES:
            specs.append(backward_spec(c, dtype, deterministic=False, filtered=False))
        specs.append(backward_spec(BACKWARD_CANDIDATES[0], dtype, deterministic=True, filtered=True))
        specs.append(backward_spec(BACKWARD_CANDIDATES[0], dtype, deterministic=False, filtered=True))
        specs.append(indexed_dot_spec(dtype))
    specs.append(forward_spec(INTERPRETER_CONFIG, "fp32"))
    specs.append(backward_spec(INTERPRETER_CONFIG, "fp32", deterministic=True, filtered=True))
    return specs


def compile_spec(spec: CompileSpec, arch: int):
    """Compile for sm_`arch`; returns the compiled kernel (asm and metadata)."""
    source = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
