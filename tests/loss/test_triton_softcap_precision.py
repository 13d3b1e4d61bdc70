"""The softcap c * tanh(u / c) in the Triton tiles, to fp32 precision at both ends of tanh.

Near u = 0, tanh formed as 1 - 2 / (exp(2y) + 1) has an error of an ulp of 1, not of
tanh, and the logit c tanh(u / c) / T multiplies it by c / T (600 at c = 30, T = 0.05).
Near saturation, the chain factor 1 - tanh^2 of a rounded tanh is a difference of
nearly equal numbers. Each is checked on the tile's own functions over the whole range,
then through linear_topk and linear_cross_entropy where the two ends dominate: logits
near 0 with a large c / T, and a small softcap (0.68) that saturates most logits.

Runs under TRITON_INTERPRET=1, in its own pytest process like tests/loss/test_triton.py.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs under TRITON_INTERPRET=1 (make test runs it)", allow_module_level=True)
pytest.importorskip("triton", minversion="3.2")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from distil_kernels import linear_topk  # noqa: E402
from distil_kernels.loss.options import LossOptions  # noqa: E402
from distil_kernels.loss.triton.tiles import finish_logits, tanh_fp32  # noqa: E402
from distil_kernels.loss.reference import reduce_loss, reference_token_loss  # noqa: E402
from distil_kernels.loss.targets import make_slots  # noqa: E402
from loss_problems import assert_within_dtype_error, make_problem, run  # noqa: E402

pytestmark = pytest.mark.interpreter

FP32_UNIT = 2.0**-24  # fp32's unit roundoff: half the spacing of its numbers at 1


@triton.jit
def _tanh_kernel(y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(out_ptr + offs, tanh_fp32(tl.load(y_ptr + offs, mask=ok, other=0.0)), mask=ok)


@triton.jit
def _finish_logits_kernel(u_ptr, z_ptr, second_ptr, n, softcap, inv_temp, BLOCK: tl.constexpr,
                          SOFTCAP_SLOPE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    u = tl.load(u_ptr + offs, mask=ok, other=0.0)[None, :]
    z, second = finish_logits(u, u_ptr, offs, ok, softcap, inv_temp, False, True, SOFTCAP_SLOPE)
    tl.store(z_ptr + offs[None, :], z, mask=ok[None, :])
    tl.store(second_ptr + offs[None, :], second, mask=ok[None, :])


def _arguments() -> torch.Tensor:
    """fp32 y over [-20, 20] (tanh is +-1 in fp32 from 9.01 on), tiny |y| down to
    subnormals, the polynomial's edge at 0.625 from both sides, and +-0, +-inf."""
    dense = torch.linspace(-20.0, 20.0, 200_001, dtype=torch.float64)
    tiny = torch.logspace(-40.0, 0.0, 4001, dtype=torch.float64)
    specials = torch.tensor([0.0, 0.6249999, 0.625, 0.6250001, float("inf")], dtype=torch.float64)
    y = torch.cat([dense, tiny, specials]).float()
    return torch.cat([y, -y])


def _launch(kernel, y, outputs, *args, **meta):
    kernel[(triton.cdiv(y.numel(), 4096),)](y, *outputs, y.numel(), *args, BLOCK=4096, **meta)


def _fp32_spacing(values: torch.Tensor) -> torch.Tensor:
    """The spacing of fp32 numbers at each |value| (subnormal spacing near 0)."""
    return torch.from_numpy(np.spacing(values.abs().float().numpy())).double()


def test_tanh_is_accurate_to_a_few_ulps_relative():
    """Within 3 ulps of float64's tanh everywhere, tiny |y| included (the old form was
    off by an ulp of 1 there: 2e7 ulps of tanh at y = 1e-7); PyTorch's is within 0.5."""
    y = _arguments()
    got = torch.empty_like(y)
    _launch(_tanh_kernel, y, (got,))
    want = torch.tanh(y.double())
    ulps = (got.double() - want).abs() / _fp32_spacing(want)
    worst = int(ulps.argmax())
    assert ulps.max() <= 3.0, f"tanh({y[worst].item()!r}): {ulps.max().item():.1f} ulps"


@pytest.mark.parametrize(("softcap", "temperature"), [(30.0, 0.05), (0.68, 1.0)])
def test_finish_logits_softcap_and_its_slope(softcap, temperature):
    """z = c tanh(u / c) / T to a few ulps of z, and the chain factor 1 - tanh(u / c)^2
    to a few ulps relative, where 1 - tanh^2 of a rounded tanh is noise by |y| = 8.

    The slope sech^2(y) moves by 2 |y| ulps relative for an ulp of y (the exp of 2|y| is
    that sensitive), so its bound grows with |y|: y is rounded once inside, as u / c."""
    y = _arguments()
    y = y[y.isfinite()]
    u = y * softcap
    z, tanh = torch.empty_like(u), torch.empty_like(u)
    _launch(_finish_logits_kernel, u, (z, tanh), softcap, 1.0 / temperature, SOFTCAP_SLOPE=False)
    z_slope, slope = torch.empty_like(u), torch.empty_like(u)
    _launch(_finish_logits_kernel, u, (z_slope, slope), softcap, 1.0 / temperature, SOFTCAP_SLOPE=True)
    assert torch.equal(z, z_slope)

    y64 = u.double() / softcap
    want_tanh = torch.tanh(y64)
    # tanh to 3 ulps, after the rounding of y = u / c (which moves it by its slope |y| units).
    tanh_bound = 3.0 * _fp32_spacing(want_tanh) + FP32_UNIT * (1.0 - want_tanh**2) * y64.abs()
    assert ((tanh.double() - want_tanh).abs() <= tanh_bound).all()
    # z: that error times c / T, and the roundings of c / T and of the product.
    want_z = softcap * want_tanh / temperature
    z_bound = tanh_bound * softcap / temperature + 2.0 * _fp32_spacing(want_z)
    assert ((z.double() - want_z).abs() <= z_bound).all(), f"z: {(z.double() - want_z).abs().max().item():.3e}"

    want_slope = 1.0 / torch.cosh(y64) ** 2
    live = want_slope > 1e-30  # past |y| = 35 the slope is subnormal (and 0 from |y| = 52)
    relative = ((slope.double() - want_slope).abs() / want_slope)[live]
    slope_bound = 4.0 * FP32_UNIT * (1.0 + 2.0 * y64.abs()[live])
    worst = int((relative / slope_bound).argmax())
    assert (relative <= slope_bound).all(), \
        f"slope at y = {y64[live][worst].item():.6g}: relative error {relative[worst].item():.3e}"
    assert (slope[~live] <= 1e-30).all()


def _dense_log_softmax(x, w, b, softcap, temperature):
    z = softcap * torch.tanh((x.double() @ w.double().T + b.double()) / softcap) / temperature
    return torch.log_softmax(z, dim=1), torch.logsumexp(z, dim=1)


@pytest.mark.parametrize(("softcap", "temperature", "scale"), [(30.0, 0.05, 0.3), (0.68, 1.0, 3.0)],
                         ids=["large-c-over-T", "small-softcap"])
def test_topk_within_fp32_error(softcap, temperature, scale):
    """lse and log-probs within twice PyTorch's own fp32 error (plus 1e-6) of float64.

    Logits u of a few tenths and c / T = 600 (z = 20 u, of order 10): an ulp of 1 in
    tanh near 0 is 4e-5 in z, 30 times an ulp of z. At softcap 0.68 most logits saturate."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(37, 23, generator=gen, dtype=torch.float64) * scale).float()
    w = (torch.randn(507, 23, generator=gen, dtype=torch.float64) / 23**0.5).float()
    b = (torch.randn(507, generator=gen, dtype=torch.float64) * scale).float()
    got = linear_topk(x, w, 5, bias=b, softcap=softcap, temperature=temperature, backend="triton")
    log_q, lse = _dense_log_softmax(x, w, b, softcap, temperature)
    z32 = softcap * torch.tanh((x @ w.T + b) / softcap) / temperature
    torch_error = max(float((torch.log_softmax(z32, dim=1).double() - log_q).abs().max()),
                      float((torch.logsumexp(z32, dim=1).double() - lse).abs().max()))
    tol = 2 * torch_error + 1e-6
    assert float((got.lse.double() - lse).abs().max()) <= tol
    assert float((got.logprobs.double() - log_q.gather(1, got.ids)).abs().max()) <= tol


class _SoftcapWithAccurateSlope(torch.autograd.Function):
    """c tanh(u / c), its backward multiplying by sech^2(u / c) = 1 / cosh^2 in u's dtype.

    PyTorch's own tanh backward forms 1 - tanh^2 of its rounded tanh: an error of an ulp
    of 1, which near saturation is thousands of times the slope's fp32 rounding. As the
    baseline it would hide the same cancellation in a kernel, so the fp32 baseline here
    takes the slope at fp32 precision (cosh overflows to inf past |y| = 89: slope 0).
    """

    @staticmethod
    def forward(ctx, u, softcap):
        ctx.save_for_backward(u)
        ctx.softcap = softcap
        return softcap * torch.tanh(u / softcap)

    @staticmethod
    def backward(ctx, grad):
        (u,) = ctx.saved_tensors
        return grad / torch.cosh(u / ctx.softcap).square(), None


def _same_dtype_baseline(x, w, b, target, options):
    """`loss_problems.same_dtype_pytorch` with `_SoftcapWithAccurateSlope` for the softcap."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    u = F.linear(leaves[0], leaves[1]).float() + leaves[2].float()
    z = _SoftcapWithAccurateSlope.apply(u, options.softcap) / options.temperature
    slots = make_slots(target, w.shape[0], options.ignore_index, torch.float32)
    token_loss, _, _ = reference_token_loss(z, slots, options)
    loss = reduce_loss(token_loss, slots.row_valid, options.reduction)
    grad_out = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    (loss * grad_out).sum().backward()
    return loss.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize(("softcap", "temperature", "scale", "bias_shift"),
                         [(30.0, 0.05, 0.3, 0.0), (0.68, 1.0, 0.1, 4.0)], ids=["large-c-over-T", "small-softcap"])
@pytest.mark.parametrize("kind", ["hard", "sparse"])
def test_gradients_within_fp32_error(softcap, temperature, scale, bias_shift, kind):
    """Loss and gradients within 4x the fp32 baseline's error of float64, at both ends of tanh.

    large-c-over-T: logits of order 1 near u = 0, z = 20 u. small-softcap: a bias pushed
    to |b| > 4 saturates every logit (|u / c| > 5.5, slopes 1e-10 to 6e-5), so the
    gradients are made of the slopes alone."""
    k = None if kind == "hard" else 4
    x64, w64, b64, target = make_problem(45, 24, 301, k=k, seed=21, scale=scale, ignore_rows=(2,))
    b64 = b64 + bias_shift * b64.sign()
    options = dict(softcap=softcap, temperature=temperature)
    want = run(x64, w64, b64, target, "torch", **options)
    x, w, b = x64.float(), w64.float(), b64.float()
    got = run(x, w, b, target, "triton", **options)
    assert_within_dtype_error(got, _same_dtype_baseline(x, w, b, target, LossOptions(**options)), want)
