"""The `chunked` backend: token chunks x vocabulary tiles in plain PyTorch ops.

The [N, V] logits never exist. Rows are taken `plan.rows` at a time; each chunk's
logits are built `plan.tile` vocabulary columns at a time into one reused workspace,
folded into an online log-sum-exp, and the few logits the targets need are gathered
on the way. Memory beyond inputs, outputs and gradients is O(N*k) statistics plus the
workspace, whose size `workspace_bytes` bounds.

When a reduced (scalar) loss needs gradients, the forward also produces them: a row's
softmax is turned into its logits gradient in place while the tile is still in the
workspace, and pushed through the two backward GEMMs. Three GEMMs per element
(6*N*V*d FLOPs) instead of the four a recomputing backward needs; the backward then
only scales by the upstream gradient. `reduction="none"`, and any second backward
through a retained graph, recompute chunk by chunk from the saved statistics.

Order: workspace planning -> tile kernels -> sweeps -> autograd Function -> entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .gemm import CUDA_FP32_OUTPUT_MM, mm_fp32
from .options import LossOptions
from .reference import LossStats, compute_dtype, reduce_loss
from .targets import RowTerms, Slots, row_terms, row_upstream, row_weights

# CPU GEMMs reach their plateau at about 128 rows (measured on a 2-core AVX-512 host:
# 64 rows is ~25% slower for fp32); beyond that, a larger chunk buys nothing.
_CPU_TARGET_ROWS = 128
_CPU_MIN_WORKSPACE = 16 << 20
_CPU_MAX_WORKSPACE = 64 << 20
# On GPUs a chunk must fill the SMs: 256 MiB holds ~1k rows of a 64k vocabulary.
_GPU_WORKSPACE = 256 << 20
# Below this many rows the vocabulary is tiled instead of shrinking the chunk further.
_MIN_CHUNK_ROWS = 16
# Columns per GEMM call of an fp32 logits tile on the CPU (see logits_tile).
CPU_FP32_GEMM_COLUMNS = 2048


# --------------------------------------------------------------------------------------
# Workspace planning
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkPlan:
    rows: int  # token rows per chunk
    tile: int  # vocabulary columns per tile (== V: whole rows, one tile per chunk)


def _bytes_per_tile_element(dtype: torch.dtype, softcap: bool) -> int:
    cdt = compute_dtype(dtype)
    per = torch.finfo(cdt).bits // 8  # the compute-dtype tile
    if dtype != cdt:
        per += dtype.itemsize  # its low-precision twin, the GEMM output / operand
    if softcap:
        per += torch.finfo(cdt).bits // 8  # tanh(u / c), kept for the chain rule
    return per


def workspace_budget(vocab_size: int, dtype: torch.dtype, device: torch.device, options: LossOptions,
                     cpu_target_rows: int = _CPU_TARGET_ROWS) -> int:
    """The bytes a sweep's tile buffers may take: `options.workspace_bytes`, or by default
    `cpu_target_rows` rows of the vocabulary within [16, 64] MiB on the CPU, 256 MiB elsewhere."""
    if options.workspace_bytes is not None:
        return options.workspace_bytes
    if device.type != "cpu":
        return _GPU_WORKSPACE
    per_element = _bytes_per_tile_element(dtype, options.softcap is not None)
    return min(max(cpu_target_rows * vocab_size * per_element, _CPU_MIN_WORKSPACE), _CPU_MAX_WORKSPACE)


def plan_chunks(num_rows: int, vocab_size: int, dtype: torch.dtype, device: torch.device,
                options: LossOptions, cpu_target_rows: int = _CPU_TARGET_ROWS,
                cpu_min_tile: int | None = None) -> ChunkPlan:
    """Rows per chunk and columns per tile for this problem and workspace budget.

    `cpu_target_rows`: the chunk the default CPU budget aims at. The sampling sweeps,
    which keep nothing per chunk but the tile, ask for more rows: every chunk reads all
    of W, and at 128 rows that second read of a 100 MB head costs more than the GEMM's
    plateau gains.

    `cpu_min_tile`: on the CPU, tile the vocabulary down to this many columns before
    shrinking the chunk below what the budget holds of them. Without it a chunk takes
    whole rows, so a 150k vocabulary leaves a 64 MiB budget 110 fp32 rows, and N = 1024
    reads the 545 MB head ten times: its GEMMs took 3.0 s against 1.6 s for one
    1024-row GEMM, or 1.7 s in 1024 x 16384 tiles (2-core AVX-512 host).
    """
    per_element = _bytes_per_tile_element(dtype, options.softcap is not None)
    elements = max(workspace_budget(vocab_size, dtype, device, options, cpu_target_rows) // per_element, 1)
    rows_needed = max(num_rows, 1)
    narrowest = vocab_size
    if cpu_min_tile is not None and device.type == "cpu":
        narrowest = min(vocab_size, cpu_min_tile)
    if elements // narrowest >= min(_MIN_CHUNK_ROWS, rows_needed):
        rows = min(rows_needed, elements // narrowest)
        tile = min(vocab_size, elements // rows)
    else:
        rows = min(rows_needed, _MIN_CHUNK_ROWS)
        tile = max(min(vocab_size, elements // rows), 1)
    return ChunkPlan(rows, tile)


class Workspace:
    """The reused tile buffers of one sweep."""

    def __init__(self, plan: ChunkPlan, dtype: torch.dtype, device: torch.device, softcap: bool):
        cdt = compute_dtype(dtype)
        self.dtype = dtype
        self.tile = torch.empty(plan.rows * plan.tile, dtype=cdt, device=device)
        self.low = torch.empty(plan.rows * plan.tile, dtype=dtype, device=device) if dtype != cdt else None
        self.tanh = torch.empty(plan.rows * plan.tile, dtype=cdt, device=device) if softcap else None

    @staticmethod
    def view(buf: Tensor | None, rows: int, cols: int) -> Tensor | None:
        return None if buf is None else buf[: rows * cols].view(rows, cols)


# --------------------------------------------------------------------------------------
# Tile kernels
# --------------------------------------------------------------------------------------


def logits_tile(ws: Workspace, x_rows: Tensor, weight: Tensor, bias: Tensor | None, v0: int, v1: int,
                 options: LossOptions) -> tuple[Tensor, Tensor | None]:
    """z = softcap(x W[v0:v1].T + b) / T into the workspace; also tanh(u/c) with a softcap."""
    rows, cols = x_rows.shape[0], v1 - v0
    z = ws.view(ws.tile, rows, cols)
    if ws.low is not None and z.is_cuda and CUDA_FP32_OUTPUT_MM:
        # The GEMM writes its fp32 accumulator: no rounding to the input dtype (the
        # triton and cuda backends' logits, where the k > 256 top-k and the truncated
        # sampler's fallbacks come here), and 4 bytes written a logit instead of 2 plus a
        # 2-to-4-byte copy.
        mm_fp32(x_rows, weight[v0:v1].T, z)
    elif ws.low is not None:
        # CPU GEMMs have no bf16-in/fp32-out form: the product is accumulated in fp32
        # inside the GEMM and rounded once to the input dtype, as F.linear does.
        low = ws.view(ws.low, rows, cols)
        torch.mm(x_rows, weight[v0:v1].T, out=low)
        z.copy_(low)
    elif z.device.type == "cpu" and z.dtype == torch.float32:
        # CPU fp32 GEMMs against a wide slice of W ran 1.2-1.8x slower in one call than in
        # 2048-column pieces (2-core AVX-512 host, d=896, 16 to 1024 rows, V=151936);
        # bf16 GEMMs showed no such gap.
        for c0 in range(0, cols, CPU_FP32_GEMM_COLUMNS):
            c1 = min(c0 + CPU_FP32_GEMM_COLUMNS, cols)
            torch.mm(x_rows, weight[v0 + c0 : v0 + c1].T, out=z[:, c0:c1])
    else:
        torch.mm(x_rows, weight[v0:v1].T, out=z)
    if bias is not None:
        z.add_(bias[v0:v1])
    tanh = None
    if options.softcap is not None:
        tanh = ws.view(ws.tanh, rows, cols)
        torch.tanh(z.div_(options.softcap), out=tanh)
        z.copy_(tanh).mul_(options.softcap / options.temperature)
    elif options.temperature != 1.0:
        z.mul_(1.0 / options.temperature)
    return z, tanh


def _gather_tile(z: Tensor, ids: Tensor, v0: int, out: Tensor) -> None:
    """out[r, j] = z[r, ids[r, j] - v0] for the ids that fall in this tile."""
    local = ids - v0
    inside = (local >= 0) & (local < z.shape[1])
    gathered = z.gather(1, local.clamp(0, z.shape[1] - 1))
    out.copy_(torch.where(inside, gathered, out))


def _logits_grad_(tile: Tensor, tanh: Tensor | None, softmax_scale: Tensor, uniform: Tensor | None,
                  slot_coef: Tensor, local_ids: Tensor) -> Tensor:
    """Turn exp-logits in `tile` into dL/du in place.

    `tile` holds exp(z - ref) with `softmax_scale` = row_coef * exp(ref - lse) / T, so
    row_coef * q / T is one multiply; the slot corrections land by scatter; the softcap
    chain rule is 1 - tanh^2.
    """
    tile.mul_(softmax_scale[:, None])
    if uniform is not None:
        tile.sub_(uniform[:, None])
    inside = (local_ids >= 0) & (local_ids < tile.shape[1])
    corrections = torch.where(inside, -slot_coef, 0.0)
    tile.scatter_add_(1, local_ids.clamp(0, tile.shape[1] - 1), corrections)
    if tanh is not None:
        tile.mul_(tanh.square_().neg_().add_(1.0))
    return tile


@dataclass
class Grads:
    """Gradient buffers of one sweep; d_weight accumulates in the compute dtype."""

    input: Tensor | None
    weight: Tensor | None
    bias: Tensor | None
    # d_weight's accumulator holds no value yet: the sweep's first write into it overwrites
    # it (the cuda sweep's first GEMM; `sweep` zeroes it) instead of a zero fill first, a
    # [V, d] fp32 pass (2.2 GB on Qwen2.5-7B's head).
    weight_unwritten: bool = False

    @staticmethod
    def allocate(x: Tensor, weight: Tensor, bias: Tensor | None, need: tuple[bool, bool, bool]) -> "Grads":
        cdt = compute_dtype(x.dtype)
        return Grads(
            torch.zeros_like(x) if need[0] else None,
            torch.empty(weight.shape, dtype=cdt, device=weight.device) if need[1] else None,
            torch.zeros(bias.shape, dtype=cdt, device=bias.device) if (need[2] and bias is not None) else None,
            weight_unwritten=need[1],
        )

    def take(self, scale: Tensor, weight_dtype: torch.dtype, bias_dtype: torch.dtype | None
             ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Hand the buffers over, scaled by the upstream gradient; they are ours to scale in place."""
        grads = []
        for buf, dtype in ((self.input, None), (self.weight, weight_dtype), (self.bias, bias_dtype)):
            if buf is None:
                grads.append(None)
                continue
            if dtype is None or buf.dtype == dtype:
                grads.append(buf.mul_(scale.to(buf.dtype)))
            elif buf.is_cuda:
                # Scaled and rounded in one pass over the fp32 buffer (d_weight's is [V, d]).
                grads.append(torch.mul(buf, scale.to(buf.dtype), out=torch.empty_like(buf, dtype=dtype)))
            else:
                # The CPU's TensorIterator computes a mul into a narrower `out` through a
                # temporary of the inputs' dtype: a second fp32 [V, d] at the step's peak
                # (125 MiB instead of 62 at V=32000, d=512). Scaled in place, then
                # rounded: the same values.
                grads.append(buf.mul_(scale.to(buf.dtype)).to(dtype))
        self.input = self.weight = self.bias = None
        return tuple(grads)


def _backprop_tile(ws: Workspace, du: Tensor, x_rows: Tensor, x_rows_wide: Tensor, weight: Tensor, v0: int,
                   v1: int, input_rows: Tensor | None, grads: Grads, whole_rows: bool) -> None:
    """Push dL/du (compute dtype) of one tile through the linear layer into the gradients.

    `input_rows` receives d_input of the chunk: the gradient buffer itself when one
    GEMM covers the whole vocabulary, else a compute-dtype accumulator. d_weight sums
    over every chunk, so it takes an fp32 GEMM on the fp32 tile and the upcast rows
    (`x_rows_wide`): a low-precision GEMM would round each chunk's partial sum, and
    adding bf16 partials into an fp32 buffer costs more than the fp32 GEMM on CPUs.
    """
    if grads.bias is not None:
        grads.bias[v0:v1] += du.sum(dim=0)
    if grads.weight is not None:
        grads.weight[v0:v1].addmm_(du.T, x_rows_wide)
    if input_rows is None:
        return
    w_tile = weight[v0:v1]
    if ws.low is not None:
        du = ws.view(ws.low, *du.shape).copy_(du)
    if whole_rows:
        torch.mm(du, w_tile, out=input_rows)
    elif ws.low is None:
        input_rows.addmm_(du, w_tile)
    else:
        input_rows += du @ w_tile


# --------------------------------------------------------------------------------------
# Sweeps
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepStats:
    lse: Tensor  # [N]
    slot_logits: Tensor  # [N, K]
    logit_sum: Tensor | None  # [N], only with label smoothing


# (r0, r1, lse rows, slot logits rows, logit sum rows) -> coefficients of those rows,
# already multiplied by each row's upstream weight:
# (row_coef [n], slot_coef [n, K], uniform [n] or None)
CoefFn = Callable[[int, int, Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor, Tensor | None]]


def sweep(x: Tensor, weight: Tensor, bias: Tensor | None, slot_ids: Tensor, options: LossOptions, *,
          stats: SweepStats | None = None, coef_fn: CoefFn | None = None,
          grads: Grads | None = None) -> SweepStats:
    """One pass over the vocabulary for every token chunk.

    Without `stats`, computes them (online log-sum-exp over tiles, logits at
    `slot_ids` [N, K], logit sums). With `coef_fn` and `grads`, also accumulates the gradients of the loss whose
    per-row coefficients `coef_fn` gives; when a chunk's rows fit in one tile the
    logits are built once for both. Given `stats`, only the gradient pass runs.
    """
    num_rows, _ = x.shape
    vocab_size = weight.shape[0]
    cdt = compute_dtype(x.dtype)
    if grads is not None and grads.weight_unwritten:
        grads.weight.zero_()  # the tiles add into it
        grads.weight_unwritten = False
    plan = plan_chunks(num_rows, vocab_size, x.dtype, x.device, options)
    whole_rows = plan.tile == vocab_size
    ws = Workspace(plan, x.dtype, x.device, options.softcap is not None)
    smoothing = bool(options.label_smoothing)
    if stats is None:
        lse = torch.empty(num_rows, dtype=cdt, device=x.device)
        slot_logits = torch.zeros(slot_ids.shape, dtype=cdt, device=x.device)
        logit_sum = torch.zeros(num_rows, dtype=cdt, device=x.device) if smoothing else None
        stats = SweepStats(lse, slot_logits, logit_sum)
        need_stats = True
    else:
        need_stats = False
    for r0 in range(0, num_rows, plan.rows):
        r1 = min(r0 + plan.rows, num_rows)
        x_rows, ids = x[r0:r1], slot_ids[r0:r1]
        exp_ref = None  # the tile still holds exp(z - exp_ref) of a whole row
        if need_stats:
            row_max = torch.full((r1 - r0,), -math.inf, dtype=cdt, device=x.device)
            row_sum = torch.zeros(r1 - r0, dtype=cdt, device=x.device)
            for v0 in range(0, vocab_size, plan.tile):
                v1 = min(v0 + plan.tile, vocab_size)
                z, tanh = logits_tile(ws, x_rows, weight, bias, v0, v1, options)
                _gather_tile(z, ids, v0, stats.slot_logits[r0:r1])
                if smoothing:
                    stats.logit_sum[r0:r1] += z.sum(dim=1)
                tile_max = z.amax(dim=1)
                new_max = torch.maximum(row_max, tile_max)
                # Rows that have seen only -inf (ids masked by the bias) shift by 0, not -inf.
                shift = torch.where(new_max == -math.inf, 0.0, new_max)
                row_sum = row_sum * (row_max - shift).exp() + z.sub_(shift[:, None]).exp_().sum(dim=1)
                row_max = new_max
            stats.lse[r0:r1] = shift + row_sum.log()
            if whole_rows:
                exp_ref = shift
        if coef_fn is None:
            continue
        lse_rows = stats.lse[r0:r1]
        row_coef, slot_coef, uniform = coef_fn(
            r0, r1, lse_rows, stats.slot_logits[r0:r1], None if stats.logit_sum is None else stats.logit_sum[r0:r1]
        )
        inv_t = 1.0 / options.temperature
        if uniform is not None:
            uniform = uniform * inv_t
        slot_coef = slot_coef * inv_t
        x_rows_wide = x_rows.to(cdt) if grads.weight is not None else None
        input_rows = None
        if grads.input is not None:
            input_rows = grads.input[r0:r1]
            if not whole_rows and ws.low is not None:
                # Partial products over vocabulary tiles are summed in fp32, rounded once.
                input_rows = torch.zeros(input_rows.shape, dtype=cdt, device=x.device)
        for v0 in range(0, vocab_size, plan.tile):
            v1 = min(v0 + plan.tile, vocab_size)
            if exp_ref is not None:
                ref = exp_ref
            else:
                z, tanh = logits_tile(ws, x_rows, weight, bias, v0, v1, options)
                z.sub_(lse_rows[:, None]).exp_()
                ref = lse_rows
            scale = row_coef * (ref - lse_rows).exp() * inv_t
            du = _logits_grad_(z, tanh, scale, uniform, slot_coef, ids - v0)
            _backprop_tile(ws, du, x_rows, x_rows_wide, weight, v0, v1, input_rows, grads, whole_rows)
        if input_rows is not None and input_rows.dtype != grads.input.dtype:
            grads.input[r0:r1] = input_rows
    return stats


@dataclass(frozen=True)
class TermsCoefFn:
    """Coefficients of the linear_cross_entropy loss, scaled per row by `upstream` [N];
    `sink` receives each chunk's `RowTerms` (the loss). A `CoefFn`; a backend that
    computes the coefficients on the device (the cuda backend's one-pass epilogue) reads
    its fields instead, and still calls it for the sink."""

    slots: Slots
    options: LossOptions
    vocab_size: int
    upstream: Tensor
    sink: Callable[[int, int, RowTerms], None] | None = None

    def __call__(self, r0: int, r1: int, lse: Tensor, slot_logits: Tensor, logit_sum: Tensor | None
                 ) -> tuple[Tensor, Tensor, Tensor | None]:
        terms = row_terms(lse, slot_logits, logit_sum, self.slots.rows(r0, r1), self.options, self.vocab_size)
        if self.sink is not None:
            self.sink(r0, r1, terms)
        g = self.upstream[r0:r1]
        uniform = None if terms.uniform is None else terms.uniform * g
        return terms.row_coef * g, terms.slot_coef * g[:, None], uniform


def precomputed_coef_fn(row_coef: Tensor, slot_coef: Tensor, uniform: Tensor | None) -> CoefFn:
    """Coefficients known for every row before the sweep (backward, distil_loss)."""

    def coef_fn(r0, r1, lse, slot_logits, logit_sum):
        return row_coef[r0:r1], slot_coef[r0:r1], None if uniform is None else uniform[r0:r1]

    return coef_fn


# --------------------------------------------------------------------------------------
# Autograd Function
# --------------------------------------------------------------------------------------


SweepFn = Callable[..., SweepStats]  # `sweep`'s signature


@dataclass(frozen=True)
class ChunkedParams:
    options: LossOptions
    num_target: int
    # Produce the gradients in the forward (a scalar loss whose inputs need gradients,
    # decided outside the Function: grad mode is off inside `forward`).
    eager: bool
    # The pass over the chunks: `sweep`, or the cuda backend's (same contract, fused
    # CUDA epilogue), so both share this Function.
    sweep_fn: SweepFn = sweep


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Loss of 2-D `x` against `Slots`; outputs (loss, lse, token_loss, target_logprobs)."""

    @staticmethod
    def forward(ctx, x, weight, bias, slot_ids, slot_weights, slot_valid, params: ChunkedParams):
        options = params.options
        slots = Slots(slot_ids, slot_weights, slot_valid, params.num_target)
        vocab_size = weight.shape[0]
        cdt = compute_dtype(x.dtype)
        row_valid = slots.row_valid
        need = ctx.needs_input_grad[:3]
        token_loss = torch.zeros(x.shape[0], dtype=cdt, device=x.device)
        logq = torch.zeros(slots.ids.shape[0], params.num_target, dtype=cdt, device=x.device)

        def keep(r0, r1, terms: RowTerms):
            token_loss[r0:r1] = terms.token_loss
            logq[r0:r1] = terms.target_logprobs

        grads = None
        if params.eager and any(need):
            grads = Grads.allocate(x, weight, bias, need)
            upstream = row_weights(row_valid, options.reduction, cdt)
            stats = params.sweep_fn(x, weight, bias, slots.ids, options,
                                    coef_fn=TermsCoefFn(slots, options, vocab_size, upstream, sink=keep), grads=grads)
        else:
            stats = params.sweep_fn(x, weight, bias, slots.ids, options)
            terms = row_terms(stats.lse, stats.slot_logits, stats.logit_sum, slots, options, vocab_size)
            keep(0, x.shape[0], terms)
        loss = reduce_loss(token_loss, row_valid, options.reduction)

        if options.reduction == "none":
            token_loss = token_loss.clone()  # the loss itself is the differentiable output

        ctx.params = params
        ctx.grads = grads
        ctx.grad_dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(x, weight, bias, slot_ids, slot_weights, slot_valid,
                              stats.lse, stats.slot_logits, stats.logit_sum)
        ctx.mark_non_differentiable(stats.lse, token_loss, logq)
        return loss, stats.lse, token_loss, logq

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse, _grad_token_loss, _grad_logq):
        x, weight, bias, slot_ids, slot_weights, slot_valid, lse, slot_logits, logit_sum = ctx.saved_tensors
        params = ctx.params
        if ctx.grads is not None:
            grads, ctx.grads = ctx.grads, None
            d_x, d_w, d_b = grads.take(grad_loss, *ctx.grad_dtypes)
            return d_x, d_w, d_b, None, None, None, None
        # No gradients from the forward (reduction="none", or a second backward through
        # a retained graph): recompute them from the saved statistics.
        options = params.options
        slots = Slots(slot_ids, slot_weights, slot_valid, params.num_target)
        cdt = compute_dtype(x.dtype)
        upstream = row_upstream(grad_loss, slots.row_valid, options.reduction, cdt)
        need = ctx.needs_input_grad[:3]
        grads = Grads.allocate(x, weight, bias, need)
        params.sweep_fn(x, weight, bias, slots.ids, options, stats=SweepStats(lse, slot_logits, logit_sum),
                        coef_fn=TermsCoefFn(slots, options, weight.shape[0], upstream), grads=grads)
        one = torch.ones((), dtype=cdt, device=x.device)
        d_x, d_w, d_b = grads.take(one, *ctx.grad_dtypes)
        return d_x, d_w, d_b, None, None, None, None


def chunked_gradients(x: Tensor, weight: Tensor, bias: Tensor | None, slot_ids: Tensor, stats: SweepStats,
                      row_coef: Tensor, slot_coef: Tensor, uniform: Tensor | None, options: LossOptions,
                      need: tuple[bool, bool, bool], sweep_fn: SweepFn = sweep
                      ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """One gradient sweep for per-row coefficients already scaled by the upstream gradient."""
    cdt = compute_dtype(x.dtype)
    grads = Grads.allocate(x, weight, bias, need)
    sweep_fn(x, weight, bias, slot_ids, options, stats=stats, coef_fn=precomputed_coef_fn(row_coef, slot_coef, uniform),
             grads=grads)
    return grads.take(torch.ones((), dtype=cdt, device=x.device), weight.dtype, None if bias is None else bias.dtype)


def chunked_linear_cross_entropy(x: Tensor, weight: Tensor, bias: Tensor | None, slots: Slots,
                                 options: LossOptions, sweep_fn: SweepFn = sweep) -> tuple[Tensor, LossStats]:
    """Loss (in the compute dtype) and stats of 2-D `x` [N, d] by the chunked backend (or,
    with the cuda backend's `sweep_fn`, by that one)."""
    needs_grad = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    eager = options.reduction != "none" and needs_grad and torch.is_grad_enabled()
    params = ChunkedParams(options, slots.num_target, eager, sweep_fn)
    loss, lse, token_loss, logq = ChunkedLinearCrossEntropy.apply(
        x, weight, bias, slots.ids, slots.weights, slots.valid, params
    )
    return loss, LossStats(lse.float(), token_loss.float(), logq.float())

