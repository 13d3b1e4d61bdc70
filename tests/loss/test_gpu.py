"""The loss backends on a CUDA device, against the float64 reference.

Skipped without CUDA (no device query at import beyond `torch.cuda.is_available`).
bf16 results pass when their error is at most a small multiple of PyTorch's own bf16
error on the same problem.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

from distil_kernels import SparseTarget, distil_loss, linear_cross_entropy  # noqa: E402
from distil_kernels.cuda_ext import extension_available  # noqa: E402
from distil_kernels.loss.options import LossOptions  # noqa: E402
from loss_problems import assert_within_dtype_error, make_problem, max_error, run, same_dtype_pytorch  # noqa: E402

CUDA = torch.device("cuda")


def on_cuda(x, w, b, target):
    moved = SparseTarget(target.ids.to(CUDA), target.probs.to(CUDA)) if isinstance(target, SparseTarget) \
        else target.to(CUDA)
    return x.to(CUDA), w.to(CUDA), None if b is None else b.to(CUDA), moved


def cpu64(result):
    loss, stats, grads = result
    return loss.double().cpu(), stats, [None if g is None else g.double().cpu() for g in grads]


CUDA_BACKEND = pytest.param("cuda", marks=pytest.mark.skipif(not extension_available(),
                                                             reason="the csrc/ extension was not built"))


def assert_matches_reference(x64, w64, b64, target, dtype, backend, workspace_bytes=None, **options):
    """`backend` on the float64 problem rounded to `dtype`, against the float64 reference:
    within a small multiple of PyTorch's same-dtype error or of the inputs' rounding alone."""
    want = cpu64(run(x64, w64, b64, target, "torch", **options))
    x, w, b = x64.to(dtype), w64.to(dtype), b64.to(dtype)
    got = cpu64(run(x, w, b, target, backend, workspace_bytes=workspace_bytes, **options))
    base = same_dtype_pytorch(x, w, b, target, LossOptions(**options))
    base = (base[0].double().cpu(), [None if g is None else g.double().cpu() for g in base[1]])
    rounded = cpu64(run(x.double(), w.double(), b.double(), target, "torch", **options))
    assert_within_dtype_error(got, base, want, rounded_inputs=rounded)


@pytest.mark.parametrize("backend", ["triton", "chunked", CUDA_BACKEND])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("kind", ["hard", "sparse"])
@pytest.mark.parametrize("options", [
    dict(),
    dict(label_smoothing=0.1, softcap=30.0, z_loss=1e-4, temperature=0.9),
    dict(tail="renormalize", reduction="sum"),
    dict(tail="ignore", reduction="none"),
], ids=["plain", "all-options", "renormalize-sum", "ignore-none"])
def test_matches_reference(backend, dtype, kind, options):
    k = None if kind == "hard" else 32
    x64, w64, b64, target = on_cuda(*make_problem(1000, 520, 32007, k=k, seed=21, ignore_rows=(3, 999), scale=4.0))
    assert_matches_reference(x64, w64, b64, target, dtype, backend, **options)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("kind", ["hard", "sparse"])
def test_two_pass_backward_matches_reference(dtype, kind):
    """1 MiB accumulators, d=520 (not a multiple of 16, so d_input's sum cannot split into the
    outputs' 16-byte-aligned halves): d_input over 4 token chunks of 256 rows, d_weight over
    448-row chunks."""
    k = None if kind == "hard" else 32
    x64, w64, b64, target = on_cuda(*make_problem(1000, 520, 32007, k=k, seed=22, ignore_rows=(5,), scale=4.0))
    options = dict(softcap=30.0, label_smoothing=0.1)
    assert_matches_reference(x64, w64, b64, target, dtype, "triton", workspace_bytes=2**20, **options)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["hard", "sparse"])
def test_input_sum_in_the_outputs_matches_reference(dtype, kind):
    """1 MiB of workspace, d=512: d_input's fp32 sum (2 MB) sums in d_weight's last 1000
    rows and in d_input, and those rows' d_weight is recomputed after it."""
    from distil_kernels.loss.triton.backward import plan_backward
    from distil_kernels.loss.triton.configs import CANDIDATES

    config = CANDIDATES["gradient_sm90" if torch.cuda.get_device_capability()[0] == 9 else "gradient"][0][0]
    assert plan_backward(1000, 32007, 512, dtype, (True, True, True), config, 2**20).dx_in_outputs
    k = None if kind == "hard" else 32
    x64, w64, b64, target = on_cuda(*make_problem(1000, 512, 32007, k=k, seed=24, ignore_rows=(6,), scale=4.0))
    options = dict(softcap=30.0, label_smoothing=0.1, z_loss=1e-4)
    assert_matches_reference(x64, w64, b64, target, dtype, "triton", workspace_bytes=2**20, **options)


def _every_launch_config():
    """Each Triton loss kernel's sm_90 and sm_80 candidates for 16-bit inputs, once each:
    (kernel, config), the forward's for a plain head ("forward_plain") apart."""
    from distil_kernels.loss.triton.configs import CANDIDATES

    kernel = {"forward": "forward", "forward_sm90": "forward", "forward_plain_sm90": "forward_plain",
              "forward_softcap_sm90": "forward_softcap", "gradient": "gradient", "gradient_sm90": "gradient",
              "gradient_plain_sm90": "gradient_plain"}
    return list(dict.fromkeys((kernel[kind], c) for kind, (candidates, _) in CANDIDATES.items() for c in candidates))


@pytest.mark.parametrize("kind, config", _every_launch_config(), ids=lambda a: str(a))
def test_every_launch_config_matches_reference(monkeypatch, kind, config):
    """Every candidate the autotuner (or `python -m bench tune`) may pick, the TMA ones
    included, through the whole loss: bf16, sparse k=32 with every option (a forward's
    own head: plain, or a softcap alone), one pass and two. A config for another
    architecture than this GPU's launches all the same (a TMA config falls back to
    pointers below sm_90)."""
    from distil_kernels.loss.triton import backward as backward_module
    from distil_kernels.loss.triton import lse_forward as forward_module

    module = forward_module if kind.startswith("forward") else backward_module
    monkeypatch.setattr(module, "select_config", lambda *args: config)
    # The head each forward kind launches for (`lse_forward.head_kind`); the gradient's: every option.
    head = {"forward_plain": "plain", "forward_softcap": "softcap", "gradient_plain": "plain"}.get(kind)
    x64, w64, b64, target = on_cuda(*make_problem(1000, 520, 32007, k=None if head == "plain" else 32, seed=23,
                                                  ignore_rows=(7,), scale=4.0, bias=head is None))
    options = {"plain": {}, "softcap": dict(softcap=30.0, temperature=0.9)}.get(
        head, dict(softcap=30.0, label_smoothing=0.1, temperature=0.9))
    want = cpu64(run(x64, w64, b64, target, "torch", **options))
    x, w, b = x64.bfloat16(), w64.bfloat16(), None if b64 is None else b64.bfloat16()
    base = same_dtype_pytorch(x, w, b, target, LossOptions(**options))
    base = (base[0].double().cpu(), [None if g is None else g.double().cpu() for g in base[1]])
    rounded = cpu64(run(x.double(), w.double(), None if b is None else b.double(), target, "torch", **options))
    for workspace_bytes in (None, 2**20):
        got = cpu64(run(x, w, b, target, "triton", workspace_bytes=workspace_bytes, **options))
        assert_within_dtype_error(got, base, want, rounded_inputs=rounded)


def test_auto_picks_triton_on_cuda():
    x64, w64, b64, target = make_problem(64, 64, 1000, seed=22)
    x, w, b, tgt = on_cuda(x64.bfloat16(), w64.bfloat16(), b64.bfloat16(), target)
    torch.testing.assert_close(linear_cross_entropy(x, w, tgt, bias=b),
                               linear_cross_entropy(x, w, tgt, bias=b, backend="triton"), rtol=0, atol=0)


def test_deterministic_mode_bitwise_and_filter_on_peaked_logits():
    gen = torch.Generator().manual_seed(23)
    v, d, n = 50000, 256, 2048
    w = torch.nn.functional.normalize(torch.randn(v, d, generator=gen), dim=1)
    y = torch.randint(0, v, (n,), generator=gen)
    x = (w[y] * 24.0 + 0.3 * torch.randn(n, d, generator=gen)).bfloat16().cuda()
    w, y = w.bfloat16().cuda(), y.cuda()

    def grads(**options):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        linear_cross_entropy(xg, wg, y, backend="triton", **options).backward()
        return xg.grad.float(), wg.grad.float()

    exact = grads()
    filtered = grads(filter_eps=2.0**-12)
    bound_x = 2.0**-12 / n * w.float().abs().sum(dim=0)
    assert ((filtered[0] - exact[0]).abs() <= bound_x + 2e-3 * exact[0].abs().max()).all()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = grads(), grads()
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(a, c) for a, c in zip(first, second))


def distil_loss_problem(device):
    """fp32 DistIL problem: two groups of two rollouts, a sparse expert and ~10% padding."""
    gen = torch.Generator().manual_seed(24)
    batch, steps, d, v, k = 4, 64, 256, 5003, 16
    x = torch.randn(batch, steps, d, generator=gen) / 16
    w = torch.randn(v, d, generator=gen)
    ids = torch.stack([torch.randperm(v, generator=gen)[:k] for _ in range(batch * steps)]).reshape(batch, steps, k)
    probs = torch.rand(batch, steps, k, generator=gen)
    expert = SparseTarget(ids.to(device), (probs / probs.sum(-1, keepdim=True) * 0.9).to(device))
    actions = torch.randint(0, v, (batch, steps), generator=gen).to(device)
    mask = (torch.rand(batch, steps, generator=gen) > 0.1).to(device)
    group = torch.tensor([0, 0, 1, 1]).to(device)
    return x.to(device), w.to(device), expert, actions, mask, group


def distil_loss_run(x, w, expert, actions, mask, group, backend):
    """(loss, d_input, d_weight), float64 on the CPU."""
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = distil_loss(x, w, expert, actions, mask, group=group, discount=0.95, backend=backend)
    loss.backward()
    return [t.detach().double().cpu() for t in (loss, x.grad, w.grad)]


def test_distil_loss_triton_matches_torch():
    """Within 4x the fp32 torch backend's error of the float64 result (plus two fp32 ulps
    of the largest value). Simulated on the CPU (the interpreter for triton): errors
    4.1e-7, 1.2e-6 and 6.4e-8 for the loss, d_input and d_weight against bounds of
    7.9e-6, 5.1e-6 and 2.8e-7; the median d_weight entry is 2.9e-5."""
    x, w, expert, actions, mask, group = distil_loss_problem("cuda")
    exact = distil_loss_run(x.double(), w.double(), expert, actions, mask, group, "torch")
    same_dtype = distil_loss_run(x, w, expert, actions, mask, group, "torch")
    got = distil_loss_run(x, w, expert, actions, mask, group, "triton")
    for name, g, base, want in zip(("loss", "d_input", "d_weight"), got, same_dtype, exact):
        tol = 4 * max_error(base, want) + 2 * torch.finfo(torch.float32).eps * want.abs().max().item()
        assert max_error(g, want) <= tol, f"{name}: error {max_error(g, want):.3e} > {tol:.3e}"


@pytest.mark.parametrize("n", [4096, 16384], ids=["sum-in-workspace", "sum-in-outputs"])
def test_memory_overhead_is_bounded(n):
    """Beyond inputs and gradients: the backward's workspace (56 MiB by default) and O(N)
    statistics. d_input's fp32 [N, d] (d=1024) fits half of it at N=4096 and not at
    N=16384, where it sums in the gradient outputs."""
    d, v = 1024, 65536
    x = (torch.randn(n, d, device=CUDA) / 32).bfloat16().requires_grad_()
    w = torch.randn(v, d, device=CUDA).bfloat16().requires_grad_()
    y = torch.randint(0, v, (n,), device=CUDA)
    linear_cross_entropy(x, w, y, backend="triton").backward()
    x.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    linear_cross_entropy(x, w, y, backend="triton").backward()
    torch.cuda.synchronize()
    overhead = torch.cuda.max_memory_allocated() - before - (x.numel() + w.numel()) * 2
    # 56 MiB of workspace, a few MiB of statistics; logits would be n * v * 2 (1 GiB and more).
    assert overhead <= 64 * 2**20, f"{overhead / 2**20:.1f} MiB"
