"""Every launch-config candidate of the main Triton kernels, timed at the issues' shapes (GPU).

A GPU session is short, and a default chosen on compile reports alone (registers,
spills, barriers) is a guess: this times each candidate of a kernel kind on one call
at the shape its target is measured on, so one run says which default to keep.

    threshold  `triton_topk` k=64 at N=2048 on Qwen2.5-7B's head (a plain head: its candidates too);
               then the loss forward on the default's tile, the same GEMM with an online
               lse alone, which says what the rest of a top-k costs
    sample     `triton_sample` at B=64 and 256, Qwen2.5-7B's head (d=3584, V=152064), T=0.8,
               against the bare bf16 matmul; then the default drawing greedily (no
               noise), which says what the noise costs, and at T=1 (no tempered fold)
    forward    the loss forward's statistics kernel, a plain head (no bias), N=4096 on
               that head, against the bare bf16 matmul; then a softcap-only head, Gemma-2-2B's
               (d=2304, V=256000, softcap 30), N=4096
    gradient   the loss backward (its gradient kernel and GEMMs) at N=4096 on that head;
               then the default for d_weight alone (the vocabulary pass), which says
               what d_input's own pass costs

By default the kinds run in this order (`--kinds` picks and orders them). Each row is
the median ms of `triton.testing.do_bench` after a warm-up call (which compiles); the
default is marked. bf16 throughout.
"""

from __future__ import annotations

import argparse

import torch

from .report import progress

QWEN_D, QWEN_V = 3584, 152064
GEMMA_D, GEMMA_V, GEMMA_SOFTCAP = 2304, 256000, 30.0
# In this order by default: the kinds with the most candidates no GPU has timed yet come
# first, so that a run cut short by its time limit still has their rows.
KINDS = ("threshold", "sample", "forward", "gradient")
SAMPLE_BATCHES = (64, 256)  # issue 4's two batch sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {','.join(KINDS)}")
    parser.add_argument("--rep-ms", type=int, default=50, help="do_bench's rep (ms of timed calls a candidate)")


def _bench(fn, rep_ms: int) -> float:
    import triton

    fn()  # compiles
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=5, rep=rep_ms, return_mode="median")


def _report(kind: str, candidates, default, time_fn, baseline_ms: float | None = None) -> None:
    for config in candidates:
        try:
            ms = time_fn(config)
        except Exception as error:  # a candidate that fails to compile or run ends only its row
            print(f"{kind:14s} {str(config):32s} failed: {type(error).__name__}: {str(error)[:120]}")
            continue
        ratio = f"  {ms / baseline_ms:5.2f}x matmul" if baseline_ms else ""
        print(f"{kind:14s} {str(config):32s} {ms:9.3f} ms{ratio}{'  (default)' if config == default else ''}",
              flush=True)


def tune_sample(rep_ms: int) -> None:
    for rows in SAMPLE_BATCHES:
        _tune_sample_batch(rows, rep_ms)


def _tune_sample_batch(rows: int, rep_ms: int) -> None:
    from distil_kernels.sampling.sample import SamplingOptions, philox_rows
    from distil_kernels.sampling.triton.configs import device_arch, sample_candidates
    from distil_kernels.sampling.triton.sample import triton_sample

    from .sampling_suite import make_inputs

    kind = f"sample B={rows}"
    x, w = make_inputs(rows, QWEN_D, QWEN_V, "bf16", "cuda")
    seeds, positions = philox_rows(0, None, rows, x.device)
    options = SamplingOptions(temperature=0.8)
    candidates = sample_candidates(x.dtype, rows, device_arch(x.device))
    matmul_ms = _bench(lambda: x @ w.T, rep_ms)
    print(f"{kind:14s} {'bare matmul':32s} {matmul_ms:9.3f} ms", flush=True)
    _report(kind, candidates, candidates[0],
            lambda c: _bench(lambda: triton_sample(x, w, None, None, options, seeds, positions, c), rep_ms),
            matmul_ms)
    # Greedy draws skip the noise (Philox and two logs an id): the difference is its cost.
    # At T = 1 the noise stays but z is the raw logit: no division, one lse fold.
    for label, other in (("default, greedy (no noise)", SamplingOptions(temperature=0.0)),
                         ("default, T=1 (one lse fold)", SamplingOptions(temperature=1.0))):
        other_ms = _bench(lambda o=other: triton_sample(x, w, None, None, o, seeds, positions, candidates[0]), rep_ms)
        print(f"{kind:14s} {label:32s} {other_ms:9.3f} ms  {other_ms / matmul_ms:5.2f}x matmul", flush=True)


def tune_forward(rep_ms: int) -> None:
    from distil_kernels.loss.options import LossOptions

    _tune_forward_head("forward", QWEN_D, QWEN_V, LossOptions(), rep_ms)
    _tune_forward_head("fwd softcap", GEMMA_D, GEMMA_V, LossOptions(softcap=GEMMA_SOFTCAP), rep_ms)


def _tune_forward_head(label: str, d: int, v: int, options, rep_ms: int) -> None:
    """The forward's candidates for a head without bias (`head_kind`'s plain or softcap kind)."""
    from distil_kernels.loss.triton.configs import CANDIDATES
    from distil_kernels.loss.triton.lse_forward import head_kind, lse_forward

    n = 4096
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, d, generator=gen, device="cuda").bfloat16()
    w = (torch.randn(v, d, generator=gen, device="cuda") * d**-0.5).bfloat16()
    sm90 = torch.cuda.get_device_capability()[0] == 9
    kind = f"forward_{head_kind(None, options)}_sm90" if sm90 else "forward"
    candidates = CANDIDATES[kind][0]
    matmul_ms = _bench(lambda: x @ w.T, rep_ms)
    print(f"{label:14s} {'bare matmul':32s} {matmul_ms:9.3f} ms", flush=True)
    _report(label, candidates, candidates[0], lambda c: _bench(lambda: lse_forward(x, w, None, options, c), rep_ms),
            matmul_ms)


def tune_gradient(rep_ms: int) -> None:
    from distil_kernels.loss.options import LossOptions
    from distil_kernels.loss.targets import make_slots, row_terms, row_weights
    from distil_kernels.loss.triton import triton_stats
    from distil_kernels.loss.triton.backward import backward
    from distil_kernels.loss.triton.configs import CANDIDATES

    n = 4096
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, QWEN_D, generator=gen, device="cuda").bfloat16()
    w = (torch.randn(QWEN_V, QWEN_D, generator=gen, device="cuda") * QWEN_D**-0.5).bfloat16()
    y = torch.randint(0, QWEN_V, (n,), generator=gen, device="cuda")
    options = LossOptions()
    slots = make_slots(y, QWEN_V, options.ignore_index, torch.float32)
    stats = triton_stats(x, w, None, slots.ids, options)
    terms = row_terms(stats.lse, stats.slot_logits, None, slots, options, QWEN_V)
    g = row_weights(slots.row_valid, "mean", torch.float32)
    kind = "gradient_plain_sm90" if torch.cuda.get_device_capability()[0] == 9 else "gradient"  # no bias, softcap
    candidates = CANDIDATES[kind][0]

    def run(config, need=(True, True, False)):
        return backward(x, w, None, slots.ids, stats.lse, terms.row_coef * g, terms.slot_coef * g[:, None], None,
                        stats.forward, options, need, config)

    _report("gradient", candidates, candidates[0], lambda c: _bench(lambda: run(c), rep_ms))
    # d_weight alone is the vocabulary pass: the rest of the time above is d_input's.
    vocabulary_pass_ms = _bench(lambda: run(candidates[0], (False, True, False)), rep_ms)
    print(f"{'gradient':14s} {'default, d_weight only':32s} {vocabulary_pass_ms:9.3f} ms", flush=True)


def tune_threshold(rep_ms: int) -> None:
    from distil_kernels.loss.options import LossOptions
    from distil_kernels.loss.triton.lse_forward import lse_forward
    from distil_kernels.sampling.triton.configs import device_arch, threshold_candidates
    from distil_kernels.sampling.triton.topk import triton_topk

    from .sampling_suite import make_inputs

    x, w = make_inputs(2048, QWEN_D, QWEN_V, "bf16", "cuda")
    options = LossOptions()
    candidates = threshold_candidates(x.dtype, device_arch(x.device), plain=True)  # no bias, softcap or raw lse
    matmul_ms = _bench(lambda: x @ w.T, rep_ms)
    print(f"{'threshold':14s} {'bare matmul':32s} {matmul_ms:9.3f} ms", flush=True)
    _report("threshold", candidates, candidates[0],
            lambda c: _bench(lambda: triton_topk(x, w, None, 64, options, config=c), rep_ms), matmul_ms)
    # The loss forward on the default's tile: the same GEMM with an online lse alone. The
    # rows above less this one are the threshold pass's own epilogue (its compare and
    # candidate rounds), the subset GEMM, the lists' sort and the merge.
    forward_ms = _bench(lambda: lse_forward(x, w, None, options, candidates[0]), rep_ms)
    print(f"{'threshold':14s} {'loss forward, the default tile':32s} {forward_ms:9.3f} ms"
          f"  {forward_ms / matmul_ms:5.2f}x matmul", flush=True)


def main(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("bench tune: no CUDA device here")
        return 2
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        print(f"bench tune: unknown kinds {unknown}; choose from {','.join(KINDS)}")
        return 2
    runners = {"sample": tune_sample, "forward": tune_forward, "gradient": tune_gradient,
               "threshold": tune_threshold}
    progress(f"bench tune on {torch.cuda.get_device_name()}: {', '.join(kinds)}")
    for kind in kinds:
        runners[kind](args.rep_ms)
    return 0
