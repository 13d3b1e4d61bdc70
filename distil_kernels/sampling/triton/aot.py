"""Ahead-of-time compilation of every sampling kernel and config, for a GPU target, on any host.

The specs are the loss core's (loss/triton/aot.py): each compiles with `compile_spec`,
every runtime argument a plain value (the code a launch with odd sizes or strides
gets), and with `compile_as_launched`, as the JIT specialises a contiguous, 16-aligned
launch (unit inner strides constant; pointers, d and the row strides divisible by 16),
whose shared memory and registers (`resource_usage`) are the ones a model's launch sees.
"""

from __future__ import annotations

import dataclasses

import torch

from ...loss.triton.aot import TRITON_DTYPE, CompileSpec, kernel_spec, with_descriptors
from .configs import (
    CANDIDATE_SAMPLE_CONFIG,
    DENSE_SAMPLE_CONFIG,
    MAX_TOPK,
    SAMPLES_PER_PROGRAM,
    TRUNCATION_CONFIG,
    TileConfig,
    sample_candidates,
    threshold_candidates,
    topk_candidates,
)
from .configs import target_programs
from .sample import FINISH_BLOCK_D, FINISH_WARPS, finish_draws_kernel, sample_kernel
from .topk import FINISH_THRESHOLD_WARPS, finish_threshold_kernel, skip_unbeaten_tiles, threshold_kernel, topk_kernel
from .truncation import (FINISH_TRUNCATED_WARPS, candidate_sample_kernel, finish_truncated_draws_kernel,
                         truncated_draws_kernel, truncation_kernel)

_TORCH_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def topk_spec(config: TileConfig, dtype: str, K: int) -> CompileSpec:
    t = TRITON_DTYPE[dtype]
    pointers = {"x_ptr": t, "w_ptr": t, "b_ptr": "fp32", "keys_ptr": "i64", "part_ptr": "fp32"}
    constexprs = {"K": K, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k,
                  "HAS_BIAS": True, "HAS_SOFTCAP": True, "RAW_LSE": True,
                  "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32", "SKIP_UNBEATEN": skip_unbeaten_tiles()}
    return kernel_spec(f"topk[{dtype},K={K},{config}]", topk_kernel, pointers, constexprs, config,
                       float_args=("softcap", "inv_temp"))


def threshold_spec(config: TileConfig, dtype: str, archs: tuple[int, ...] = (90, 80),
                   plain: bool = False) -> CompileSpec:
    """The threshold kernel with every option on (bias, softcap, the raw lse), or none (`plain`)."""
    t = TRITON_DTYPE[dtype]
    pointers = {"x_ptr": t, "w_ptr": t, "b_ptr": "fp32", "bound_ptr": "fp32", "count_ptr": "i32",
                "key_ptr": "i64", "part_ptr": "fp32"}
    constexprs = {"BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k,
                  "HAS_BIAS": not plain, "HAS_SOFTCAP": not plain, "RAW_LSE": not plain,
                  "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32", "USE_TMA": config.tma,
                  "FLAT": config.tma and config.flat, "SPLIT_N": config.split_n,
                  "X_REGISTERS": config.tma and config.x_registers}
    flags = "plain," if plain else ""
    spec = kernel_spec(f"threshold[{dtype},{flags}{config}]", threshold_kernel, pointers, constexprs, config,
                       float_args=("softcap", "inv_temp"))
    if config.tma:
        spec = with_descriptors(spec, x_ptr=(t, config.block_m, config.block_k),
                                w_ptr=(t, config.block_n, config.block_k))
    return dataclasses.replace(spec, archs=archs)


def sample_spec(config: TileConfig, dtype: str, samples: int, greedy: bool = False,
                archs: tuple[int, ...] = (90, 80), tempered: bool = True) -> CompileSpec:
    """`tempered=False`: draws at temperature 1, whose z is the raw logit."""
    t = TRITON_DTYPE[dtype]
    pointers = {"x_ptr": t, "w_ptr": t, "b_ptr": "fp32", "seed_ptr": "i64", "pos_ptr": "i64",
                "score_ptr": "fp32", "id_ptr": "i64", "part_ptr": "fp32"}
    constexprs = {"SAMPLES": samples, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n,
                  "BLOCK_K": config.block_k, "SPLIT_N": config.split_n, "HAS_BIAS": True, "HAS_SOFTCAP": True,
                  "GREEDY": greedy, "TEMPERED": tempered and not greedy,
                  "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32", "USE_TMA": config.tma,
                  "FLAT": config.tma and config.flat, "X_REGISTERS": config.tma and config.x_registers}
    flags = "greedy," if greedy else f"S={samples}," + ("" if tempered else "T=1,")
    spec = kernel_spec(f"sample[{dtype},{flags}{config}]", sample_kernel, pointers, constexprs, config,
                       float_args=("softcap", "temperature"))
    if config.tma:
        spec = with_descriptors(spec, x_ptr=(t, config.block_m, config.block_k),
                                w_ptr=(t, config.block_n, config.block_k))
    return dataclasses.replace(spec, archs=archs)


def finish_threshold_spec(block_k: int, block_s: int, raw_lse: bool) -> CompileSpec:
    pointers = {"top_ptr": "i64", "count_ptr": "i32", "part_ptr": "fp32", "values_ptr": "fp32", "ids_ptr": "i64",
                "lse_ptr": "fp32", "lse_raw_ptr": "fp32", "settled_ptr": "i1"}
    constexprs = {"RAW_LSE": raw_lse, "BLOCK_K": block_k, "BLOCK_S": block_s}
    flags = "raw_lse," if raw_lse else ""
    return kernel_spec(f"finish_threshold[{flags}K={block_k},S={block_s}]", finish_threshold_kernel, pointers,
                       constexprs, num_warps=FINISH_THRESHOLD_WARPS, num_stages=1)


def truncation_spec(tempered: bool, top_p: bool, min_p: bool) -> CompileSpec:
    pointers = {"raw_ptr": "fp32", "lse_raw_ptr": "fp32", "kept_lse_ptr": "fp32", "bound_ptr": "i64",
                "cut_ptr": "i64"}
    config = TRUNCATION_CONFIG
    constexprs = {"TEMPERED": tempered, "TOP_P": top_p, "MIN_P": min_p, "BLOCK_N": config.block_n}
    flags = ",".join(name for name, on in (("T", tempered), ("top_p", top_p), ("min_p", min_p)) if on)
    spec = kernel_spec(f"truncation[fp32,{flags},{config}]", truncation_kernel, pointers, constexprs, config,
                       float_args=("temperature", "log_min_p"))
    # top_p's float64 bits arrive as an int64. The model heads' vocabularies (and so the
    # logits' row stride) are multiples of 16, as the JIT then specialises them: 16-byte loads.
    return dataclasses.replace(spec, signature={**spec.signature, "top_p_bits": "i64"},
                               divisible=spec.divisible + ("V", "stride_n"))


def truncated_draws_spec(samples: int, tempered: bool = True) -> CompileSpec:
    pointers = {"raw_ptr": "fp32", "bound_ptr": "i64", "cut_ptr": "i64", "seed_ptr": "i64", "pos_ptr": "i64",
                "score_ptr": "fp32", "id_ptr": "i64"}
    config = DENSE_SAMPLE_CONFIG
    constexprs = {"SAMPLES": samples, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "TEMPERED": tempered}
    flags = "" if tempered else "T=1,"
    spec = kernel_spec(f"truncated_draws[fp32,{flags}S={samples},{config}]", truncated_draws_kernel, pointers,
                       constexprs, config, float_args=("temperature",))
    return dataclasses.replace(spec, divisible=spec.divisible + ("V", "stride_n"))


def finish_truncated_draws_spec(block_s: int, tempered: bool = True) -> CompileSpec:
    pointers = {"raw_ptr": "fp32", "score_ptr": "fp32", "id_ptr": "i64", "lse_raw_ptr": "fp32",
                "kept_lse_ptr": "fp32", "ids_out_ptr": "i64", "logprob_ptr": "fp32", "raw_logprob_ptr": "fp32"}
    flags = "" if tempered else "T=1,"
    return kernel_spec(f"finish_truncated_draws[fp32,{flags}S={block_s}]", finish_truncated_draws_kernel, pointers,
                       {"BLOCK_S": block_s, "TEMPERED": tempered}, float_args=("temperature",),
                       num_warps=FINISH_TRUNCATED_WARPS, num_stages=1)


def candidate_sample_spec(top_k: bool, top_p: bool, min_p: bool) -> CompileSpec:
    pointers = {"z_ptr": "fp32", "ids_ptr": "i64", "lse_z_ptr": "fp32", "lse_raw_ptr": "fp32", "seed_ptr": "i64",
                "pos_ptr": "i64", "ids_out_ptr": "i64", "logprob_ptr": "fp32", "raw_logprob_ptr": "fp32",
                "status_ptr": "i32", "exact_ptr": "i1"}
    config = CANDIDATE_SAMPLE_CONFIG
    # Rows flagged by the top-k come with top_p / min_p alone (no top_k: they go to the fallback).
    constexprs = {"TOP_K": top_k, "TOP_P": top_p, "MIN_P": min_p, "EXACT_ROWS": not top_k, "ALL_SETTLED": False,
                  "TOP_K_SETTLES": top_k, "BLOCK_C": config.block_n}
    flags = ",".join(name for name, on in (("top_k", top_k), ("top_p", top_p), ("min_p", min_p)) if on)
    spec = kernel_spec(f"candidate_sample[fp32,{flags},{config}]", candidate_sample_kernel, pointers, constexprs,
                       config, float_args=("log_min_p", "temperature"))
    return dataclasses.replace(spec, signature={**spec.signature, "top_p_bits": "i64"})


def finish_draws_spec(block_s: int, greedy: bool, dtype: str = "bf16", tempered: bool = True) -> CompileSpec:
    t = TRITON_DTYPE[dtype]
    pointers = {"x_ptr": t, "w_ptr": t, "b_ptr": "fp32", "score_ptr": "fp32", "id_ptr": "i64", "part_ptr": "fp32",
                "ids_out_ptr": "i64", "logprob_ptr": "fp32", "raw_logprob_ptr": "fp32", "lse_ptr": "fp32"}
    flags = "greedy," if greedy else ("" if tempered else "T=1,")
    constexprs = {"BLOCK_S": block_s, "BLOCK_D": FINISH_BLOCK_D, "HAS_BIAS": True, "HAS_SOFTCAP": True,
                  "GREEDY": greedy, "TEMPERED": tempered and not greedy}
    return kernel_spec(f"finish_draws[{dtype},{flags}S={block_s}]", finish_draws_kernel, pointers, constexprs,
                       float_args=("softcap", "temperature"), num_warps=FINISH_WARPS, num_stages=1)


def by_arch(sm90: tuple[TileConfig, ...], sm80: tuple[TileConfig, ...]) -> list[tuple[TileConfig, tuple[int, ...]]]:
    """Each config of two per-architecture lists with the architectures that launch it."""
    both = [(c, (90, 80) if c in sm80 else (90,)) for c in dict.fromkeys(sm90)]
    return both + [(c, (80,)) for c in dict.fromkeys(sm80) if c not in sm90]


def all_specs() -> list[CompileSpec]:
    """Every kernel x config x dtype launched on a GPU: each padded K, each samples-per-program.

    The interpreter's one-warp configs never run on a GPU, and compiled they would
    spill kilobytes per thread and take minutes: they are left out. Per-architecture
    tiles build for their architecture only.
    """
    specs = []
    for dtype in ("bf16", "fp32"):
        torch_dtype = _TORCH_DTYPE[dtype]
        general = threshold_candidates(torch_dtype, 90)
        for config, archs in by_arch(general, threshold_candidates(torch_dtype, 80)):
            specs.append(threshold_spec(config, dtype, archs))
        # sm_90 tiles for a plain head alone, which spill with every option on.
        specs += [threshold_spec(c, dtype, (90,), plain=True) for c in threshold_candidates(torch_dtype, 90, plain=True)
                  if c not in general]
        for K in (1 << i for i in range(MAX_TOPK.bit_length())):
            specs += [topk_spec(c, dtype, K) for c in topk_candidates(torch_dtype, K)]
    # The threshold pass's finish, from k = 1 to MAX_TOPK and from one split to the most a
    # launch plans.
    most_splits = 1 << (target_programs() - 1).bit_length()
    specs += [finish_threshold_spec(block_k, block_s, raw_lse) for block_k in (1, MAX_TOPK)
              for block_s in (1, most_splits) for raw_lse in (False, True)]
    samples = [1 << i for i in range(SAMPLES_PER_PROGRAM.bit_length())]
    for dtype in ("bf16", "fp32"):
        torch_dtype = _TORCH_DTYPE[dtype]
        # Batches of 128 rows and more (every tile of smaller batches above 16 rows, and
        # the tall one), then the small-batch tile.
        configs = by_arch(sample_candidates(torch_dtype, 128, 90) + sample_candidates(torch_dtype, 16, 90),
                          sample_candidates(torch_dtype, 128, 80) + sample_candidates(torch_dtype, 16, 80))
        for config, archs in configs:
            specs += [sample_spec(config, dtype, s, archs=archs) for s in samples]
            specs.append(sample_spec(config, dtype, 1, greedy=True, archs=archs))
        # Draws at temperature 1 run the tempered code less a division and a fold: the
        # default tiles of each architecture and batch size (sm_90's differ at one row block).
        defaults: dict[TileConfig, tuple[int, ...]] = {}
        for rows in (128, 64, 16):
            for arch in (90, 80):
                config = sample_candidates(torch_dtype, rows, arch)[0]
                defaults[config] = defaults.get(config, ()) + (arch,)
        specs += [sample_spec(config, dtype, 1, archs=archs, tempered=False) for config, archs in defaults.items()]
    # The dense truncated sampler: every truncation the kernel branches on, the draws at
    # each samples-per-program, and its merge from one split to the most a launch plans.
    specs += [truncation_spec(tempered, top_p, min_p) for tempered in (True, False)
              for top_p, min_p in ((True, False), (False, True), (True, True), (False, False))]
    specs += [truncated_draws_spec(s) for s in samples] + [truncated_draws_spec(1, tempered=False)]
    widest = 1 << (target_programs("sample") - 1).bit_length()
    specs += [finish_truncated_draws_spec(block_s, tempered) for block_s in (1, widest) for tempered in (True, False)]
    # Sampling among candidates: each truncation the kernel branches on.
    specs += [candidate_sample_spec(top_k, top_p, min_p) for top_k, top_p, min_p in
              ((True, False, False), (False, True, False), (False, False, True), (True, True, True))]
    # The sampler's merge, from one split to the most a launch plans (next power of two).
    specs += [finish_draws_spec(block_s, greedy, dtype, tempered) for block_s in (1, widest)
              for greedy, tempered in ((False, True), (False, False), (True, False)) for dtype in ("bf16", "fp32")]
    return specs
