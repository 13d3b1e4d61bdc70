"""Philox4x32-10 in PyTorch: Random123's known answers, and bit-equality with tl.philox."""

from __future__ import annotations

import os

import pytest
import torch

from distil_kernels.sampling.philox import philox4x32, seed_key

# Random123's known-answer vectors for philox4x32_10: (counter, key) -> output.
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_known_answers(counter, key, expected):
    words = philox4x32(*(torch.tensor([c]) for c in counter), *key)
    assert tuple(int(w) for w in words) == expected


def test_elementwise_and_in_range():
    gen = torch.Generator().manual_seed(0)
    counters = [torch.randint(0, 2**32, (257,), generator=gen) for _ in range(4)]
    k0, k1 = seed_key(0x1234_5678_9ABC_DEF0)
    batch = philox4x32(*counters, k0, k1)
    for i in (0, 100, 256):
        single = philox4x32(*(c[i : i + 1] for c in counters), k0, k1)
        assert all(int(b[i]) == int(s[0]) for b, s in zip(batch, single))
    assert all(int(w.min()) >= 0 and int(w.max()) < 2**32 for w in batch)


@pytest.mark.interpreter
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs under TRITON_INTERPRET=1")
def test_same_bits_as_triton_philox():
    triton = pytest.importorskip("triton", minversion="3.2")
    import triton.language as tl

    @triton.jit
    def kernel(seed, c_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        c0 = tl.load(c_ptr + offs, mask=mask, other=0)
        c1 = tl.load(c_ptr + n + offs, mask=mask, other=0)
        c2 = tl.load(c_ptr + 2 * n + offs, mask=mask, other=0)
        c3 = tl.load(c_ptr + 3 * n + offs, mask=mask, other=0)
        r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
        tl.store(out_ptr + offs, r0.to(tl.int64) & 0xFFFFFFFF, mask=mask)
        tl.store(out_ptr + n + offs, r1.to(tl.int64) & 0xFFFFFFFF, mask=mask)
        tl.store(out_ptr + 2 * n + offs, r2.to(tl.int64) & 0xFFFFFFFF, mask=mask)
        tl.store(out_ptr + 3 * n + offs, r3.to(tl.int64) & 0xFFFFFFFF, mask=mask)

    gen = torch.Generator().manual_seed(1)
    n = 100
    # Negative int32 values are uint32 words with the top bit set, as tl.philox bitcasts them.
    counters = torch.randint(-(2**31), 2**31, (4, n), generator=gen, dtype=torch.int32)
    seed = 0x0DEC_AF00_1234_5678
    out = torch.zeros(4, n, dtype=torch.int64)
    kernel[(1,)](seed, counters, out, n, BLOCK=128)
    ours = torch.stack(philox4x32(*counters.long(), *seed_key(seed)))
    assert torch.equal(ours, out)


def test_int_words_follow_the_tensors_device():
    """Counter words given as ints (the sample index) land on the counters' device: the
    meta device stands in for CUDA, where a CPU word broke every sampling call."""
    counter = torch.zeros(3, dtype=torch.int64, device="meta")
    words = philox4x32(counter, 0, 5, counter, 1, 2)
    assert all(word.device.type == "meta" and word.shape == (3,) for word in words)
