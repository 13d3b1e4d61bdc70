"""The chunked sampling sweeps stay within their workspace: every allocation is watched
(`AllocationTracker`, tests/memory_tracking.py).

A tile of logits is the workspace's; what a sweep computes from a tile (tempered
logits, exponentials, noise) must come in blocks, not as more tile-sized buffers. The
torch backend, which builds the [N, V] logits, must show at least N*V*4 bytes under the
same tracker: that is what proves the tracker would see an O(N*V) allocation.
"""

from __future__ import annotations

import pytest
import torch

from distil_kernels import linear_sample, linear_topk
from distil_kernels.sampling.sample import NOISE_BLOCK_CPU
from memory_tracking import MiB, AllocationTracker

N, D, V = 512, 64, 32768
LOGITS_BYTES = N * V * 4  # one fp32 [N, V] tensor: 64 MiB
# Above the sweeps' 4 MiB row blocks, so a tile-sized temporary is told from a block.
WORKSPACE_BYTES = 16 << 20
# The CPU sweep's noise for one block of NOISE_BLOCK_CPU ids: int64 Philox words and the
# float64 transform, ~24 bytes an id at its peak.
NOISE_BYTES = 32 * NOISE_BLOCK_CPU

# Flat logits (a nucleus of thousands of ids), so top_p and min_p rows take the dense
# fallback as well as the candidates' sweep.
SAMPLING = {
    "untruncated": dict(temperature=0.8),
    "greedy": dict(temperature=0.0),
    "top_p": dict(temperature=0.8, top_p=0.9),
    "top_k": dict(temperature=0.8, top_k=50),
    "min_p": dict(temperature=0.8, min_p=0.001),
}


def head():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=gen)
    w = torch.randn(V, D, generator=gen) / D**0.5
    return x, w


def peak_bytes(run) -> int:
    tracker = AllocationTracker()
    with tracker:
        run()
    return tracker.peak_bytes


@pytest.mark.parametrize("name", list(SAMPLING))
def test_chunked_sampling_stays_within_its_workspace(name):
    x, w = head()
    options = SAMPLING[name]
    peak = peak_bytes(lambda: linear_sample(x, w, seed=1, backend="chunked", workspace_bytes=WORKSPACE_BYTES,
                                            **options))
    # The tile, the noise of one block, and O(N * candidates) (each candidate's noise words
    # and keys); a second tile-sized buffer would pass the bound (the top_p sweep's
    # tempered raw log-sum-exp took three: 67 MiB here).
    bound = WORKSPACE_BYTES + NOISE_BYTES
    assert peak <= bound, f"{name}: peak {peak / MiB:.1f} MiB, bound {bound / MiB:.1f} MiB"


def test_chunked_topk_stays_within_its_workspace():
    x, w = head()
    peak = peak_bytes(lambda: linear_topk(x, w, 64, temperature=0.7, backend="chunked",
                                          workspace_bytes=WORKSPACE_BYTES))
    assert peak <= 2 * WORKSPACE_BYTES, f"peak {peak / MiB:.1f} MiB"


def test_the_tracker_sees_the_torch_backends_logits():
    x, w = head()
    assert peak_bytes(lambda: linear_sample(x, w, seed=1, backend="torch", **SAMPLING["top_p"])) >= LOGITS_BYTES
    assert peak_bytes(lambda: linear_topk(x, w, 64, backend="torch")) >= LOGITS_BYTES
