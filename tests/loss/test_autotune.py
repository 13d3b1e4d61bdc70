"""Autotuning's choice among launch configs (`DISTIL_KERNELS_AUTOTUNE=1`), without a GPU:
`triton.testing.do_bench` is replaced by a clock that reads each config's time."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", minversion="3.2")

from distil_kernels.loss.triton import configs  # noqa: E402
from distil_kernels.loss.triton.configs import TileConfig, fastest  # noqa: E402

SLOW = TileConfig(64, 128, 64, num_warps=8, num_stages=4)
QUICK = TileConfig(128, 128, 64, num_warps=8, num_stages=4)
BROKEN = TileConfig(128, 128, 64, num_warps=8, num_stages=4, tma=True)
MS = {SLOW: 2.0, QUICK: 1.0}


@pytest.fixture
def clock(monkeypatch):
    """do_bench runs the launch once and reports the time MS gives its config."""
    launched = []

    def do_bench(fn, warmup, rep):
        return fn()

    def run(config):
        launched.append(config)
        if config not in MS:
            raise RuntimeError("no TMA on this device")
        return MS[config]

    monkeypatch.setattr(configs.triton.testing, "do_bench", do_bench)
    return run, launched


def test_fastest_skips_a_candidate_that_fails_with_a_warning(clock):
    run, launched = clock
    with pytest.warns(RuntimeWarning, match="128x128x64-w8-s4-g8-tma failed and is skipped"):
        assert fastest((SLOW, BROKEN, QUICK), run) == QUICK
    assert launched == [SLOW, BROKEN, QUICK]


def test_fastest_raises_when_every_candidate_fails(clock):
    run, _ = clock
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="no TMA"):
        fastest((BROKEN,), run)


def test_select_config_tunes_once_per_shape_bin(clock, monkeypatch):
    run, launched = clock
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    monkeypatch.setattr(configs, "autotuning", lambda: True)
    monkeypatch.setitem(configs.CANDIDATES, "gradient", ((SLOW, QUICK), configs.CANDIDATES["gradient"][1]))
    monkeypatch.setattr(configs, "_TUNED", {})
    for n in (1000, 1024, 700):  # one power-of-two bin
        assert configs.select_config("gradient", torch.bfloat16, (n, 5000, 64), (), run) == QUICK
    assert launched == [SLOW, QUICK]
