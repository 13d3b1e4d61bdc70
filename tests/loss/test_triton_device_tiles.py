"""The triton loss backend on the tiles a GPU launches, under Triton's CPU interpreter.

Every other interpreter test runs the kernels on 32x64 tiles, which keep odd test shapes
spread over many tiles. A GPU runs the defaults of `loss/triton/configs.py` instead: the
128x128 (sm_90) and 64x128 (sm_80) gradient tiles, 128x256 for a plain head's forward on
sm_90, and the fp32 tiles. What only those tiles exercise (the row-block counts, the
slot-correction lists built per tile, the workspace plan's chunks of whole tiles, the
masks of a tile wider than V's remainder) is checked here on the CPU, against the float64
reference, before a GPU ever runs it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs under TRITON_INTERPRET=1 (make test runs it)", allow_module_level=True)
pytest.importorskip("triton", minversion="3.2")

from distil_kernels.loss.options import LossOptions  # noqa: E402
from distil_kernels.loss.triton import backward, configs, lse_forward  # noqa: E402
from distil_kernels.loss.triton.backward import plan_backward  # noqa: E402
from kernel_launches import RecordingKernel  # noqa: E402
from loss_problems import assert_within_dtype_error, make_problem, run, same_dtype_pytorch  # noqa: E402

pytestmark = pytest.mark.interpreter

ARCHS = {"sm90": ("gradient_sm90", "forward_plain_sm90"), "sm80": ("gradient", "forward")}


@pytest.fixture(params=sorted(ARCHS))
def device_tiles(request, monkeypatch):
    """Config selection as on a GPU of the given architecture (CPU tensors pick the
    sm_80 kinds; sm_90's are put in their place). A TMA config launches by pointers here,
    as on a GPU whose operands a descriptor cannot address: its tile is what is tested
    (`test_gradient_by_tma_descriptors` tests the descriptors)."""
    gradient_kind, plain_forward_kind = ARCHS[request.param]
    tiles = DeviceTiles(plain_forward_kind)
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    for module in (lse_forward, backward):
        def select_config(*args, _select=module.select_config, **kwargs):
            tiles.selections.append(1)
            return _select(*args, **kwargs)

        monkeypatch.setattr(module, "select_config", select_config)
    monkeypatch.setitem(configs.CANDIDATES, "gradient", configs.CANDIDATES[gradient_kind])
    return tiles


@dataclass
class DeviceTiles:
    plain_forward_kind: str
    selections: list = field(default_factory=list)  # one entry a launch config chosen as on a GPU

    def assert_forward_and_backward_took_them(self):
        assert len(self.selections) == 2, f"{len(self.selections)} of 2 launches chose a GPU config"


# N=150 and V=601 are no multiple of any tile; d=72 leaves a partial 64-wide K slice.
N, D, V = 150, 72, 601


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("workspace_bytes", [None, 64 * 1024], ids=["one-pass", "two-passes"])
def test_plain_head_hard_labels(device_tiles, monkeypatch, dtype, workspace_bytes):
    monkeypatch.setitem(configs.CANDIDATES, "forward", configs.CANDIDATES[device_tiles.plain_forward_kind])
    x64, w64, _, target = make_problem(N, D, V, seed=41, ignore_rows=(7,), scale=2.0, bias=False)
    want = run(x64, w64, None, target, "torch")
    x, w = x64.to(dtype), w64.to(dtype)
    got = run(x, w, None, target, "triton", workspace_bytes=workspace_bytes)
    device_tiles.assert_forward_and_backward_took_them()
    assert_within_dtype_error(got, same_dtype_pytorch(x, w, None, target, LossOptions()), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("workspace_bytes", [None, 64 * 1024], ids=["one-pass", "two-passes"])
def test_sparse_targets_with_every_option(device_tiles, dtype, workspace_bytes):
    """k=6 ids a row (repeats and padding included), bias, softcap, temperature, label
    smoothing and z-loss: the forward's default tile, the gradient kernel's slot lists."""
    x64, w64, b64, target = make_problem(N, D, V, k=6, seed=42, ignore_rows=(0, 149), scale=2.0,
                                         pad_slots=((3, 2), (3, 5)))
    options = dict(tail="renormalize", label_smoothing=0.05, softcap=8.0, temperature=0.9, z_loss=1e-4)
    want = run(x64, w64, b64, target, "torch", **options)
    x, w, b = x64.to(dtype), w64.to(dtype), b64.to(dtype)
    got = run(x, w, b, target, "triton", workspace_bytes=workspace_bytes, **options)
    device_tiles.assert_forward_and_backward_took_them()
    assert_within_dtype_error(got, same_dtype_pytorch(x, w, b, target, LossOptions(**options)), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_two_pass_workspace_splits_these_shapes(device_tiles, dtype):
    """The 64 KiB workspace of the tests above really takes two passes of several chunks
    on every default tile (else they would test the one-pass path twice)."""
    need = (True, True, True)
    candidates = configs.CANDIDATES["gradient"][1 if dtype == torch.float32 else 0]
    plan = plan_backward(N, V, D, dtype, need, candidates[0], 64 * 1024)
    assert not plan.dx_rides_along
    assert plan.head_rows < N and plan.head_cols < V and plan.dx_rows < N and plan.dx_cols < V


def test_input_sum_in_the_outputs_on_device_tiles(device_tiles):
    """fp16, d=64, 64 KiB of workspace: d_input's fp32 sum (37.5 KiB) sums in d_weight's
    last 150 rows and in d_input; d_weight's ids from 384 on (601 - 150 rounded down to
    the 128-column tile) are recomputed after it, every option on."""
    x64, w64, b64, target = make_problem(N, 64, V, k=6, seed=43, ignore_rows=(0, 149), scale=2.0,
                                         pad_slots=((3, 2), (3, 5)))
    options = dict(tail="renormalize", label_smoothing=0.05, softcap=8.0, temperature=0.9, z_loss=1e-4)
    candidates = configs.CANDIDATES["gradient"][0]
    plan = plan_backward(N, V, 64, torch.float16, (True, True, True), candidates[0], 64 * 1024)
    assert plan.dx_in_outputs and plan.dw_deferred_from == 384
    want = run(x64, w64, b64, target, "torch", **options)
    x, w, b = x64.half(), w64.half(), b64.half()
    got = run(x, w, b, target, "triton", workspace_bytes=64 * 1024, **options)
    device_tiles.assert_forward_and_backward_took_them()
    rounded = run(x.double(), w.double(), b.double(), target, "torch", **options)
    assert_within_dtype_error(got, same_dtype_pytorch(x, w, b, target, LossOptions(**options)), want,
                              rounded_inputs=rounded)


TMA_GRADIENTS = ([(c, False) for c in configs.GRADIENT_TMA_SM90]
                 + [(c, True) for c in configs.GRADIENT_PLAIN_TMA_SM90])


@pytest.mark.skipif(configs.tensor_descriptors() is None, reason="this Triton has no TMA descriptors")
@pytest.mark.parametrize("config, plain", TMA_GRADIENTS, ids=lambda a: str(a) if isinstance(a, configs.TileConfig)
                         else ("plain" if a else "every-option"))
@pytest.mark.parametrize("workspace_bytes", [None, 64 * 1024], ids=["one-pass", "two-passes"])
def test_gradient_by_tma_descriptors(monkeypatch, config, plain, workspace_bytes):
    """The sm_90 candidates whose x and W slices come by TMA descriptors and whose gradient
    tile leaves by one: zero fill past N, V and d on the loads, clipping on the stores
    (a partial last row block, vocabulary tile and K slice here), fp16 sparse targets
    with every option, or a plain head's for its own wide tiles (no bias, softcap or
    label smoothing)."""
    from distil_kernels.loss.triton import backward as backward_module

    launched = []

    kernel = backward_module.logits_grad_kernel
    monkeypatch.setattr(backward_module, "logits_grad_kernel", RecordingKernel(kernel, launched))
    monkeypatch.setattr(backward_module, "select_config", lambda kind, *args: config)
    x64, w64, b64, target = make_problem(N, D, V, k=6, seed=43, ignore_rows=(5,), scale=2.0, bias=not plain)
    options = dict(temperature=0.9) if plain else dict(label_smoothing=0.05, softcap=8.0, temperature=0.9,
                                                       z_loss=1e-4)
    want = run(x64, w64, b64, target, "torch", **options)
    x, w, b = x64.half(), w64.half(), None if plain else b64.half()
    got = run(x, w, b, target, "triton", workspace_bytes=workspace_bytes, **options)
    assert launched and all(launched), "the gradient kernel ran without its descriptors"
    rounded = run(x.double(), w.double(), None if plain else b.double(), target, "torch", **options)
    assert_within_dtype_error(got, same_dtype_pytorch(x, w, b, target, LossOptions(**options)), want,
                              rounded_inputs=rounded)


@pytest.mark.skipif(configs.tensor_descriptors() is None, reason="this Triton has no TMA descriptors")
def test_tma_configs_fall_back_to_pointers_where_rows_are_unaligned(monkeypatch):
    """d=13 in fp16: 26-byte rows, which TMA cannot address (16-byte multiples): the TMA
    configs launch with pointers instead, and the loss and gradients stay right."""
    from distil_kernels.loss.triton import backward as backward_module
    from distil_kernels.loss.triton import lse_forward as forward_module

    launched = []
    for module, name, config in ((forward_module, "lse_forward_kernel", configs.FORWARD_TMA_SM90[0]),
                                 (backward_module, "logits_grad_kernel", configs.GRADIENT_TMA_SM90[0])):
        monkeypatch.setattr(module, name, RecordingKernel(getattr(module, name), launched))
        monkeypatch.setattr(module, "select_config", lambda kind, *args, config=config: config)
    x64, w64, b64, target = make_problem(N, 13, V, seed=45, scale=2.0)
    want = run(x64, w64, b64, target, "torch")
    x, w, b = x64.half(), w64.half(), b64.half()
    got = run(x, w, b, target, "triton")
    assert launched == [False, False]
    assert_within_dtype_error(got, same_dtype_pytorch(x, w, b, target, LossOptions()), want)


TMA_FORWARDS = ([(c, None) for c in configs.FORWARD_TMA_SM90] + [(c, "plain") for c in configs.FORWARD_PLAIN_TMA_SM90]
                + [(configs.FORWARD_SOFTCAP_TMA_SM90, "softcap")])


@pytest.mark.skipif(configs.tensor_descriptors() is None, reason="this Triton has no TMA descriptors")
@pytest.mark.parametrize("config, head", TMA_FORWARDS, ids=lambda a: str(a) if isinstance(a, configs.TileConfig)
                         else (a or "every-option"))
def test_forward_by_tma_descriptors(monkeypatch, config, head):
    """The sm_90 forward candidates with TMA loads: a plain head's, a softcap-only head's,
    and one with bias, softcap and label smoothing; the forward's statistics feed the
    backward, so the whole loss and its gradients are checked (fp16, hard labels)."""
    from distil_kernels.loss.triton import lse_forward as forward_module

    launched = []
    monkeypatch.setattr(forward_module, "lse_forward_kernel",
                        RecordingKernel(forward_module.lse_forward_kernel, launched))
    monkeypatch.setattr(forward_module, "select_config", lambda kind, *args: config)
    x64, w64, b64, target = make_problem(N, D, V, seed=44, ignore_rows=(9,), scale=2.0, bias=head is None)
    options = {"plain": {}, "softcap": dict(softcap=8.0, temperature=0.9)}.get(
        head, dict(label_smoothing=0.05, softcap=8.0, temperature=0.9))
    want = run(x64, w64, b64, target, "torch", **options)
    x, w, b = x64.half(), w64.half(), None if b64 is None else b64.half()
    got = run(x, w, b, target, "triton", **options)
    assert launched and all(launched), "the forward kernel ran without its descriptors"
    assert forward_module.head_kind(b, LossOptions(**options)) == head
    # PyTorch's fp16 error can be smaller than the inputs' rounding alone by luck: the
    # float64 run on the rounded inputs counts too.
    rounded = run(x.double(), w.double(), None if b is None else b.double(), target, "torch", **options)
    assert_within_dtype_error(got, same_dtype_pytorch(x, w, b, target, LossOptions(**options)), want,
                              rounded_inputs=rounded)
