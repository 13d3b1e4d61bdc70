// The sampling noise the `cuda` backend shares with the others: Philox4x32-10 words and
// their Gumbel variates.
//
// Host-callable so that tests/csrc checks on the CPU that the words are
// sampling/philox.py's and that g stays within a few fp32 ulps of the torch backend's
// float64 transform at every word, including those within 2^-33 of u = 1.
#pragma once

#include <cmath>
#include <cstdint>

#include <cuda_runtime.h>

namespace distil {

__host__ __device__ __forceinline__ uint32_t mul_hi(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
    return __umulhi(a, b);
#else
    return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32-10 (Random123's round and key schedule, as tl.philox and sampling/philox.py).
__host__ __device__ __forceinline__ void philox4x32(uint32_t c[4], uint32_t k0, uint32_t k1) {
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        const uint32_t hi_b = mul_hi(0xCD9E8D57u, c[2]), lo_b = 0xCD9E8D57u * c[2];
        const uint32_t hi_a = mul_hi(0xD2511F53u, c[0]), lo_a = 0xD2511F53u * c[0];
        c[0] = hi_b ^ c[1] ^ k0;
        c[2] = hi_a ^ c[3] ^ k1;
        c[1] = lo_b;
        c[3] = lo_a;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
}

// g = -log(E) of the exponential variate E = -log(u), u = (2w + 1) / 2^33, in fp32 (the
// triton kernels' `gumbel_from_words`): the torch backend's float64 E to a few ulps, for
// one fp32 log where a float64 one took ~30 double-precision instructions an id. For
// u <= 1/2, E = -log(u) >= 0.69 of u rounded to fp32. For u > 1/2, where E is tiny and
// an unlikely token wins, E = -log1p(-v) of v = 1 - u = (2 ~w + 1) / 2^33, as log(y) of
// y = 1 - v rounded plus that rounding's exact residual (1 - y - v) / y: no cancellation.
__host__ __device__ __forceinline__ float gumbel(uint32_t word) {
    const bool upper = (word >> 31) != 0;
    const float u = fmaf(static_cast<float>(word), 0x1p-32f, 0x1p-33f);
    const float v = fmaf(static_cast<float>(~word), 0x1p-32f, 0x1p-33f);
    const float y = 1.f - v;
    // y >= 1/2 where it is used; the clamp keeps the other branch's quotient finite.
#ifdef __CUDA_ARCH__
    const float residual = __fdividef((1.f - y) - v, fmaxf(y, 0.5f));
#else
    const float residual = ((1.f - y) - v) / fmaxf(y, 0.5f);
#endif
    const float log_u = logf(upper ? y : u) + (upper ? residual : 0.f);
    return -logf(-log_u);
}

}  // namespace distil
