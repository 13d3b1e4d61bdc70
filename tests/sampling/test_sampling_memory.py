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
from distil_kernels.sampling.sample import NOISE_BLOCK_CPU, NOISE_BYTES_PER_ID, noise_block_columns
from memory_tracking import MiB, AllocationTracker

N, D, V = 512, 64, 32768
LOGITS_BYTES = N * V * 4  # one fp32 [N, V] tensor: 64 MiB
# Above the sweeps' 4 MiB row blocks, so a tile-sized temporary is told from a block.
WORKSPACE_BYTES = 16 << 20

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
    # The tile within the workspace, the noise of a block within it again, and per row
    # 256 candidates' Philox words (32 B each: 4 MiB here), which also covers the rows'
    # small tables. Another tile-sized buffer passes the bound: the top_p sweep's tempered
    # raw log-sum-exp took three (67 MiB).
    bound = 2 * WORKSPACE_BYTES + N * 256 * 32
    assert peak <= bound, f"{name}: peak {peak / MiB:.1f} MiB, bound {bound / MiB:.1f} MiB"


def test_noise_blocks_stay_within_the_budget_on_every_device():
    budget = 256 << 20  # a GPU's default
    for device in (torch.device("cpu"), torch.device("cuda")):
        for rows in (1, 64, 256, 4096):
            columns = noise_block_columns(rows, budget, device)
            assert rows * columns * NOISE_BYTES_PER_ID <= budget or columns == 1
            if device.type == "cpu":
                assert rows * columns <= max(NOISE_BLOCK_CPU, rows)
    # A GPU batch of 64 rows of a 152k vocabulary is one block: no more launches than one a tile.
    assert noise_block_columns(64, budget, torch.device("cuda")) >= 152064
    assert noise_block_columns(4, 1, torch.device("cuda")) == 1


def test_chunked_topk_stays_within_its_workspace():
    x, w = head()
    peak = peak_bytes(lambda: linear_topk(x, w, 64, temperature=0.7, backend="chunked",
                                          workspace_bytes=WORKSPACE_BYTES))
    assert peak <= 2 * WORKSPACE_BYTES, f"peak {peak / MiB:.1f} MiB"


def test_the_tracker_sees_the_torch_backends_logits():
    x, w = head()
    assert peak_bytes(lambda: linear_sample(x, w, seed=1, backend="torch", **SAMPLING["top_p"])) >= LOGITS_BYTES
    assert peak_bytes(lambda: linear_topk(x, w, 64, backend="torch")) >= LOGITS_BYTES
