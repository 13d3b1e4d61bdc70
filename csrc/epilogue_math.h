// Device arithmetic the loss epilogues share (loss_epilogue.cu's two passes and
// row_epilogue.cu's one): the online log-sum-exp, the logits transform, and the loads
// and rounded stores of a row. Both must compute the same z from the same u, bit for bit,
// so they take it from one place.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include <cuda_runtime.h>

#include "loss_epilogue.h"

namespace distil {

struct LseState {
    float max;
    float sum;   // sum exp(z - max)
    float zsum;  // sum z, for label smoothing
};

__host__ __device__ __forceinline__ void fold(LseState& s, float v) {
    if (v > s.max) {
        s.sum = s.sum * expf(s.max - v) + 1.f;
        s.max = v;
    } else if (v != -INFINITY) {
        // A -inf logit (a bias masking an id) adds nothing; exp(-inf - -inf) would be NaN
        // while the thread has seen only -inf. NaN still propagates.
        s.sum += expf(v - s.max);
    }
    s.zsum += v;
}

__host__ __device__ __forceinline__ LseState merge(LseState a, LseState b) {
    const float m = fmaxf(a.max, b.max);
    // Both sides saw only -inf and NaN: each sum is 0 or NaN, and a NaN must survive
    // (fmaxf drops it from the max, so the sum carries it).
    if (m == -INFINITY) return {m, a.sum + b.sum, a.zsum + b.zsum};
    return {m, a.sum * expf(a.max - m) + b.sum * expf(b.max - m), a.zsum + b.zsum};
}

// The block's merged state, in every thread (warp shuffles, then one shared-memory step
// in warp order: no atomics, so the result does not depend on scheduling).
template <int Threads>
__device__ __forceinline__ LseState block_reduce(LseState s) {
    constexpr int kWarps = Threads / 32;
    __shared__ LseState warp_states[kWarps];
    for (int offset = 16; offset > 0; offset >>= 1) {
        LseState other{__shfl_xor_sync(0xffffffffu, s.max, offset), __shfl_xor_sync(0xffffffffu, s.sum, offset),
                       __shfl_xor_sync(0xffffffffu, s.zsum, offset)};
        s = merge(s, other);
    }
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) warp_states[warp] = s;
    __syncthreads();
    s = warp_states[0];
    for (int w = 1; w < kWarps; ++w) s = merge(s, warp_states[w]);
    return s;
}

struct Transformed {
    float z;
    float chain;  // dz/du times T: 1 - tanh^2 with a softcap, else 1
};

// The rounded operations (_rn) keep nvcc from contracting them into FMAs differently in
// the kernels: a row's lse and slot logits and its gradient's exp(z - lse) must see the
// same z, bit for bit. `biased` then `apply` is the whole transform; the one-pass kernel
// keeps the biased value and applies the rest twice.
struct Transform {
    bool has_bias;
    bool capped;
    float inv_cap;
    float out_scale;

    __device__ __forceinline__ explicit Transform(const LogitsTransform& t)
        : has_bias(t.bias != nullptr),
          capped(t.softcap > 0.f),
          inv_cap(t.softcap > 0.f ? 1.f / t.softcap : 0.f),
          out_scale(t.softcap > 0.f ? t.softcap * t.inv_temp : t.inv_temp) {}

    // u: the GEMM's product; b: the bias at its column (ignored without a bias).
    __device__ __forceinline__ float biased(float u, float b) const { return has_bias ? __fadd_rn(u, b) : u; }

    __device__ __forceinline__ Transformed apply(float v) const {
        if (!capped) return {__fmul_rn(v, out_scale), 1.f};
        const float t = tanhf(__fmul_rn(v, inv_cap));
        return {__fmul_rn(t, out_scale), 1.f - t * t};
    }

    __device__ __forceinline__ Transformed operator()(float u, float b) const { return apply(biased(u, b)); }
};

__device__ __forceinline__ bool aligned_to(const void* p, unsigned bytes) {
    return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }

// The bias at 4 columns: one 16-byte load where the bias is aligned like the row, else
// four (it stays in L2: one [V] vector for the whole chunk).
__device__ __forceinline__ float4 bias4(const float* bias, int col, bool vector) {
    if (bias == nullptr) return make_float4(0.f, 0.f, 0.f, 0.f);
    if (vector) return load4(bias + col);
    return make_float4(bias[col], bias[col + 1], bias[col + 2], bias[col + 3]);
}

// Slot j's id takes every correction of the slots sharing it, summed once, by the first
// of them: false for a later repeat (nothing to write), else true with their sum.
__device__ __forceinline__ bool first_slot_correction(const int64_t* ids, const float* slot_coef, int num_slots,
                                                      int j, float& correction) {
    const int64_t id = ids[j];
    for (int i = 0; i < j; ++i) {
        if (ids[i] == id) return false;
    }
    correction = 0.f;
    for (int i = j; i < num_slots; ++i) {
        if (ids[i] == id) correction += slot_coef[i];
    }
    return true;
}

template <typename Out>
__device__ __forceinline__ Out from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// Four consecutive values, each rounded once: one vector store where `p` is aligned to
// their size, else four.
template <typename Out>
__device__ __forceinline__ void store4(Out* p, bool vector, float a, float b, float c, float d) {
    if (!vector) {
        p[0] = from_float<Out>(a);
        p[1] = from_float<Out>(b);
        p[2] = from_float<Out>(c);
        p[3] = from_float<Out>(d);
        return;
    }
    if constexpr (sizeof(Out) == 4) {
        *reinterpret_cast<float4*>(p) = make_float4(a, b, c, d);
    } else {
        Out packed[4] = {from_float<Out>(a), from_float<Out>(b), from_float<Out>(c), from_float<Out>(d)};
        *reinterpret_cast<uint2*>(p) = *reinterpret_cast<const uint2*>(packed);
    }
}

}  // namespace distil
