"""Ahead-of-time compilation of every sampling kernel and config, for a GPU target, on any host.

The specs reuse the loss core's `CompileSpec` and `compile_spec` (loss/triton/aot.py),
which compile every runtime argument as a plain value: the code a launch with odd
sizes or strides gets. A typical launch gets other code: Triton's JIT turns an integer
argument equal to 1 into a constant and marks pointers, sizes and strides that are
multiples of 16, which vectorises the loads and lets it pipeline them through shared
memory. `compile_as_launched` compiles that variant (unit inner strides; x, W and the
outputs 16-byte aligned; d and the row strides multiples of 16), whose shared memory
and registers are the ones a model's launch sees; `resource_usage` reads its registers
and spills from the cubin.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ...loss.triton.aot import CompileSpec, _types, _with_constexprs
from .configs import (
    MAX_TOPK,
    SAMPLE_CANDIDATES,
    SAMPLE_DEFAULT_FP32,
    SAMPLE_SMALL_BATCH,
    SAMPLE_SMALL_BATCH_FP32,
    SAMPLES_PER_PROGRAM,
    TileConfig,
    topk_candidates,
)
from .sample import sample_kernel
from .topk import topk_kernel

_TRITON_DTYPE = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
_TORCH_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Arguments a typical launch has divisible by 16 (Triton's "D" specialisation).
_DIVISIBLE = ("x_ptr", "w_ptr", "b_ptr", "keys_ptr", "part_ptr", "seed_ptr", "pos_ptr", "score_ptr", "id_ptr",
              "raw_ptr", "D", "stride_xn", "stride_wv")
_UNIT_STRIDES = ("stride_xd", "stride_wd")


def topk_spec(config: TileConfig, dtype: str, K: int) -> CompileSpec:
    t = _TRITON_DTYPE[dtype]
    pointers = {"x_ptr": t, "w_ptr": t, "b_ptr": "fp32", "keys_ptr": "i64", "part_ptr": "fp32"}
    constexprs = {"K": K, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k,
                  "HAS_BIAS": True, "HAS_SOFTCAP": True, "RAW_LSE": True,
                  "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    sig = _with_constexprs(_types(topk_kernel, pointers, ("softcap", "inv_temp")), constexprs)
    return CompileSpec(f"topk[{dtype},K={K},{config}]", topk_kernel, sig, constexprs,
                       config.num_warps, config.num_stages)


def sample_spec(config: TileConfig, dtype: str, samples: int, greedy: bool = False) -> CompileSpec:
    t = _TRITON_DTYPE[dtype]
    pointers = {"x_ptr": t, "w_ptr": t, "b_ptr": "fp32", "seed_ptr": "i64", "pos_ptr": "i64",
                "score_ptr": "fp32", "id_ptr": "i64", "raw_ptr": "fp32", "part_ptr": "fp32"}
    constexprs = {"SAMPLES": samples, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n,
                  "BLOCK_K": config.block_k, "HAS_BIAS": True, "HAS_SOFTCAP": True, "GREEDY": greedy,
                  "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    sig = _with_constexprs(_types(sample_kernel, pointers, ("softcap", "temperature")), constexprs)
    flags = "greedy," if greedy else f"S={samples},"
    return CompileSpec(f"sample[{dtype},{flags}{config}]", sample_kernel, sig, constexprs,
                       config.num_warps, config.num_stages)


def all_specs() -> list[CompileSpec]:
    """Every kernel x config x dtype launched on a GPU: each padded K, each samples-per-program.

    The interpreter's one-warp configs never run on a GPU, and compiled they would
    spill kilobytes per thread and take minutes: they are left out.
    """
    specs = []
    for dtype in ("bf16", "fp32"):
        for K in (1 << i for i in range(MAX_TOPK.bit_length())):
            specs += [topk_spec(c, dtype, K) for c in topk_candidates(_TORCH_DTYPE[dtype], K)]
    samples = [1 << i for i in range(SAMPLES_PER_PROGRAM.bit_length())]
    for dtype, configs in (("bf16", (*SAMPLE_CANDIDATES, SAMPLE_SMALL_BATCH)),
                           ("fp32", (SAMPLE_DEFAULT_FP32, SAMPLE_SMALL_BATCH_FP32))):
        for config in configs:
            specs += [sample_spec(config, dtype, s) for s in samples]
            specs.append(sample_spec(config, dtype, 1, greedy=True))
    return specs


def compile_as_launched(spec: CompileSpec, arch: int):
    """Compile for sm_`arch` as the JIT specialises a contiguous, 16-aligned launch."""
    signature = dict(spec.signature)
    constexprs = dict(spec.constexprs)
    for name in _UNIT_STRIDES:
        signature[name] = "constexpr"
        constexprs[name] = 1
    names = list(signature)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in _DIVISIBLE if name in names}
    source = ASTSource(fn=spec.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})


def resource_usage(compiled) -> tuple[int, int]:
    """(registers per thread, stack bytes) of a compiled kernel; stack above 0 means spills."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        out = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True,
                             check=True).stdout
    match = re.search(r"REG:(\d+).*?STACK:(\d+)", out)
    if match is None:
        raise RuntimeError(f"no resource usage in cuobjdump output: {out[:200]}")
    return int(match.group(1)), int(match.group(2))
