// Keys and bins of the `cuda` backend's top-k selection (row_topk, sampling_epilogue.cu).
//
// Host-callable so that tests/csrc runs the selection's arithmetic on the CPU: the keys
// order like the floats, and the k-th key's bin found from a thread's share of the
// histogram (given the keys counted in higher bins) bounds a candidate set that holds
// the top k.
#pragma once

#include <cstdint>
#include <cstring>

#include <cuda_runtime.h>

namespace distil {

// Bins of the histogram: the keys' top 12 bits (sign, exponent and 3 mantissa bits),
// an eighth of an octave of logits each.
constexpr int kTopBits = 12;
constexpr int kBins = 1 << kTopBits;

// A uint32 that orders like the float: flip every bit of a negative, the sign bit of a
// positive. -0 is keyed as +0 (the two compare equal, so their tie goes to the lower id)
// and every NaN as one positive NaN, above +inf, as a descending torch.sort ranks it (and
// as the triton backend's keys do).
__host__ __device__ __forceinline__ uint32_t order_key(float v) {
    uint32_t raw;
#ifdef __CUDA_ARCH__
    raw = __float_as_uint(v);
#else
    std::memcpy(&raw, &v, sizeof raw);
#endif
    const uint32_t bits = v == 0.f ? 0u : (v != v ? 0x7FC00000u : raw);
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__host__ __device__ __forceinline__ int key_bin(uint32_t key) { return static_cast<int>(key >> (32 - kTopBits)); }

// Entry a precedes b: larger key first, then the lower index.
__host__ __device__ __forceinline__ bool precedes(uint32_t ka, int ia, uint32_t kb, int ib) {
    return ka > kb || (ka == kb && ia < ib);
}

// The keys in bins top, top - 1, ..., top - count + 1.
__host__ __device__ __forceinline__ int bins_total(const unsigned* bins, int top, int count) {
    int total = 0;
    for (int i = 0; i < count; ++i) total += static_cast<int>(bins[top - i]);
    return total;
}

// Bins top down to top - count + 1 come after `above` keys in higher bins. Where the k-th
// largest key falls among them, sets `bin` to its bin and `candidates` to the keys in
// that bin and above (at least k), and returns true.
__host__ __device__ __forceinline__ bool kth_key_bin(const unsigned* bins, int top, int count, int above, int k,
                                                     int& bin, int& candidates) {
    if (above >= k) return false;
    for (int i = 0; i < count; ++i) {
        const int here = static_cast<int>(bins[top - i]);
        if (above + here >= k) {
            bin = top - i;
            candidates = above + here;
            return true;
        }
        above += here;
    }
    return false;
}

}  // namespace distil
