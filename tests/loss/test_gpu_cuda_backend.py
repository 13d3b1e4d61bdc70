"""The csrc/ kernels of the `cuda` loss backend on a GPU, against their reference ops.

`distil_kernels.loss.cuda.REFERENCE_OPS` states what `chunk_stats` and `logits_grad`
compute; here the compiled kernels must agree with it on one chunk (fp32 math on both
sides: differences are exp/tanh rounding), and the backend must agree with the float64
loss reference when the rows come in several chunks. Skipped without CUDA or without the
extension.
"""

from __future__ import annotations

import pytest
import torch

from distil_kernels.cuda_ext import extension_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not extension_available(), reason="the csrc/ extension was not built"),
]

import dataclasses  # noqa: E402

from distil_kernels.loss import cuda as cuda_backend  # noqa: E402
from distil_kernels.loss.cuda import (  # noqa: E402
    REFERENCE_OPS,
    extension_ops,
    in_place_gradient,
    reference_logits_grad,
    reference_row_epilogue,
)
from distil_kernels.loss.options import BUCKET_CLAMP, LossOptions  # noqa: E402
from distil_kernels.loss.targets import TargetWeights, weighted_row_terms  # noqa: E402
from loss_problems import assert_within_dtype_error, make_problem, run, same_dtype_pytorch  # noqa: E402

CUDA = torch.device("cuda")


def chunk(rows=37, cols=1000, slots=9, seed=41):
    gen = torch.Generator(device=CUDA).manual_seed(seed)
    logits = torch.randn(rows, cols, generator=gen, device=CUDA) * 8.0
    bias = torch.randn(cols, generator=gen, device=CUDA)
    bias[::97] = -torch.inf  # masked ids: they add nothing to a row's sum
    ids = torch.randint(-3, cols + 500, (rows, slots), generator=gen, device=CUDA)  # some outside the chunk
    ids[:, 1] = ids[:, 0]  # a repeated id: two corrections on one logit
    return logits, bias, ids


def assert_close_in_dtype(got, want, name):
    eps = torch.finfo(want.dtype).eps
    finite = want.float().isfinite()
    assert torch.equal(finite, got.float().isfinite()), name
    scale = want.float()[finite].abs().max().item()
    torch.testing.assert_close(got.float()[finite], want.float()[finite], rtol=4 * eps, atol=8 * eps * scale,
                               msg=lambda m: f"{name}: {m}")


def assert_gradient_close(got, want, logits, bias, softcap, inv_temp, lse, row_coef, uniform, ids, slot_coef, name):
    """dL/du element by element, against the terms that form it: (row_coef exp(z - lse) -
    uniform - sum of the column's slot coefficients) * chain. A bound scaled by the row's
    largest value (assert_close_in_dtype) leaves nearly every softmax value of a 152k-id
    row below its atol: a bf16 gradient 1.5x too large off the slot ids passed it. Here
    each value may differ by two roundings to the output dtype of its terms' magnitude and
    by fp32 error in z (tanh and the products: a few ulps of |z|) and in exp(z - lse)."""
    f64 = torch.float64
    z, tanh = cuda_backend._transform(logits.to(f64), None if bias is None else bias.to(f64), softcap, inv_temp)
    chain = 1.0 if tanh is None else 1.0 - tanh * tanh
    lse = lse.to(f64)[:, None]
    finite_z = z.isfinite()
    softmax = row_coef.to(f64).abs()[:, None] * torch.where(finite_z, (z - lse).exp(), 0.0)
    inside = (ids >= 0) & (ids < logits.shape[1])
    correction = torch.zeros_like(z).scatter_add_(1, ids.clamp(0, logits.shape[1] - 1),
                                                  torch.where(inside, slot_coef.to(f64).abs(), 0.0))
    magnitude = (softmax + (0.0 if uniform is None else uniform.to(f64).abs()[:, None]) + correction) * chain
    out_eps, fp32_eps = torch.finfo(want.dtype).eps, torch.finfo(torch.float32).eps
    z_terms = torch.where(finite_z, 2.0 + z.abs() + (z - lse).abs(), 0.0)
    # Measured on the CPU (fp32 reference op against float64): at most 0.8 of
    # magnitude * (out_eps + fp32_eps * z_terms) at 1000 and 152064 ids, both options.
    tol = magnitude * (2 * out_eps + 8 * fp32_eps * z_terms)
    tol += torch.finfo(want.dtype).smallest_normal * out_eps  # fp16's subnormal spacing
    finite = want.isfinite()
    assert torch.equal(finite, got.isfinite()), name
    error = (got.to(f64) - want.to(f64)).abs()
    worst = (error / tol)[finite].max().item() if finite.any() else 0.0
    assert (error[finite] <= tol[finite]).all(), f"{name}: {worst:.2f} times the bound"


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "apart"])
@pytest.mark.parametrize("softcap", [None, 20.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_kernels_match_the_reference_ops(softcap, out_dtype, in_place):
    """The gradient written over the logits (as the sweep does) or into a buffer of its own."""
    logits, bias, ids = chunk()
    rows, cols = logits.shape
    vocab_start, inv_temp = 100, 1 / 0.9
    row_coef = torch.linspace(0.5, 2.0, rows, device=CUDA)
    uniform = torch.full((rows,), 1e-3, device=CUDA)
    slot_coef = torch.rand(ids.shape, device=CUDA)
    results = []
    lse = None  # the reference's: logits_grad of both sides then starts from the same numbers
    for ops in (REFERENCE_OPS, extension_ops()):
        u = logits.clone()
        slot_logits = torch.full(ids.shape, -7.0, device=CUDA)
        partial = torch.empty(rows, 3, device=CUDA)
        ops.chunk_stats(u, bias, softcap, inv_temp, False, ids, vocab_start, slot_logits, partial)
        assert torch.equal(u, logits), "chunk_stats without write_z leaves u as it was"
        lse = partial[:, 0] + partial[:, 1].log() if lse is None else lse
        over_u = in_place and ops is not REFERENCE_OPS
        out = in_place_gradient(u, out_dtype) if over_u else torch.empty(rows, cols, dtype=out_dtype, device=CUDA)
        ops.logits_grad(u, bias, softcap, inv_temp, row_coef, lse, uniform, ids, slot_coef,
                        torch.empty(ids.shape, device=CUDA), vocab_start, out)
        assert over_u or torch.equal(u, logits), "logits_grad apart from u leaves u as it was"
        z = logits.clone()
        z_slot_logits = slot_logits.clone()
        ops.chunk_stats(z, bias, softcap, inv_temp, True, ids, vocab_start, z_slot_logits, partial.clone())
        assert torch.equal(z_slot_logits, slot_logits), "write_z changes nothing but the chunk"
        results.append((slot_logits, partial, out, z))
    (want_slots, want_partial, want_grad, want_z), (slots, partial, grad, z) = results
    assert_close_in_dtype(slots, want_slots, "slot_logits")
    assert_close_in_dtype(z, want_z, "z")
    assert_gradient_close(grad, want_grad, logits, bias, softcap, inv_temp, lse, row_coef, uniform, ids - vocab_start,
                          slot_coef, "grad")
    # The statistics against what the z differences above allow (each z within
    # 4 eps |z| + 8 eps max|z|): the row max is one of those z; the log-sum-exp moves by
    # at most the largest z difference, plus the sum of exp(z - max) taken in another
    # order with a rounded rescale whenever a thread's max grows (~log2 of the terms'
    # count in ulps: 16 eps relative); the sum of z, by the z differences summed and its
    # own rounding (relative to the sum of |z|; -inf where the bias masks an id, the same
    # infinity on both sides).
    eps = torch.finfo(torch.float32).eps
    finite_z = want_z.isfinite()
    scale = want_z[finite_z].abs().max().item()
    z_error = torch.where(finite_z, 4 * eps * want_z.abs() + 8 * eps * scale, 0.0)
    assert_close_in_dtype(partial[:, 0], want_partial[:, 0], "partial max")
    lse, want_lse = (p[:, 0] + p[:, 1].log() for p in (partial, want_partial))
    assert ((lse - want_lse).abs() <= 12 * eps * scale + 16 * eps).all(), "log-sum-exp"
    finite = want_partial[:, 2].isfinite()
    assert torch.equal(partial[:, 2].isfinite(), finite), "partial z sum"
    assert torch.equal(partial[~finite, 2], want_partial[~finite, 2]), "partial z sum"
    abs_sum = torch.where(finite_z, want_z.abs(), 0.0).sum(dim=1)
    bound = z_error.sum(dim=1) + 16 * eps * abs_sum
    assert ((partial[finite, 2] - want_partial[finite, 2]).abs() <= bound[finite]).all(), "partial z sum"


SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


@pytest.mark.skipif(not SM90, reason="thread-block clusters need sm_90")
@pytest.mark.parametrize("vocab", [1000, 32007, 152064])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", [dict(softcap=20.0, smoothing=0.05, z_loss=1e-3), dict()],
                         ids=["softcap-smoothing-zloss", "plain"])
def test_row_epilogue_matches_its_reference_op(vocab, out_dtype, options):
    """One pass over whole rows (clusters of 1, 2 and 8 blocks; 32007 puts odd rows off
    16-byte boundaries) against `reference_row_epilogue`: the statistics within the
    bounds of the two-pass test above, and the gradient against the reference's
    gradient formed from the kernel's own statistics (so one lse's rounding does not move
    the other's every softmax value)."""
    rows, num_target, plain = 13, 6, 2
    gen = torch.Generator(device=CUDA).manual_seed(43)
    # Logits of a spread that gives no slot most of a row's mass: a bucket's 1 - sum q stays
    # near 1, so its quotient does not amplify fp32 rounding past the tolerance below.
    logits = torch.randn(rows, vocab, generator=gen, device=CUDA) * 3.0
    bias = torch.randn(vocab, generator=gen, device=CUDA)
    if not options:
        bias[::97] = -torch.inf  # masked ids (with smoothing they would make every logit sum -inf)
    ids = torch.randint(0, vocab, (rows, num_target + plain), generator=gen, device=CUDA)
    ids[:, 1] = ids[:, 0]  # a repeated id: two corrections on one logit
    valid = torch.rand(ids.shape, generator=gen, device=CUDA) < 0.85
    valid[2, :num_target] = False  # an ignored row
    ids = torch.where(valid, ids, 0)
    probs = torch.rand(rows, num_target, generator=gen, device=CUDA)
    probs = probs / probs.sum(dim=1, keepdim=True) * 0.8  # a bucket's missing mass
    weight = torch.where(valid, torch.cat([probs, torch.randn(rows, plain, generator=gen, device=CUDA)], dim=1), 0.0)
    rest = (1.0 - weight[:, :num_target].sum(dim=1)).clamp_min(0.0)
    upstream = torch.rand(rows, generator=gen, device=CUDA) / rows
    softcap, smoothing, z_loss = options.get("softcap"), options.get("smoothing", 0.0), options.get("z_loss", 0.0)
    inv_temp = 1 / 0.9
    results = []
    for op in (reference_row_epilogue, extension_ops().row_epilogue):
        u = logits.clone()
        lse = torch.empty(rows, device=CUDA)
        slot_logits = torch.zeros(ids.shape, device=CUDA)
        logit_sum = torch.empty(rows, device=CUDA) if smoothing else None
        grad = in_place_gradient(u, out_dtype)
        op(u, bias, softcap, inv_temp, ids, weight, valid, rest, upstream, num_target, smoothing, z_loss,
           BUCKET_CLAMP, lse, slot_logits, logit_sum, grad)
        results.append((lse, slot_logits, logit_sum, grad.clone()))
    (want_lse, want_slots, want_sum, _), (lse, slots, logit_sum, grad) = results
    # Bounds of the two-pass test above, from the reference's z.
    eps = torch.finfo(torch.float32).eps
    want_z = cuda_backend._transform(logits, bias, softcap, inv_temp)[0]
    finite_z = want_z.isfinite()
    scale = want_z[finite_z].abs().max().item()
    assert_close_in_dtype(slots, want_slots, "slot_logits")
    assert ((lse - want_lse).abs() <= 12 * eps * scale + 16 * eps).all(), "log-sum-exp"
    if smoothing:
        finite = want_sum.isfinite()
        assert torch.equal(logit_sum[~finite], want_sum[~finite]), "logit sum"
        z_error = torch.where(finite_z, 4 * eps * want_z.abs() + 8 * eps * scale, 0.0)
        bound = z_error.sum(dim=1) + 16 * eps * torch.where(finite_z, want_z.abs(), 0.0).sum(dim=1)
        assert ((logit_sum - want_sum)[finite].abs() <= bound[finite]).all(), "logit sum"
    terms = weighted_row_terms(TargetWeights(weight, rest, valid, num_target), lse, slots, logit_sum,
                               LossOptions(label_smoothing=smoothing, z_loss=z_loss), vocab)
    expected = torch.empty(rows, vocab, dtype=out_dtype, device=CUDA)
    uniform = None if terms.uniform is None else terms.uniform * upstream
    reference_logits_grad(logits.clone(), bias, softcap, inv_temp, terms.row_coef * upstream, lse, uniform, ids,
                          terms.slot_coef * upstream[:, None], torch.empty_like(slots), 0, expected)
    assert_close_in_dtype(grad, expected, "grad")
    assert_gradient_close(grad, expected, logits, bias, softcap, inv_temp, lse, terms.row_coef * upstream, uniform, ids,
                          terms.slot_coef * upstream[:, None], "grad")


@pytest.mark.parametrize("epilogue", ["two-pass", "one-pass"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("kind", ["hard", "sparse"])
def test_backend_in_several_chunks(dtype, kind, epilogue, monkeypatch):
    """1000 rows of a 32007 vocabulary through a 64 MiB workspace: 4 (fp32) or 3 (bf16)
    chunks, finished by the two kernels or (sm_90) the one-pass epilogue."""
    monkeypatch.setenv(cuda_backend.EPILOGUE_ENV, epilogue)
    calls = []
    real = extension_ops()

    def counted(*args):
        calls.append(1)
        return real.row_epilogue(*args)

    monkeypatch.setattr(cuda_backend, "extension_ops", lambda: dataclasses.replace(real, row_epilogue=counted))
    k = None if kind == "hard" else 32
    x64, w64, b64, target = make_problem(1000, 520, 32007, k=k, seed=42, ignore_rows=(3,), scale=4.0)
    x64, w64, b64 = x64.to(CUDA), w64.to(CUDA), b64.to(CUDA)
    target = target.to(CUDA) if isinstance(target, torch.Tensor) else type(target)(target.ids.to(CUDA),
                                                                                    target.probs.to(CUDA))
    options = dict(label_smoothing=0.05, softcap=30.0, workspace_bytes=64 << 20)
    want = run(x64, w64, b64, target, "torch", **options)
    x, w, b = x64.to(dtype), w64.to(dtype), b64.to(dtype)
    got = run(x, w, b, target, "cuda", **options)
    assert bool(calls) == (epilogue == "one-pass" and SM90)
    base = same_dtype_pytorch(x, w, b, target, LossOptions(**options))
    rounded = run(x.double(), w.double(), b.double(), target, "torch", **options)
    assert_within_dtype_error(got, base, want, rounded_inputs=rounded)
