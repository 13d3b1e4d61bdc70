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

from distil_kernels.loss.cuda import REFERENCE_OPS, extension_ops, in_place_gradient  # noqa: E402
from distil_kernels.loss.options import LossOptions  # noqa: E402
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
    assert_close_in_dtype(grad, want_grad, "grad")
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("kind", ["hard", "sparse"])
def test_backend_in_several_chunks(dtype, kind):
    """1000 rows of a 32007 vocabulary through a 64 MiB workspace: 4 (fp32) or 3 (bf16) chunks."""
    k = None if kind == "hard" else 32
    x64, w64, b64, target = make_problem(1000, 520, 32007, k=k, seed=42, ignore_rows=(3,), scale=4.0)
    x64, w64, b64 = x64.to(CUDA), w64.to(CUDA), b64.to(CUDA)
    target = target.to(CUDA) if isinstance(target, torch.Tensor) else type(target)(target.ids.to(CUDA),
                                                                                    target.probs.to(CUDA))
    options = dict(label_smoothing=0.05, softcap=30.0, workspace_bytes=64 << 20)
    want = run(x64, w64, b64, target, "torch", **options)
    x, w, b = x64.to(dtype), w64.to(dtype), b64.to(dtype)
    got = run(x, w, b, target, "cuda", **options)
    base = same_dtype_pytorch(x, w, b, target, LossOptions(**options))
    rounded = run(x.double(), w.double(), b.double(), target, "torch", **options)
    assert_within_dtype_error(got, base, want, rounded_inputs=rounded)
