"""The triton backend under Triton's CPU interpreter, against the float64 reference.

Triton decides at import whether kernels are interpreted, so these tests run in their
own pytest process with TRITON_INTERPRET=1 (`make test` does both runs). The
interpreter's bf16 `tl.dot` is unreliable, so inputs are fp32 and fp16; kernels use
32x64 tiles here, so small odd shapes still cover many tiles, splits and masked edges.
"""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs under TRITON_INTERPRET=1 (make test runs it)", allow_module_level=True)
pytest.importorskip("triton", minversion="3.2")

from distil_kernels import SparseTarget, linear_cross_entropy  # noqa: E402
from distil_kernels.loss.options import LossOptions  # noqa: E402
from distil_kernels.loss.targets import make_slots, row_terms, row_weights  # noqa: E402
from distil_kernels.loss.triton import triton_stats  # noqa: E402
from distil_kernels.loss.triton.backward import backward, plan_backward, slot_corrections  # noqa: E402
from distil_kernels.loss.triton.configs import GRADIENT_DEFAULT_SM90, INTERPRETER_CONFIG, TileConfig  # noqa: E402
from loss_problems import (  # noqa: E402
    assert_fp16_gradient_keeps_its_small_values,
    assert_masked_problem_matches,
    assert_within_dtype_error,
    fp16_small_gradient_problem,
    make_distil_problem,
    make_problem,
    run,
    run_distil,
    same_dtype_pytorch,
)
from test_memory import gradient_bytes, track  # noqa: E402

pytestmark = pytest.mark.interpreter

OPTION_GRID = [
    dict(tail=tail, label_smoothing=ls, temperature=t, softcap=sc, z_loss=zl, reduction=red)
    for tail, ls, t, sc, zl, red in itertools.product(
        ["bucket", "renormalize", "ignore"], [0.0, 0.1], [1.0, 0.7], [None, 4.0], [0.0, 1e-3], ["mean", "none"]
    )
    if (ls, t, sc, zl) in {(0.0, 1.0, None, 0.0), (0.1, 0.7, 4.0, 1e-3), (0.1, 1.0, None, 0.0), (0.0, 0.7, 4.0, 0.0)}
]


@pytest.mark.parametrize("options", OPTION_GRID, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("kind", ["hard", "sparse"])
def test_options_fp32(options, kind):
    k = None if kind == "hard" else 5
    x64, w64, b64, target = make_problem(37, 24, 75, k=k, seed=11, ignore_rows=(3,),
                                         pad_slots=() if k is None else ((5, 1), (5, 4)))
    want = run(x64, w64, b64, target, "torch", **options)
    x, w, b = x64.float(), w64.float(), b64.float()
    got = run(x, w, b, target, "triton", **options)
    assert_within_dtype_error(got, same_dtype_pytorch(x, w, b, target, LossOptions(**options)), want)
    # fp32 stats of magnitude below 16 (an ulp there is 9.5e-7): a few ulps of the d=24
    # dot products and of the log-sum-exp they feed.
    for name in ("lse", "token_loss", "target_logprobs"):
        torch.testing.assert_close(getattr(got[1], name).double(), getattr(want[1], name).double(),
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["hard", "sparse"])
def test_odd_shapes(dtype, kind):
    """N=252, V=507, d=123: nothing a multiple of the interpreter's 32x64x32 tiles."""
    k = None if kind == "hard" else 6
    x64, w64, b64, target = make_problem(252, 123, 507, k=k, seed=12, ignore_rows=(0, 251), scale=2.0)
    options = dict(label_smoothing=0.05, softcap=8.0, temperature=0.9, z_loss=1e-4)
    want = run(x64, w64, b64, target, "torch", **options)
    x, w, b = x64.to(dtype), w64.to(dtype), b64.to(dtype)
    got = run(x, w, b, target, "triton", **options)
    assert_within_dtype_error(got, same_dtype_pytorch(x, w, b, target, LossOptions(**options)), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("mode", ["default", "filter", "deterministic"])
def test_d_weight_in_vocabulary_chunks(dtype, mode):
    """A 4 KiB workspace: the vocabulary pass in chunks of one 64-column tile of V=300 (the
    last one partial) over 32-row token chunks, d_weight summing them in fp32, sparse ids
    falling in every chunk; d_input (70 x 40 fp32 would be 11 KiB) in a pass of its own
    over token chunks of 32 rows. The reference's results within the dtype's error."""
    x64, w64, b64, target = make_problem(70, 40, 300, k=5, seed=19, ignore_rows=(2,), scale=2.0)
    options = dict(softcap=6.0, workspace_bytes=4096, filter_eps=1e-7 if mode == "filter" else None)
    want = run(x64, w64, b64, target, "torch", softcap=6.0)
    x, w, b = x64.to(dtype), w64.to(dtype), b64.to(dtype)
    torch.use_deterministic_algorithms(mode == "deterministic")
    try:
        got = run(x, w, b, target, "triton", **options)
    finally:
        torch.use_deterministic_algorithms(False)
    assert_within_dtype_error(got, same_dtype_pytorch(x, w, b, target, LossOptions(softcap=6.0)), want)


@pytest.mark.parametrize("workspace_bytes", [None, 16 * 1024], ids=["one-pass", "two-passes"])
def test_fp16_gradient_keeps_its_small_values(workspace_bytes):
    """The fp16 logits gradient is written times a power of two, which its GEMMs take back:
    see `assert_fp16_gradient_keeps_its_small_values`."""
    x, w, b, y = fp16_small_gradient_problem(rows=256, vocab=2048)  # dL/du ~ 2e-6
    got = run(x, w, b, y, "triton", workspace_bytes=workspace_bytes)
    assert_fp16_gradient_keeps_its_small_values(got[2], x, w, b, y, upstream=0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["hard", "sparse"])
def test_ids_masked_by_the_bias(dtype, kind):
    """V=301 in 64-column tiles: the first two tiles of every row, and the splits made of
    them, are all -inf; they add nothing to the log-sum-exp."""
    assert_masked_problem_matches("triton", kind, dtype)


@pytest.mark.parametrize("workspace_bytes", [None, 4096], ids=["one-launch", "64-row-token-chunks"])
def test_no_bias_and_partial_requires_grad(workspace_bytes):
    """A frozen head: d_input alone, in one launch or (4 KiB of workspace) over token chunks."""
    x64, w64, _, target = make_problem(70, 16, 40, k=3, seed=13, bias=False)
    x, w = x64.float(), w64.float()
    xg = x.clone().requires_grad_()
    linear_cross_entropy(xg, w, target, backend="triton", workspace_bytes=workspace_bytes).backward()
    want = run(x64, w64, None, target, "torch", grad_out=torch.tensor(1.0, dtype=torch.float64))
    # fp32 against float64: |d_input| < 0.1 (an ulp of 7.5e-9) summed over V=40 logits.
    torch.testing.assert_close(xg.grad.double(), want[2][0], rtol=1e-5, atol=1e-7)


def test_backward_plan_bounds_its_memory():
    """Qwen2.5-7B's head at N=16384, bf16: d_input's fp32 [N, d] (224 MiB) does not fit
    the 56 MiB workspace (issue 3 allows 64 MiB of overhead), so it sums in the gradient
    outputs: the vocabulary pass holds 1792 columns of every row, and d_weight's rows
    from 135680 on (the last N = 16384 rounded down to a tile) come after. For d_input
    alone, or d not a multiple of 16, or fp32, or N > V, d_input takes a pass of its own
    over 2048-row chunks with 7168-column gradient blocks. At N=1024, or with a larger
    workspace, d_input's sum rides along in the workspace. fp16 sums d_weight in fp32; so
    does a token count whose rows of one tile exceed the budget."""
    need, cfg, v, d = (True, True, False), GRADIENT_DEFAULT_SM90, 152064, 3584
    budget = 56 * 2**20
    large = plan_backward(16384, v, d, torch.bfloat16, need, cfg, None)
    assert large.dx_rides_along and large.dx_in_outputs and not large.dw_accumulator
    assert (large.head_rows, large.head_cols, large.dx_rows, large.dw_deferred_from) == (16384, 1792, 0, 135680)
    assert large.workspace_bytes(16384, d, 2) <= budget
    for args in [(16384, v, d, torch.bfloat16, (True, False, False)), (16384, v, d - 8, torch.bfloat16, need),
                 (16384, 8192, d, torch.bfloat16, need)]:
        own_pass = plan_backward(*args, cfg, None)
        assert not own_pass.dx_in_outputs and own_pass.dx_rows > 0 and own_pass.workspace_bytes(16384, d, 2) <= budget
    own_pass = plan_backward(16384, v, d, torch.bfloat16, (True, False, False), cfg, None)
    assert (own_pass.dx_rows, own_pass.dx_cols) == (2048, 7168)
    fp32 = plan_backward(16384, v, d, torch.float32, need, cfg, None)
    assert not fp32.dx_in_outputs and fp32.dx_rows > 0 and fp32.workspace_bytes(16384, d, 4) <= budget
    small = plan_backward(1024, v, d, torch.bfloat16, need, cfg, None)
    assert small.dx_rides_along and small.dx_rows == 0 and small.workspace_bytes(1024, d, 2) <= budget
    assert plan_backward(16384, v, d, torch.bfloat16, need, cfg, 2**30).dx_rides_along
    fp16 = plan_backward(16384, v, d, torch.float16, need, cfg, None)
    assert fp16.dw_accumulator and fp16.head_rows == 16384 and fp16.workspace_bytes(16384, d, 2) <= budget
    huge = plan_backward(2**20, v, d, torch.bfloat16, (False, True, False), cfg, None)
    assert huge.dw_accumulator and huge.head_rows < 2**20 and huge.workspace_bytes(2**20, d, 2) <= budget


def test_slot_corrections_list_each_tile_in_row_and_slot_order():
    """The entries of tile t are those of its row block and vocabulary tile, rows ascending
    and, within a row, slots in order (a repeated id subtracts in a fixed order)."""
    config = TileConfig(4, 8, 16, num_warps=1, num_stages=1)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 30, (10, 3), generator=gen)
    ids[2, 1] = ids[2, 0]  # a repeated id
    coefs = torch.rand(10, 3, generator=gen)
    got = slot_corrections(ids, coefs, 30, config)
    assert got.tiles == 4 and got.offsets.shape == (3 * 4 + 1,) and got.offsets[-1] == 30
    for tile in range(12):
        start, end = int(got.offsets[tile]), int(got.offsets[tile + 1])
        want = [(r, j) for r in range(10) for j in range(3)
                if r // 4 == tile // 4 and int(ids[r, j]) // 8 == tile % 4]
        assert got.rows[start:end].tolist() == [r for r, _ in want]
        assert got.ids[start:end].tolist() == [int(ids[r, j]) for r, j in want]
        assert got.coefs[start:end].tolist() == [float(coefs[r, j]) for r, j in want]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_sparse_slots_sharing_ids_and_tiles(dtype):
    """Sparse targets whose slots repeat an id in a row and crowd one tile: every entry of a
    tile is subtracted at its (row, id), over 4 KiB chunks (two passes) and in one."""
    x64, w64, b64, _ = make_problem(40, 16, 200, seed=29, scale=2.0)
    gen = torch.Generator().manual_seed(29)
    ids = torch.randint(0, 200, (40, 6), generator=gen)
    ids[:, 1] = ids[:, 0]  # a repeated id in every row
    ids[:5, 2:] = torch.arange(60, 64)  # rows 0-4: four ids in one 64-column tile
    probs = torch.rand(40, 6, generator=gen, dtype=torch.float64)
    target = SparseTarget(ids, probs / probs.sum(dim=1, keepdim=True))
    options = dict(softcap=5.0, tail="renormalize")  # the bucket tail needs distinct ids
    want = run(x64, w64, b64, target, "torch", **options)
    x, w, b = x64.to(dtype), w64.to(dtype), b64.to(dtype)
    for workspace_bytes in (None, 4096):
        got = run(x, w, b, target, "triton", workspace_bytes=workspace_bytes, **options)
        assert_within_dtype_error(got, same_dtype_pytorch(x, w, b, target, LossOptions(**options)), want)


@pytest.mark.parametrize("workspace_bytes", [48 * 1024, 256 * 1024], ids=["two-passes", "one-pass"])
def test_memory_stays_within_the_backward_workspace(workspace_bytes):
    """Every allocation of forward and backward watched (test_memory.py's tracker): besides
    the gradients, the peak is the backward plan's buffers and accumulators plus O(N k)
    statistics and slot lists, far below one [N, V] fp32 logits tensor (1.2 MB)."""
    n, d, v, k = 200, 48, 1500, 4
    x64, w64, b64, target = make_problem(n, d, v, k=k, seed=31)
    x, w, b = (t.float().requires_grad_() for t in (x64, w64, b64))
    tracker = track(lambda: linear_cross_entropy(x, w, target, bias=b, backend="triton",
                                                 workspace_bytes=workspace_bytes))
    assert tracker.ops.get("backward") and x.grad is not None and w.grad is not None and b.grad is not None
    plan = plan_backward(n, v, d, torch.float32, (True, True, True), INTERPRETER_CONFIG, workspace_bytes)
    assert plan.dx_rides_along == (workspace_bytes == 256 * 1024)
    extra = tracker.peak_bytes - gradient_bytes(x, w, b)
    assert extra <= plan.workspace_bytes(n, d, 4) + n * k * 128, extra
    assert extra < n * v * 4 // 2, extra


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_and_all_ignored(reduction):
    x, w, b, target = make_problem(0, 8, 40, dtype=torch.float32)
    loss = linear_cross_entropy(x.requires_grad_(), w, target, bias=b, backend="triton", reduction=reduction)
    assert loss.shape == ((0,) if reduction == "none" else ())
    x, w, b, target = make_problem(6, 8, 40, k=3, dtype=torch.float32, ignore_rows=range(6))
    loss, _, grads = run(x, w, b, target, "triton", reduction=reduction, label_smoothing=0.1)
    assert not loss.any() and all(not g.any() for g in grads)


def _peaked_problem(n=48, d=32, v=2048, seed=14):
    """Hidden states aligned with their target's row: a confident model, where the target
    logit (32) stands ~10 above every other (32 * cos of random unit vectors in 32-d)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.nn.functional.normalize(torch.randn(v, d, generator=gen), dim=1)
    y = torch.randint(0, v, (n,), generator=gen)
    x = w[y] * 32.0 + 0.1 * torch.randn(n, d, generator=gen)
    return x, w, y


def _direct_backward(x, w, y, options, config=None):
    """Run the backward itself, to see how many tiles it skipped."""
    slots = make_slots(y, w.shape[0], options.ignore_index, torch.float32)
    stats = triton_stats(x, w, None, slots.ids, options)
    terms = row_terms(stats.lse, stats.slot_logits, None, slots, options, w.shape[0])
    g = row_weights(slots.row_valid, "mean", torch.float32)
    return backward(x, w, None, slots.ids, stats.lse, terms.row_coef * g, terms.slot_coef * g[:, None], None,
                    stats.forward, options, (True, True, False), config), terms.row_coef * g


@pytest.mark.parametrize("mode", ["default", "filter", "deterministic"])
def test_two_passes_match_one(mode):
    """With 4 KiB of workspace d_input takes a pass of its own over 16-row token chunks,
    and both passes take chunks of 16x128 tiles: the one-pass result (d_input riding
    along the vocabulary pass on the default tiles), summed in another order."""
    x, w, y = _peaked_problem(n=100, d=16, v=300, seed=23)
    x = x / 8  # a softer softmax: every tile counts
    options = LossOptions(filter_eps=1e-9 if mode == "filter" else None)
    one_pass, _ = _direct_backward(x, w, y, options)
    torch.use_deterministic_algorithms(mode == "deterministic")
    try:
        two_pass, _ = _direct_backward(x, w, y, LossOptions(filter_eps=options.filter_eps, workspace_bytes=4096),
                                       TileConfig(16, 128, 16, num_warps=1, num_stages=1, group_m=2))
    finally:
        torch.use_deterministic_algorithms(False)
    assert two_pass.passes == 2 and one_pass.passes == 1
    torch.testing.assert_close(two_pass.d_input, one_pass.d_input, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(two_pass.d_weight, one_pass.d_weight, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["hard", "sparse"])
def test_input_sum_in_the_outputs_matches_the_reference(kind):
    """fp16 with 8 KiB of workspace: d_input's fp32 sum (N d 4 = 5 KiB) does not fit half of
    it, so its halves sum in d_weight's last N rows and in d_input itself, and d_weight's
    ids from 256 on (the last 40 rounded down to a 64-column tile) are recomputed after
    it is rounded into d_input. Every option; against the float64 reference and against
    the sum held in a workspace large enough for it (an fp16 ulp apart at most: the same
    fp32 sums, grouped by other chunks)."""
    k = None if kind == "hard" else 5
    x64, w64, b64, target = make_problem(40, 32, 300, k=k, seed=41, ignore_rows=(2,), scale=2.0)
    options = dict(softcap=5.0, label_smoothing=0.1, temperature=0.7, z_loss=1e-3)
    want = run(x64, w64, b64, target, "torch", **options)
    x, w, b = x64.half(), w64.half(), b64.half()
    plan = plan_backward(40, 300, 32, torch.float16, (True, True, True), INTERPRETER_CONFIG, 8192)
    assert plan.dx_in_outputs and plan.dw_deferred_from == 256 and plan.dx_rows == 0
    got = run(x, w, b, target, "triton", workspace_bytes=8192, **options)
    # PyTorch's fp16 error here is smaller than the inputs' rounding alone by luck (its
    # rounded logits cancel some of it): the float64 run on the rounded inputs counts too.
    rounded = run(x.double(), w.double(), b.double(), target, "torch", **options)
    assert_within_dtype_error(got, same_dtype_pytorch(x, w, b, target, LossOptions(**options)), want,
                              rounded_inputs=rounded)
    in_workspace = run(x, w, b, target, "triton", workspace_bytes=2**20, **options)
    for grad, other in zip(got[2], in_workspace[2]):
        torch.testing.assert_close(grad, other, rtol=2**-10, atol=2**-24)


def test_input_sum_in_the_outputs_recomputes_only_the_deferred_rows():
    """The direct backward: one pass over the vocabulary, then the deferred ids' tiles
    (300 - 192 = 108 ids) once more; d_input and d_weight are those of the sum held in a
    1 MiB workspace (one pass, no tile twice) to an fp16 ulp."""
    x, w, y = _peaked_problem(n=100, d=32, v=300, seed=43)
    x, w = (x / 8).half(), w.half()
    in_outputs, _ = _direct_backward(x, w, y, LossOptions(workspace_bytes=16 * 1024))
    in_workspace, _ = _direct_backward(x, w, y, LossOptions(workspace_bytes=2**20))
    row_blocks = math.ceil(100 / INTERPRETER_CONFIG.block_m)
    assert in_outputs.passes == 1 and in_outputs.deferred_cols == 108
    assert in_outputs.total_tiles == row_blocks * (math.ceil(300 / 64) + math.ceil(108 / 64))
    assert in_workspace.deferred_cols == 0 and in_workspace.total_tiles == row_blocks * math.ceil(300 / 64)
    torch.testing.assert_close(in_outputs.d_input, in_workspace.d_input, rtol=2**-10, atol=2**-24)
    torch.testing.assert_close(in_outputs.d_weight, in_workspace.d_weight, rtol=2**-10, atol=2**-24)


@pytest.mark.parametrize("workspace_bytes", [48 * 1024, 2**20], ids=["in-outputs", "in-workspace"])
def test_input_sum_in_the_outputs_allocates_no_fp32_copy(workspace_bytes):
    """Every allocation watched: with 48 KiB of workspace the fp16 backward allocates no fp32
    [N, d] for d_input's sum (it lives in the gradients); with 1 MiB it does (the tracker
    would see one). (The CPU's fp32 copies of x for its GEMMs are other ops.)"""
    n, d, v = 200, 48, 1500
    x64, w64, _, target = make_problem(n, d, v, seed=47, bias=False)
    x, w = (t.half().requires_grad_() for t in (x64, w64))
    tracker = track(lambda: linear_cross_entropy(x, w, target, backend="triton", workspace_bytes=workspace_bytes))
    assert x.grad is not None and w.grad is not None
    plan = plan_backward(n, v, d, torch.float16, (True, True, False), INTERPRETER_CONFIG, workspace_bytes)
    assert plan.dx_in_outputs == (workspace_bytes == 48 * 1024)
    fp32_sums = [a for a in tracker.allocations if a.phase == "backward" and a.shape == (n, d) and "empty" in a.op
                 and a.dtype == torch.float32]
    assert bool(fp32_sums) == (not plan.dx_in_outputs), fp32_sums


def _tiles_holding_targets(y):
    block_m, block_n = INTERPRETER_CONFIG.block_m, INTERPRETER_CONFIG.block_n
    return {(r // block_m, int(t) // block_n) for r, t in enumerate(y)}


@pytest.mark.parametrize("workspace_bytes", [None, 4096], ids=["one-launch", "64-row-chunks"])
def test_filter_skips_tiles_within_what_filter_eps_implies(workspace_bytes):
    x, w, y = _peaked_problem()
    exact, _ = _direct_backward(x, w, y, LossOptions())
    assert int(exact.skipped_tiles) == 0
    eps = 1e-3
    filtered, coef = _direct_backward(x, w, y, LossOptions(filter_eps=eps, workspace_bytes=workspace_bytes))
    # So peaked that every tile without a target is below eps: all of them are skipped,
    # in each pass (with 4 KiB of workspace, d_input takes a pass of its own).
    assert filtered.passes == (1 if workspace_bytes is None else 2)
    assert int(filtered.skipped_tiles) == filtered.total_tiles - filtered.passes * len(_tiles_holding_targets(y))
    # Every dropped logit gradient is coef * q with q < eps, so the change in d_input[n]
    # is at most eps * |coef_n| * sum_v |W_v| and in d_weight[v] at most eps * sum_n |coef_n x_n|.
    bound_x = eps * coef.abs()[:, None] * w.abs().sum(dim=0)[None, :]
    bound_w = eps * (coef.abs()[:, None] * x.abs()).sum(dim=0)[None, :].expand_as(w)
    assert ((filtered.d_input - exact.d_input).abs() <= bound_x + 1e-6).all()
    assert ((filtered.d_weight - exact.d_weight).abs() <= bound_w + 1e-6).all()
    assert (filtered.d_input - exact.d_input).abs().max() > 0  # something was really dropped


def test_filter_never_skips_a_tile_holding_a_target():
    x, w, y = _peaked_problem(n=32, v=256)
    # filter_eps near 1 would skip every tile; the ones holding a target must survive.
    result, _ = _direct_backward(x, w, y, LossOptions(filter_eps=0.999))
    assert int(result.skipped_tiles) == result.total_tiles - len(_tiles_holding_targets(y))
    exact, _ = _direct_backward(x, w, y, LossOptions())
    torch.testing.assert_close(result.d_weight[y], exact.d_weight[y], rtol=1e-6, atol=1e-7)


def _filtered_gradient_change(x, w, y, eps, **options):
    """(d_input, d_weight) with filter_eps = eps minus those without, through
    linear_cross_entropy (mean: every row's coefficient is 1/N), after asserting each
    within what dropping logit gradients of at most eps / N allows."""
    grads = {}
    for filter_eps in (None, eps):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        linear_cross_entropy(xg, wg, y, backend="triton", filter_eps=filter_eps, **options).backward()
        grads[filter_eps] = (xg.grad, wg.grad)
    n = x.shape[0]
    change_x, change_w = (grads[eps][i] - grads[None][i] for i in (0, 1))
    assert (change_x.abs() <= eps / n * w.abs().sum(dim=0) + 1e-7).all()
    assert (change_w.abs() <= eps / n * x.abs().sum(dim=0) + 1e-7).all()
    return change_x, change_w


def test_public_filter_eps_on_peaked_case():
    x, w, y = _peaked_problem()
    _filtered_gradient_change(x, w, y, 1e-3)


@pytest.mark.parametrize("label_smoothing", [0.1, 0.01])
def test_filter_with_label_smoothing_drops_nothing_above_filter_eps(label_smoothing):
    """A skipped tile is written as zeros, which also drops label smoothing's -eps_ls / V on
    each of its logits. With eps_ls / V = 4.9e-5 above filter_eps = 1e-5 that is more than
    the filter may drop (it once was: d_weight off by twice the bound), so nothing is
    skipped; with 4.9e-6 below it the tiles are skipped within the same bound (a dropped
    logit gradient is q / N - eps_ls / V / N, both terms in [0, eps / N])."""
    x, w, y = _peaked_problem()
    eps = 1e-5
    _, change_w = _filtered_gradient_change(x, w, y, eps, label_smoothing=label_smoothing)
    dropped = change_w.abs().max()
    assert (dropped == 0) if label_smoothing / w.shape[0] >= eps else (dropped > 0)


def test_filtered_gradient_pass_takes_the_given_lse():
    """The op-level gradient pass (vocabulary shards, compiled backward) recomputes the
    statistics for the filter's per-block maxima; the lse it must use is the one it was
    given: a shard's global lse, here its own plus log 2 (another shard of equal mass)."""
    from distil_kernels.library import _gradients

    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 16, generator=gen), torch.randn(128, 16, generator=gen)
    ids = torch.randint(0, 128, (8, 1), generator=gen)
    local = triton_stats(x, w, None, ids, LossOptions())
    lse = local.lse + math.log(2.0)
    grads = {eps: _gradients("triton", x, w, None, ids, lse, local.slot_logits, None, torch.ones(8),
                             torch.ones(8, 1), None, LossOptions(filter_eps=eps), (True, True, False))
             for eps in (None, 1e-9)}
    for exact, filtered in zip(grads[None][:2], grads[1e-9][:2]):
        torch.testing.assert_close(filtered, exact, rtol=1e-6, atol=1e-7)


def test_deterministic_mode_is_bitwise_reproducible():
    x64, w64, b64, target = make_problem(40, 20, 100, k=4, seed=15)
    x, w, b = x64.float(), w64.float(), b64.float()
    default = run(x, w, b, target, "triton")
    torch.use_deterministic_algorithms(True)
    try:
        first = run(x, w, b, target, "triton")
        second = run(x, w, b, target, "triton")
    finally:
        torch.use_deterministic_algorithms(False)
    for a, c, d in zip(first[2], second[2], default[2]):
        assert torch.equal(a, c)
        torch.testing.assert_close(a, d, rtol=1e-5, atol=1e-6)


def test_distil_loss_through_triton():
    problem = make_distil_problem(3, 7, 13, 37, 4, seed=16, pad_slots=[(0, 2, 3)])
    kwargs = dict(group=torch.tensor([0, 0, 1]), discount=0.9, future_credit=0.5, softcap=5.0, temperature=0.8)
    reference = run_distil(problem, "torch", torch.float64, **kwargs)
    for got, want in zip(run_distil(problem, "triton", torch.float32, **kwargs), reference):
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-6)


def test_strided_input_rows():
    """Kernels index rows by stride, so a view of a wider buffer needs no copy. (The view
    is the leaf's own: `run` clones its inputs, which would make them contiguous.)"""
    x64, w64, b64, target = make_problem(8, 16, 40, seed=17)
    x, w, b = x64.float(), w64.float(), b64.float()
    wide = torch.zeros(8, 4096)
    wide[:, :16] = x
    wide.requires_grad_()
    rows = wide[:, :16]
    assert rows.stride() == (4096, 1)
    w_leaf, b_leaf = w.clone().requires_grad_(), b.clone().requires_grad_()
    loss, stats = linear_cross_entropy(rows, w_leaf, target, bias=b_leaf, backend="triton", return_stats=True)
    (loss * 0.5).backward()  # `run`'s upstream weight for a scalar loss
    got = (loss.detach(), stats, [wide.grad[:, :16], w_leaf.grad, b_leaf.grad])
    assert not wide.grad[:, 16:].any()
    want = run(x64, w64, b64, target, "torch")
    assert_within_dtype_error(got, same_dtype_pytorch(x, w, b, target, LossOptions()), want)
