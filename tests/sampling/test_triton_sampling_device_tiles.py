"""linear_topk and linear_sample's triton kernels on the tiles a GPU launches, under the interpreter.

The other interpreter tests run 16-row tiles of 32 or 64 columns. A GPU launches the
defaults of `sampling/triton/configs.py`: the sampler's 64-row tiles (on sm_90 by TMA:
64x64 two to a pass for one row block, else 64x32 over 4 warps four to a pass; by
pointers 64x32 four to a pass; on sm_80 two) and its 16x128 tiles below 17 rows, the
threshold pass's 128x128 (sm_90; two to a pass for a plain head) and 64x128 (sm_80)
tiles, the merge kernel's 64x64 and 16x256 tiles, and the
dense fallback's 4x512 blocks, with as many programs as an H100 would get. Each is checked
here against the torch backend's ids and the float64 formula before a GPU runs it.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs under TRITON_INTERPRET=1 (make test runs it)", allow_module_level=True)
pytest.importorskip("triton", minversion="3.2")

import triton  # noqa: E402

from distil_kernels import linear_sample, linear_topk  # noqa: E402
from distil_kernels.loss.options import LossOptions  # noqa: E402
from distil_kernels.sampling.triton import configs  # noqa: E402
from distil_kernels.sampling.triton import sample as sample_module  # noqa: E402
from distil_kernels.sampling.triton import splits as splits_module  # noqa: E402
from distil_kernels.sampling.triton import topk as topk_module  # noqa: E402
from distil_kernels.sampling.triton import truncation as truncation_module  # noqa: E402
from distil_kernels.sampling.triton.topk import triton_topk  # noqa: E402
from kernel_launches import RecordingKernel, record_merged_rows  # noqa: E402
from sampling_checks import dense_log_softmax, fp32_tolerance  # noqa: E402
from test_triton_sampling import assert_topk_close, make_problem  # noqa: E402

pytestmark = pytest.mark.interpreter

INTERPRETER_TILES = {configs.INTERPRETER_SAMPLE_CONFIG, configs.INTERPRETER_THRESHOLD_CONFIG,
                     configs.INTERPRETER_TOPK_CONFIG, configs.INTERPRETER_TOPK_LARGE_K_CONFIG,
                     configs.INTERPRETER_DENSE_SAMPLE_CONFIG, configs.INTERPRETER_TRUNCATION_CONFIG}


class DeviceTiles:
    """Config selection as on a GPU of compute capability `arch`; records what each launcher chose."""

    def __init__(self, monkeypatch, arch: int):
        self.arch = arch
        self.chosen: dict[str, list] = {}
        monkeypatch.setattr(configs, "interpreting", lambda: False)
        monkeypatch.setattr(configs, "device_arch", lambda device: arch)
        for module, name in ((sample_module, "select_sample_config"), (truncation_module, "select_dense_sample_config"),
                             (truncation_module, "select_truncation_config"), (topk_module, "select_threshold_config"),
                             (topk_module, "select_topk_config")):
            monkeypatch.setattr(module, name, self._recording(name, getattr(module, name)))

    def _recording(self, name, select):
        def chosen(*args, **kwargs):
            config = select(*args, **kwargs)
            assert config not in INTERPRETER_TILES
            self.chosen.setdefault(name, []).append(config)
            return config
        return chosen


@pytest.fixture(params=[90, 80], ids=["sm90", "sm80"])
def device_tiles(request, monkeypatch):
    return DeviceTiles(monkeypatch, request.param)


# V=601 and d=72 are no multiple of any tile (a partial 64-wide K slice); B=40 fills part
# of one 64-row block, B=9 part of one 16-row block.
V, D = 601, 72
# Log-probabilities and lse of fp32 logits summed in another order: |lse| < 12 on these
# problems (softcap 5 or logits near 0, 601 ids), where an fp32 ulp is 9.5e-7.
SAMPLE_ATOL = 4e-6
SAMPLE_OPTIONS = [dict(), dict(temperature=0.8, num_samples=3), dict(temperature=0, num_samples=2),
                  dict(top_k=5, top_p=0.9, temperature=1.2)]


def assert_draws_match_torch(x, w, **kwargs):
    """The triton backend's Sample equals the torch backend's: the same ids, logprobs and
    lse to fp32 summation order."""
    want = linear_sample(x, w, backend="torch", **kwargs)
    got = linear_sample(x, w, backend="triton", **kwargs)
    assert torch.equal(got.ids, want.ids)
    for p, q in zip(got[1:], want[1:]):
        torch.testing.assert_close(p, q, rtol=0, atol=SAMPLE_ATOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("rows", [40, 9])
@pytest.mark.parametrize("options", SAMPLE_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_sample_draws_the_torch_ids(device_tiles, dtype, rows, options):
    x, w, b = make_problem(rows, V, D, dtype, seed=31, scale=3.0)
    assert_draws_match_torch(x, w, bias=b, softcap=5.0, seed=17, **options)
    if "top_k" not in options:
        [config] = device_tiles.chosen["select_sample_config"]
        expected = configs.sample_candidates(dtype, rows, device_tiles.arch)[0]
        assert config == expected


@pytest.mark.parametrize("rows", [64, 65])
def test_sm90_sampler_default_follows_the_row_blocks(monkeypatch, rows):
    """On sm_90 with TMA descriptors a batch of one 64-row block (HBM-bound) takes the
    64x64 tile with x from registers and a larger one the 4-warp flat tile, as timed
    (configs.py); without descriptors the pointer default. Each draws the torch ids."""
    device_tiles = DeviceTiles(monkeypatch, 90)
    x, w, b = make_problem(rows, V, D, torch.float16, seed=39, scale=3.0)
    assert_draws_match_torch(x, w, bias=b, softcap=5.0, seed=29, temperature=0.8, num_samples=2)
    if configs.tensor_descriptors() is None:
        expected = configs.SAMPLE_CANDIDATES_SM90[0]
    else:
        expected = configs.SAMPLE_WIDE_XREG_SM90 if rows <= 64 else configs.SAMPLE_WARPGROUP_FLAT_SM90
    assert device_tiles.chosen["select_sample_config"] == [expected]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("k", [5, 64])
def test_topk_threshold_pass(device_tiles, dtype, k):
    x, w, b = make_problem(40, V, D, dtype, seed=32, scale=2.0)
    got = linear_topk(x, w, k, bias=b, softcap=4.0, temperature=0.8, backend="triton")
    log_q, lse = dense_log_softmax(x, w, b, softcap=4.0, temperature=0.8)
    assert_topk_close(got, log_q, lse, k, tol=fp32_tolerance(x, w, b, log_q, lse, softcap=4.0, temperature=0.8))
    assert device_tiles.chosen["select_threshold_config"] == [configs.threshold_candidates(dtype,
                                                                                          device_tiles.arch)[0]]


def test_topk_plain_head_takes_its_own_candidates(monkeypatch):
    """A head with no bias or softcap (and no raw lse asked for) is timed among the plain
    head's candidates, the one-warpgroup tile among them; any other head among the
    general ones, which leave that tile out (it spills with every option on)."""
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    monkeypatch.setattr(configs, "device_arch", lambda device: 90)
    monkeypatch.setattr(configs, "autotuning", lambda: True)
    monkeypatch.setattr(configs, "_TUNED", {})
    timed = []

    def fastest(candidates, run):
        timed.append(candidates)
        return configs.INTERPRETER_THRESHOLD_CONFIG  # runnable here

    monkeypatch.setattr(configs, "fastest", fastest)
    x, w, b = make_problem(40, V, D, torch.float16, seed=37, scale=2.0)
    for bias, softcap in ((None, None), (b, None), (None, 4.0)):
        got = linear_topk(x, w, 5, bias=bias, softcap=softcap, temperature=0.8, backend="triton")
        log_q, lse = dense_log_softmax(x, w, bias, softcap=softcap, temperature=0.8)
        assert_topk_close(got, log_q, lse, 5, tol=fp32_tolerance(x, w, bias, log_q, lse, softcap=softcap,
                                                                 temperature=0.8))
    # The softcap head's shape bin and kind are the bias head's: tuned once for both.
    plain, general = timed
    assert plain == configs.threshold_candidates(torch.float16, 90, plain=True)
    assert general == configs.threshold_candidates(torch.float16, 90)
    if configs.tensor_descriptors() is not None:
        assert configs.THRESHOLD_TMA_WARPGROUP_SM90 in plain
        assert configs.THRESHOLD_TMA_WARPGROUP_SM90 not in general


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("k", [5, 100])
def test_topk_merge_kernel(device_tiles, dtype, k):
    """Lists of one slot a (row, split) send every row to the merge kernel (k <= 64: 64x64
    tiles; k = 100: 16x256)."""
    x, w, b = make_problem(40, V, D, dtype, seed=33, scale=2.0)
    got = triton_topk(x, w, b.float(), k, LossOptions(), capacity=1)
    log_q, lse = dense_log_softmax(x, w, b)
    assert_topk_close(got, log_q, lse, k, tol=fp32_tolerance(x, w, b, log_q, lse))
    assert device_tiles.chosen["select_topk_config"] == [configs.topk_candidates(dtype, k)[0]]


def test_flat_head_dense_fallback(device_tiles):
    """top_p=0.95 of a flat head keeps more ids than the candidates: the dense fallback's
    2048-wide truncation steps and 4x512 draw blocks draw the torch backend's ids."""
    x, w, b = make_problem(9, V, D, torch.float32, seed=34, scale=0.01)
    assert_draws_match_torch(x, w, bias=b * 0.01, seed=21, top_p=0.95, temperature=1.2, num_samples=2)
    assert device_tiles.chosen["select_dense_sample_config"] == [configs.DENSE_SAMPLE_CONFIG]
    assert device_tiles.chosen["select_truncation_config"] == [configs.TRUNCATION_CONFIG]


@pytest.mark.skipif(configs.tensor_descriptors() is None, reason="this Triton has no TMA descriptors")
@pytest.mark.parametrize("config", [configs.THRESHOLD_TMA_SM90, configs.THRESHOLD_TMA_FLAT_SM90,
                                    configs.THRESHOLD_TMA_PAIR_SM90, configs.THRESHOLD_TMA_WARPGROUP_SM90,
                                    configs.THRESHOLD_TMA_PAIR_XREG_SM90, configs.THRESHOLD_TMA_TALL_SM90], ids=str)
@pytest.mark.parametrize("d", [72, 13], ids=["tma", "unaligned-rows-fall-back"])
def test_topk_threshold_pass_by_tma_descriptors(monkeypatch, config, d):
    """The sm_90 threshold candidates whose x and W slices come by TMA descriptors (zero
    fill past N, V and d; two K slices, the last partial); fp16 rows of d=13 (26 bytes)
    cannot be addressed so and take pointers instead. Two splits a row block give each
    program two or three tiles, so the flat loop's epilogue runs once a tile, each on
    its own products; the pair's programs take two passes of two tiles and one pass of
    the last tile (V = 601: five 128-wide tiles), whose second tile lies past V. The
    one-warpgroup tile, the pair with x from registers and the 256-row tile, a plain
    head's own, run on a plain head (the interpreter has no warps and skips the register copy: this checks
    that head's code by descriptors, and that the flag reaches the kernel). Every row is settled by the
    threshold pass itself: the merge kernel would redo a row whose emitted entries were
    lost, and hide it."""
    launched, x_registers = [], []
    argument = "FLAT" if config.flat else "USE_TMA"
    recorded = RecordingKernel(topk_module.threshold_kernel, x_registers, "X_REGISTERS")
    monkeypatch.setattr(topk_module, "threshold_kernel", RecordingKernel(recorded, launched, argument))
    monkeypatch.setattr(topk_module, "select_threshold_config", lambda *args: config)
    monkeypatch.setattr(splits_module, "target_programs", lambda kind: 2)  # 40 rows: one block, two splits
    redone = record_merged_rows(monkeypatch)
    x, w, b = make_problem(40, V, d, torch.float16, seed=35, scale=2.0)
    plain = config in (configs.THRESHOLD_TMA_WARPGROUP_SM90, configs.THRESHOLD_TMA_PAIR_XREG_SM90,
                       configs.THRESHOLD_TMA_TALL_SM90)
    b, softcap = (None, None) if plain else (b, 4.0)
    got = linear_topk(x, w, 5, bias=b, softcap=softcap, temperature=0.8, backend="triton")
    log_q, lse = dense_log_softmax(x, w, b, softcap=softcap, temperature=0.8)
    assert_topk_close(got, log_q, lse, 5, tol=fp32_tolerance(x, w, b, log_q, lse, softcap=softcap, temperature=0.8))
    assert launched and all(used == (d == 72) for used in launched)
    assert len(x_registers) == len(launched) and all(used == (config.x_registers and d == 72) for used in x_registers)
    assert redone == []


@pytest.mark.skipif(configs.tensor_descriptors() is None, reason="this Triton has no TMA descriptors")
@pytest.mark.parametrize("config", configs.SAMPLE_TMA_SM90, ids=str)
@pytest.mark.parametrize("options", [dict(temperature=0.8, num_samples=3), dict(temperature=0)],
                         ids=["sample", "greedy"])
def test_sample_by_tma_descriptors(monkeypatch, config, options):
    """The sm_90 sampler candidates whose x and W slices come by TMA descriptors (four
    32-wide W boxes a pass, zero-filled past V and d): the torch backend's ids. Those
    with x from registers launch so (the interpreter runs the same code less the copy
    that keeps x in registers)."""
    launched, x_registers = [], []
    kernel = RecordingKernel(RecordingKernel(sample_module.sample_kernel, x_registers, "X_REGISTERS"), launched)
    monkeypatch.setattr(sample_module, "sample_kernel", kernel)
    monkeypatch.setattr(sample_module, "select_sample_config", lambda *args: config)
    x, w, b = make_problem(40, V, D, torch.float16, seed=36, scale=3.0)
    assert_draws_match_torch(x, w, bias=b, softcap=5.0, seed=19, **options)
    assert launched and all(launched)
    assert x_registers and all(used == config.x_registers for used in x_registers)


@pytest.mark.skipif(configs.tensor_descriptors() is None, reason="this Triton has no TMA descriptors")
@pytest.mark.parametrize("config, rows", [(c, 40) for c in configs.SAMPLE_TMA_SM90 if c.flat]
                         + [(configs.SAMPLE_TALL_TMA_SM90, 150), (configs.SAMPLE_TALL_XREG_SM90, 150)], ids=str)
@pytest.mark.parametrize("options", [dict(temperature=0.8, num_samples=5), dict(temperature=0)],
                         ids=["sample", "greedy"])
def test_flat_sampler_passes_match_the_torch_ids(monkeypatch, config, rows, options):
    """The flat loop's epilogue runs after each pass's last K slice and restarts the pass's
    accumulators: d = 296 is three K slices (the last partial), and two programs per row
    block give each split several passes (the last one past V), so a pass that kept an
    earlier pass's products or skipped one would draw other ids. 150 rows are a full and
    a partial block of the tall tile."""
    launched = []
    monkeypatch.setattr(sample_module, "sample_kernel", RecordingKernel(sample_module.sample_kernel, launched, "FLAT"))
    monkeypatch.setattr(sample_module, "select_sample_config", lambda *args: config)
    # Two splits per row block and sample group.
    monkeypatch.setattr(splits_module, "target_programs", lambda kind: 2 * 2 * triton.cdiv(rows, config.block_m))
    x, w, b = make_problem(rows, V, 296, torch.float16, seed=38, scale=3.0)
    assert_draws_match_torch(x, w, bias=b, softcap=5.0, seed=23, **options)
    assert launched and all(launched)


@pytest.mark.skipif(configs.tensor_descriptors() is None, reason="this Triton has no TMA descriptors")
def test_tma_configs_take_an_empty_batch(monkeypatch):
    """No rows: a TMA descriptor cannot have a zero dimension, so nothing is described and
    nothing launched; the Sample is empty."""
    monkeypatch.setattr(sample_module, "select_sample_config", lambda *args: configs.SAMPLE_TMA_SM90[0])
    x, w, b = make_problem(0, V, D, torch.float16, seed=37)
    got = linear_sample(x, w, bias=b, seed=1, num_samples=2, backend="triton")
    assert got.ids.shape == (0, 2) and got.lse.shape == (0,)
