"""The `cuda` backend of the sampling core: cuBLAS logits chunks, csrc/'s selection kernels.

Rows go a chunk at a time, as in the loss's `cuda` backend (`distil_kernels.loss.cuda`):
one GEMM with an fp32 output gives the chunk's logits, the loss epilogue's `chunk_stats`
applies bias and softcap in place when there are any (temperature 1), and
csrc/sampling_epilogue.cu finishes each row: `row_topk` (a histogram of the keys' top bits,
then the k-th key's bin and above sorted in shared memory, ordered by value desc and id
asc; k <= 1024, above that the chunked sweep; on sm_90 with
`DISTIL_KERNELS_CUDA_TOPK=one-pass`, `row_topk_one_pass`: a thread-block cluster holds
each row's keys, read from HBM once instead of twice) or `gumbel_argmax` (the Philox
stream and Gumbel transform of the other backends, so a seed draws the same ids but at
float ties; rows split into column ranges so that a small batch fills the GPU). Both also
return the row's log-sum-exp terms at temperature 1 and at the temperature.

`REFERENCE_SAMPLING_OPS` is the kernels' contract in PyTorch: the tests run this module
with it on the CPU, and compare the kernels with it on a GPU.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..loss.cuda import REFERENCE_OPS, EpilogueOps, chunk_rows, extension_ops
from ..loss.options import LossOptions
from .sample import at_temperature
from .topk import Candidates, chunked_topk

# csrc/sampling_epilogue.h: kMaxTopK (the candidates of a row sort in shared memory).
MAX_TOPK = 1024
# "one-pass" or "two-pass": which top-k kernel `row_topk` runs on sm_90 (two passes elsewhere).
TOPK_ENV = "DISTIL_KERNELS_CUDA_TOPK"


@dataclass(frozen=True)
class SamplingOps:
    epilogue: EpilogueOps  # the GEMM and `chunk_stats` (bias and softcap in place)
    # (logits fp32 [r, c], k, temperature, values [r, k] out, ids [r, k] out, partial [r, 4] out)
    row_topk: Callable[..., None]
    # (logits fp32 [r, c], temperature, greedy, keys (k0, k1, pos_lo, pos_hi) [r] each,
    #  ids [r, n] out, scores [r, n] out, logits_out [r, n] out, partial [r, 4] out)
    gumbel_argmax: Callable[..., None]


# --------------------------------------------------------------------------------------
# Reference ops
# --------------------------------------------------------------------------------------


def _two_lse_terms(logits: Tensor, temperature: float, partial: Tensor) -> None:
    """partial [r, 4]: (max, sum exp(l - max)) of the logits, then of z = logits / temperature."""
    for column, values in ((0, logits), (2, at_temperature(logits, temperature))):
        top = values.amax(dim=1)
        partial[:, column] = top
        shift = torch.where(top == -math.inf, 0.0, top)  # a row of -inf sums to 0, not NaN
        partial[:, column + 1] = (values - shift[:, None]).exp().sum(dim=1)


def reference_row_topk(logits: Tensor, k: int, temperature: float, values: Tensor, ids: Tensor,
                       partial: Tensor) -> None:
    _two_lse_terms(logits, temperature, partial)
    # A stable descending sort: ties keep the lower id first, and NaN ranks above +inf (as
    # the kernel's keys and torch.topk rank it; an ascending sort of -logits puts it last).
    order = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :k]
    values.copy_(logits.gather(1, order))
    ids.copy_(order)


def reference_gumbel_argmax(logits: Tensor, temperature: float, greedy: bool, keys, ids: Tensor, scores: Tensor,
                            logits_out: Tensor, partial: Tensor) -> None:
    from .sample import gumbel_noise_range

    _two_lse_terms(logits, 1.0 if greedy else temperature, partial)
    z = logits if greedy else at_temperature(logits, temperature)
    for j in range(ids.shape[1]):
        score = z if greedy else z + gumbel_noise_range(0, logits.shape[1], keys, j)
        best, index = score.max(dim=1)  # the first maximum: the lower id
        ids[:, j] = index
        scores[:, j] = best
        logits_out[:, j] = logits.gather(1, index[:, None])[:, 0]


REFERENCE_SAMPLING_OPS = SamplingOps(REFERENCE_OPS, reference_row_topk, reference_gumbel_argmax)


def extension_sampling_ops() -> SamplingOps:
    """The compiled kernels (a RuntimeError saying how to build them when missing)."""
    from ..cuda_ext import extension

    ext = extension()

    def stream(t: Tensor) -> int:
        return torch.cuda.current_stream(t.device).cuda_stream

    refused = []  # the one-pass kernel's launch failed once: two passes from then on

    def row_topk(logits, k, temperature, values, ids, partial):
        args = (logits, 0, int(k), float(temperature), values, ids, partial, stream(logits))
        if (not refused and one_pass_topk_requested() and torch.cuda.get_device_capability(logits.device)[0] >= 9
                and ext.row_topk_one_pass_cluster(logits.shape[1]) > 0):
            try:
                ext.row_topk_one_pass(*args)
                return
            except RuntimeError as error:
                # A cluster launch the device refuses: nothing ran, the two-pass kernel takes the rows.
                refused.append(error)
                warnings.warn(f"the one-pass top-k kernel failed ({error}); using row_topk", stacklevel=2)
        ext.row_topk(*args)

    def gumbel_argmax(logits, temperature, greedy, keys, ids, scores, logits_out, partial):
        k0, k1, pos_lo, pos_hi = (k.contiguous() for k in keys)
        ext.gumbel_argmax(logits, 0, float(temperature or 1.0), bool(greedy), k0, k1, pos_lo, pos_hi, ids, scores,
                          logits_out, partial, stream(logits))

    return SamplingOps(extension_ops(), row_topk, gumbel_argmax)


def one_pass_topk_requested() -> bool:
    """Whether `DISTIL_KERNELS_CUDA_TOPK` asks for the one-pass top-k kernel (default: two passes)."""
    value = os.environ.get(TOPK_ENV, "two-pass")
    if value not in ("one-pass", "two-pass"):
        raise ValueError(f"{TOPK_ENV} must be 'one-pass' or 'two-pass', got {value!r}")
    return value == "one-pass"


# --------------------------------------------------------------------------------------
# Chunks of raw logits
# --------------------------------------------------------------------------------------


def _raw_chunks(x: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None,
                workspace_bytes: int | None, ops: EpilogueOps):
    """(r0, r1, raw logits fp32 [r1 - r0, V]) per chunk: softcap(x W^T + b) at temperature 1."""
    rows, vocab = x.shape[0], weight.shape[0]
    step = chunk_rows(rows, vocab, workspace_bytes)
    dev = x.device
    buf = torch.empty(step * vocab, dtype=torch.float32, device=dev)
    transformed = bias is not None or softcap is not None
    no_slots = torch.empty(step, 0, dtype=torch.int64, device=dev)
    no_slot_logits = torch.empty(step, 0, dtype=torch.float32, device=dev)
    unused_stats = torch.empty(step, 3, dtype=torch.float32, device=dev)
    bias32 = None if bias is None else bias.float().contiguous()
    weight_t = weight.T
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        n = r1 - r0
        logits = buf[: n * vocab].view(n, vocab)
        ops.mm_fp32(x[r0:r1], weight_t, logits)
        if transformed:
            # The selection kernels take the lse terms themselves; this pass only rewrites
            # the chunk, so a plain head skips it.
            ops.chunk_stats(logits, bias32, softcap, 1.0, True, no_slots[:n], 0, no_slot_logits[:n],
                            unused_stats[:n])
        yield r0, r1, logits


def _lse(partial: Tensor, column: int) -> Tensor:
    return partial[:, column] + partial[:, column + 1].log()


def cuda_topk(x: Tensor, weight: Tensor, bias: Tensor | None, k: int, options: LossOptions, raw_lse: bool = False,
              ops: SamplingOps | None = None) -> Candidates:
    """`chunked_topk`'s result by the csrc/ kernels."""
    if k > MAX_TOPK:
        return chunked_topk(x, weight, bias, k, options, raw_lse)
    ops = ops if ops is not None else extension_sampling_ops()
    rows = x.shape[0]
    dev = x.device
    ids = torch.empty(rows, k, dtype=torch.int64, device=dev)
    partial = torch.empty(rows, 4, dtype=torch.float32, device=dev)
    values = torch.empty(rows, k, dtype=torch.float32, device=dev)
    for r0, r1, logits in _raw_chunks(x, weight, bias, options.softcap, options.workspace_bytes, ops.epilogue):
        ops.row_topk(logits, k, options.temperature, values[r0:r1], ids[r0:r1], partial[r0:r1])
    return Candidates(ids, at_temperature(values, options.temperature), _lse(partial, 2),
                      _lse(partial, 0) if raw_lse else None)


def cuda_dense_draws(z: Tensor, keys, num_samples: int, ops: SamplingOps | None = None) -> Tensor:
    """ids [N, num_samples]: `gumbel_argmax` over `z` [N, V] fp32 (-inf where not kept) at
    temperature 1, the truncated sampler's dense fallback draws in one kernel pass."""
    ops = ops if ops is not None else extension_sampling_ops()
    rows, dev = z.shape[0], z.device
    ids = torch.empty(rows, num_samples, dtype=torch.int64, device=dev)
    scores = torch.empty(rows, num_samples, dtype=torch.float32, device=dev)
    best = torch.empty(rows, num_samples, dtype=torch.float32, device=dev)
    unused_lse = torch.empty(rows, 4, dtype=torch.float32, device=dev)
    ops.gumbel_argmax(z.contiguous(), 1.0, False, keys, ids, scores, best, unused_lse)
    return ids


def cuda_sample(x: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None, options, keys,
                workspace_bytes: int | None, ops: SamplingOps | None = None):
    """Untruncated or greedy sampling: one Gumbel-max pass per chunk of rows."""
    from .sample import Sample

    ops = ops if ops is not None else extension_sampling_ops()
    rows, n = x.shape[0], options.num_samples
    dev = x.device
    ids = torch.empty(rows, n, dtype=torch.int64, device=dev)
    scores = torch.empty(rows, n, dtype=torch.float32, device=dev)
    best_raw = torch.empty(rows, n, dtype=torch.float32, device=dev)
    partial = torch.empty(rows, 4, dtype=torch.float32, device=dev)
    for r0, r1, logits in _raw_chunks(x, weight, bias, softcap, workspace_bytes, ops.epilogue):
        chunk_keys = tuple(key[r0:r1] for key in keys)
        ops.gumbel_argmax(logits, options.temperature, options.greedy, chunk_keys, ids[r0:r1], scores[r0:r1],
                          best_raw[r0:r1], partial[r0:r1])
    lse_raw = _lse(partial, 0)
    raw_logprobs = best_raw - lse_raw[:, None]
    if options.greedy:
        return Sample(ids, torch.zeros_like(raw_logprobs), raw_logprobs, lse_raw)
    lse_z = _lse(partial, 2)
    return Sample(ids, at_temperature(best_raw, options.temperature) - lse_z[:, None], raw_logprobs, lse_raw)

