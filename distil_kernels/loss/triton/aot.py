"""Ahead-of-time compilation of every loss kernel and config, for a GPU target, on any host.

`triton.compile` lowers a kernel to PTX and a cubin for a named architecture without a
GPU, so compile errors, shared-memory budgets and register spills are caught on
CPU-only CI. Each spec names a kernel, the type of every runtime argument, its
constexprs, and the arguments a typical launch has divisible by 16 or equal to 1.

A spec compiles two ways. `compile_spec` takes every runtime argument as a plain value:
the code a launch with odd sizes or strides gets. `compile_as_launched` takes what a
contiguous launch of a real model gets: Triton's JIT turns an integer argument equal
to 1 into a constant and marks pointers, sizes and strides that are multiples of 16,
which vectorises the loads and lets it pipeline them through shared memory
(`num_stages` buffers of each operand tile). That build's shared memory, registers and
spills are the ones a model's launch sees; `resource_usage` reads the last two from the
cubin. The sampling kernels' specs (sampling/triton/aot.py) use the same functions.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .backward import logits_grad_kernel
from .configs import (
    ENABLE_FP_FUSION,
    FORWARD_CANDIDATES,
    FORWARD_CANDIDATES_FP32,
    FORWARD_PLAIN_SM90,
    FORWARD_PLAIN_SM90_CANDIDATES,
    FORWARD_SM90_CANDIDATES,
    FORWARD_SOFTCAP_SM90_CANDIDATES,
    GRADIENT_CANDIDATES,
    GRADIENT_CANDIDATES_FP32,
    GRADIENT_CANDIDATES_SM90,
    GRADIENT_PLAIN_CANDIDATES_SM90,
    INDEXED_DOT_BLOCK_D,
    INDEXED_DOT_BLOCK_P,
    TileConfig,
)
from .indexed_dot import indexed_dot_kernel
from .lse_forward import lse_forward_kernel

# Largest dynamic shared memory per block: sm_90 (H100) 227 KiB, sm_80 (A100) 163 KiB.
SHARED_MEMORY_LIMIT = {90: 232448, 80: 166912}
TRITON_DTYPE = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}

# As launched on contiguous x [N, d] and W [V, d]: the inner strides are 1, and d and
# the row strides are multiples of 16 in any real model (d = 896, 4096, ...). So is every
# pointer of a fresh tensor: the caching allocator aligns blocks far beyond 16 bytes.
UNIT_STRIDES = ("stride_xd", "stride_wd")
DIVISIBLE_SIZES = ("D", "stride_xn", "stride_wv")


@dataclass(frozen=True)
class CompileSpec:
    name: str
    kernel: object
    signature: dict  # argument name -> Triton type ("*bf16", "i32", "fp32") or "constexpr"
    constexprs: dict
    num_warps: int
    num_stages: int
    divisible: tuple[str, ...] = ()  # arguments a typical launch has divisible by 16
    unit_strides: tuple[str, ...] = ()  # integer arguments a typical launch passes as 1
    archs: tuple[int, ...] = (90, 80)  # the architectures whose launches use this config


def kernel_spec(name: str, kernel, pointers: dict, constexprs: dict, config: TileConfig | None = None,
                float_args: tuple = (), num_warps: int = 4, num_stages: int = 2) -> CompileSpec:
    """A spec: named pointers get their element type, `float_args` fp32, other arguments i32.

    Warps and stages come from `config` when given. As launched, every pointer, d and
    the row strides are divisible by 16, and the inner strides are 1.
    """
    signature = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in pointers:
            signature[arg] = "*" + pointers[arg]
        elif arg in float_args:
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
    if config is not None:
        num_warps, num_stages = config.num_warps, config.num_stages
    divisible = tuple(pointers) + tuple(a for a in DIVISIBLE_SIZES if a in signature)
    unit_strides = tuple(a for a in UNIT_STRIDES if a in signature)
    return CompileSpec(name, kernel, signature, constexprs, num_warps, num_stages, divisible, unit_strides)


def forward_spec(config: TileConfig, dtype: str, head: str | None = None, archs: tuple[int, ...] = (90, 80)
                 ) -> CompileSpec:
    """`head` (`lse_forward.head_kind`): "plain" (no bias, softcap or label smoothing),
    "softcap" (a softcap alone), or None: every flag on."""
    t = TRITON_DTYPE[dtype]
    pointers = {"x_ptr": t, "w_ptr": t, "b_ptr": "fp32", "part_max_ptr": "fp32", "part_sum_ptr": "fp32",
                "part_zsum_ptr": "fp32", "block_max_ptr": "fp32"}
    constexprs = {"BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k,
                  "HAS_BIAS": head is None, "HAS_SOFTCAP": head != "plain", "LOGIT_SUM": head is None,
                  "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32", "USE_TMA": config.tma}
    flags = f"{head}," if head else ""
    spec = kernel_spec(f"lse_forward[{dtype},{flags}{config}]", lse_forward_kernel, pointers, constexprs, config,
                       float_args=("softcap", "inv_temp"))
    if config.tma:
        spec = with_descriptors(spec, x_ptr=(t, config.block_m, config.block_k),
                                w_ptr=(t, config.block_n, config.block_k))
    return dataclasses.replace(spec, archs=archs)


def gradient_spec(config: TileConfig, dtype: str, filtered: bool, archs: tuple[int, ...] = (90, 80),
                  plain: bool = False) -> CompileSpec:
    """The backward's gradient kernel with every option on (bias, softcap, label smoothing),
    or none of them (`plain`)."""
    t = TRITON_DTYPE[dtype]
    pointers = {"x_ptr": t, "w_ptr": t, "b_ptr": "fp32", "lse_ptr": "fp32", "row_coef_ptr": "fp32",
                "uniform_ptr": "fp32", "block_max_ptr": "fp32", "entry_offset_ptr": "i32", "entry_row_ptr": "i32",
                "entry_id_ptr": "i32", "entry_coef_ptr": "fp32", "grad_ptr": t, "skipped_ptr": "i32"}
    constexprs = {"BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k,
                  "GROUP_M": config.group_m, "HAS_BIAS": not plain, "HAS_SOFTCAP": not plain,
                  "HAS_UNIFORM": not plain, "FILTER": filtered,
                  "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32", "USE_TMA": config.tma}
    flags = ("filter," if filtered else "") + ("plain," if plain else "")
    spec = kernel_spec(f"logits_grad[{dtype},{flags}{config}]", logits_grad_kernel,
                       pointers, constexprs, config, float_args=("softcap", "inv_temp", "log_filter_eps"))
    if config.tma:
        spec = with_descriptors(spec, x_ptr=(t, config.block_m, config.block_k),
                                w_ptr=(t, config.block_n, config.block_k),
                                grad_ptr=(t, config.block_m, config.block_n))
    # The gradient buffer's row stride is its chunk's width: whole tiles, a multiple of 16.
    return dataclasses.replace(spec, divisible=spec.divisible + ("stride_gn",), archs=archs)


def with_descriptors(spec: CompileSpec, **blocks: tuple[str, int, int]) -> CompileSpec:
    """`spec` with the named pointer arguments passed as TMA descriptors of (dtype, rows, cols) blocks."""
    signature = dict(spec.signature)
    for name, (dtype, rows, cols) in blocks.items():
        signature[name] = f"tensordesc<{dtype}[{rows}, {cols}]>"
    return dataclasses.replace(spec, signature=signature, divisible=tuple(a for a in spec.divisible if a not in blocks))


def indexed_dot_spec(dtype: str) -> CompileSpec:
    t = TRITON_DTYPE[dtype]
    pointers = {"x_ptr": t, "w_ptr": t, "b_ptr": "fp32", "ids_ptr": "i64", "out_ptr": "fp32"}
    constexprs = {"BLOCK_P": INDEXED_DOT_BLOCK_P, "BLOCK_D": INDEXED_DOT_BLOCK_D, "HAS_BIAS": True, "HAS_SOFTCAP": True}
    return kernel_spec(f"indexed_dot[{dtype}]", indexed_dot_kernel, pointers, constexprs,
                       float_args=("softcap", "inv_temp"), num_warps=4, num_stages=2)


def all_specs() -> list[CompileSpec]:
    """Every kernel x config x dtype launched on a GPU, the filter variant included.

    INTERPRETER_CONFIG is left out: its one-warp tiles run only under TRITON_INTERPRET=1,
    never on a GPU, and compiled as launched one warp holds the whole 32x64 fp32 tile
    and its gradient, which spills.
    """
    specs = []
    for dtype, forward in (("bf16", FORWARD_CANDIDATES), ("fp32", FORWARD_CANDIDATES_FP32)):
        specs += [forward_spec(c, dtype) for c in forward]
        if dtype == "bf16":  # sm_90: a plain head's own wide tile, and the TMA candidates
            specs.append(forward_spec(FORWARD_PLAIN_SM90, dtype, head="plain", archs=(90,)))
            specs += [forward_spec(c, dtype, archs=(90,)) for c in FORWARD_SM90_CANDIDATES if c.tma]
            specs += [forward_spec(c, dtype, head="plain", archs=(90,)) for c in FORWARD_PLAIN_SM90_CANDIDATES
                      if c.tma]
            specs += [forward_spec(c, dtype, head="softcap", archs=(90,)) for c in FORWARD_SOFTCAP_SM90_CANDIDATES
                      if c.tma]
        # The gradient kernel's tiles per architecture (sm_80's fp32 list is sm_90's too).
        if dtype == "bf16":
            gradient = [(c, (90,)) for c in GRADIENT_CANDIDATES_SM90 if c not in GRADIENT_CANDIDATES]
            gradient += [(c, (90, 80) if c in GRADIENT_CANDIDATES_SM90 else (80,)) for c in GRADIENT_CANDIDATES]
        else:
            gradient = [(c, (90, 80)) for c in GRADIENT_CANDIDATES_FP32]
        specs += [gradient_spec(c, dtype, filtered=False, archs=archs) for c, archs in gradient]
        # The filter adds live values (the block maxima, the entry bounds): each default with it.
        defaults = {c: archs for c, archs in gradient if c in (GRADIENT_CANDIDATES_SM90[0], GRADIENT_CANDIDATES[0],
                                                                GRADIENT_CANDIDATES_FP32[0])}
        specs += [gradient_spec(c, dtype, filtered=True, archs=archs) for c, archs in defaults.items()]
        if dtype == "bf16":  # sm_90: a plain head's wide TMA tiles, which spill with every option on
            specs += [gradient_spec(c, dtype, filtered=False, archs=(90,), plain=True)
                      for c in GRADIENT_PLAIN_CANDIDATES_SM90 if c not in GRADIENT_CANDIDATES_SM90]
            # bf16's filter is on by default: the plain head's default tile with it.
            specs.append(gradient_spec(GRADIENT_PLAIN_CANDIDATES_SM90[0], dtype, filtered=True, archs=(90,),
                                       plain=True))
        specs.append(indexed_dot_spec(dtype))
    return specs


def _source(kernel, signature: dict, constexprs: dict, attrs: dict) -> ASTSource:
    """The kernel's ASTSource. Triton 3.3 took constexprs and attributes keyed by argument
    index; 3.2 (the oldest Triton supported) takes constants and an AttrsDescriptor of
    the indices divisible by 16."""
    if "constexprs" in inspect.signature(ASTSource.__init__).parameters:
        return ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    from triton.backends.compiler import AttrsDescriptor

    divisible = sorted(index for (index,), properties in attrs.items() if ["tt.divisibility", 16] in properties)
    descriptor = AttrsDescriptor.from_dict({"cls": AttrsDescriptor.__name__,
                                            "arg_properties": {"tt.divisibility": divisible}})
    return ASTSource(fn=kernel, signature=signature, constants=constexprs, attrs=descriptor)


def _compile(spec: CompileSpec, arch: int, signature: dict, constexprs: dict, attrs: dict):
    source = _source(spec.kernel, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": spec.num_warps, "num_stages": spec.num_stages,
                                   "enable_fp_fusion": ENABLE_FP_FUSION})


def compile_spec(spec: CompileSpec, arch: int):
    """Compile for sm_`arch` with every runtime argument a plain value (odd sizes and strides)."""
    return _compile(spec, arch, spec.signature, spec.constexprs, {})


def compile_as_launched(spec: CompileSpec, arch: int):
    """Compile for sm_`arch` as the JIT specialises a contiguous, 16-aligned launch."""
    signature = dict(spec.signature)
    constexprs = dict(spec.constexprs)
    for name in spec.unit_strides:
        signature[name] = "constexpr"
        constexprs[name] = 1
    names = list(signature)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in spec.divisible}
    return _compile(spec, arch, signature, constexprs, attrs)


def _cuobjdump(compiled, flag: str) -> str:
    """Triton's bundled cuobjdump with `flag` on a compiled kernel's cubin."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        return subprocess.run([cuobjdump, flag, path], capture_output=True, text=True, check=True).stdout


def resource_usage(compiled) -> tuple[int, int]:
    """(registers per thread, stack bytes per thread) of a compiled kernel; stack above 0 means spills."""
    out = _cuobjdump(compiled, "--dump-resource-usage")
    match = re.search(r"REG:(\d+).*?STACK:(\d+)", out)
    if match is None:
        raise RuntimeError(f"no resource usage in cuobjdump output: {out[:200]}")
    return int(match.group(1)), int(match.group(2))


def serialized_wgmmas(compiled) -> bool:
    """Whether ptxas waits out every wgmma of an sm_90 kernel before the next one issues:
    each HGMMA in the SASS followed by a full `WARPGROUP.DEPBAR.LE gsb0, 0x0` before any
    other HGMMA. ptxas does so where it cannot prove the accumulators safe from other
    writes while wgmmas are in flight (CUDA 12.8's ptxas says so in its info C7515), and
    the tensor cores then idle for each wgmma's latency. False for a kernel without
    wgmmas."""
    instructions = re.findall(r"/\*[0-9a-f]{4,6}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*(?: gsb0, 0x[0-9a-f]+)?)",
                              _cuobjdump(compiled, "-sass"))
    hgmmas, pending = 0, False  # pending: the last HGMMA not yet waited out
    for op in instructions:
        if op.startswith("HGMMA"):
            if pending:
                return False
            hgmmas, pending = hgmmas + 1, True
        elif op == "WARPGROUP.DEPBAR.LE gsb0, 0x0":
            pending = False
    return hgmmas > 0 and not pending
