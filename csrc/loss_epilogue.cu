// Chunk epilogue kernels of the `cuda` loss backend (see loss_epilogue.h).
//
// One block per row: a chunk row is up to a whole vocabulary (152k fp32 = 600 KB), read
// once by 256 threads in 16-byte loads, several in flight (row_walk.h); a row's
// statistics reduce through warp shuffles and one shared-memory step, with no atomics, so
// results do not depend on scheduling.

#include "loss_epilogue.h"

#include <cmath>
#include <cstdint>

#include "epilogue_math.h"
#include "row_walk.h"

namespace distil {
namespace {

constexpr int kThreads = 256;
// Four resident blocks (1024 threads) per SM hide the row loads' latency and leave 64
// registers a thread; left to itself, ptxas for sm_90a aims at eight blocks, caps the
// stats kernel at 32 registers and spills 44 bytes.
constexpr int kMinBlocks = 4;

// Calls one(c, u, b) for each column of row `u` before its first 16-byte boundary and
// after its last whole float4, and four(c, u4, b4) for each float4 from column c: the
// loads of row_walk.h, each with the bias at its columns (0 without a bias).
template <typename One, typename Four>
__device__ __forceinline__ void for_each_column(const float* u, const float* bias, const RowSpan& span,
                                                bool bias_vector, One&& one, Four&& four) {
    walk_row(
        span, threadIdx.x, kThreads, [&](int c) { one(c, u[c], bias != nullptr ? bias[c] : 0.f); },
        [&](const int (&cols)[kUnroll], const bool (&ok)[kUnroll]) {
            float4 x[kUnroll], b[kUnroll];
#pragma unroll
            for (int i = 0; i < kUnroll; ++i) x[i] = load4(u + cols[i]);
#pragma unroll
            for (int i = 0; i < kUnroll; ++i) b[i] = bias4(bias, cols[i], bias_vector);
#pragma unroll
            for (int i = 0; i < kUnroll; ++i) {
                if (ok[i]) four(cols[i], x[i], b[i]);
            }
        });
}

__global__ void __launch_bounds__(kThreads, kMinBlocks) chunk_stats_kernel(ChunkStatsArgs a) {
    const int64_t row = blockIdx.x;
    float* u = a.logits + row * a.ld;
    const float* bias = a.transform.bias;
    const Transform transform(a.transform);
    const RowSpan span = row_span(u, a.cols);
    const bool bias_vector = bias != nullptr && aligned_to(bias + span.head, 16);
    LseState s{-INFINITY, 0.f, 0.f};
    auto visit = [&](float x, float b, int c) {
        const float v = transform(x, b).z;
        if (a.write_z) u[c] = v;
        fold(s, v);
    };
    for_each_column(u, bias, span, bias_vector, [&](int c, float x, float b) { visit(x, b, c); },
                    [&](int c, float4 x, float4 b) {
                        visit(x.x, b.x, c);
                        visit(x.y, b.y, c + 1);
                        visit(x.z, b.z, c + 2);
                        visit(x.w, b.w, c + 3);
                    });
    s = block_reduce<kThreads>(s);
    if (threadIdx.x == 0) {
        a.partial[row * 3 + 0] = s.max;
        a.partial[row * 3 + 1] = s.sum;
        a.partial[row * 3 + 2] = s.zsum;
    }
    // block_reduce's barrier orders the write_z stores before these loads of other
    // threads' columns; without write_z, z is recomputed from the untouched u.
    for (int j = threadIdx.x; j < a.num_slots; j += kThreads) {
        const int64_t local = a.ids[row * a.num_slots + j] - a.vocab_start;
        if (local < 0 || local >= a.cols) continue;
        a.slot_logits[row * a.num_slots + j] =
            a.write_z ? u[local] : transform(u[local], bias != nullptr ? bias[local] : 0.f).z;
    }
}

// What a step of the gradient's walk loads for four columns: the logits and the bias.
struct Loaded4 {
    float4 u;
    float4 b;
};

// Steps of the gradient's in-place walk end at a barrier, so each step keeps more loads
// in flight than the statistics' walk: 4 float4s of logits (and of bias) a thread.
constexpr int kGradUnroll = 4;

template <typename Out>
__global__ void __launch_bounds__(kThreads, kMinBlocks) logits_grad_kernel(LogitsGradArgs a) {
    const int64_t row = blockIdx.x;
    const float* u = a.logits + row * a.ld;
    Out* out = static_cast<Out*>(a.out) + row * a.ld_out;
    const float* bias = a.transform.bias;
    const Transform transform(a.transform);
    const RowSpan span = row_span(u, a.cols);
    const bool bias_vector = bias != nullptr && aligned_to(bias + span.head, 16);
    const bool out_vector = aligned_to(out + span.head, 4 * sizeof(Out));
    const float coef = a.row_coef[row];
    const float lse = a.lse[row];
    const float uniform = a.uniform != nullptr ? a.uniform[row] : 0.f;
    const int64_t* ids = a.ids + row * a.num_slots;
    const float* slot_coef = a.slot_coef + row * a.num_slots;
    float* slot_u = a.slot_scratch + row * a.num_slots;
    // u at the slot ids, kept for their corrections: `out` may overwrite the row, and the
    // walk's first barrier orders these loads before any store. Slot j is the same
    // thread's here and in the corrections below.
    for (int j = threadIdx.x; j < a.num_slots; j += kThreads) {
        const int64_t local = ids[j] - a.vocab_start;
        if (local >= 0 && local < a.cols) slot_u[j] = u[local];
    }
    auto grad = [&](float x, float b) {
        const Transformed t = transform(x, b);
        return (coef * expf(t.z - lse) - uniform) * t.chain;
    };
    walk_row_in_place<kGradUnroll>(
        span, threadIdx.x, kThreads, [&](int c) { return make_float2(u[c], bias != nullptr ? bias[c] : 0.f); },
        [&](int c, float2 v) { out[c] = from_float<Out>(grad(v.x, v.y)); },
        [&](int c) { return Loaded4{load4(u + c), bias4(bias, c, bias_vector)}; },
        [&](int c, const Loaded4& v) {
            store4(out + c, out_vector, grad(v.u.x, v.b.x), grad(v.u.y, v.b.y), grad(v.u.z, v.b.z),
                   grad(v.u.w, v.b.w));
        },
        [] { __syncthreads(); });
    // The columns at slot ids are written again, whole, after every thread's first write
    // (the barrier orders them): the correction joins the fp32 value before its one
    // rounding. The first slot of each distinct id sums the coefficients of its repeats.
    __syncthreads();
    for (int j = threadIdx.x; j < a.num_slots; j += kThreads) {
        const int64_t local = ids[j] - a.vocab_start;
        float correction;
        if (local < 0 || local >= a.cols) continue;
        if (!first_slot_correction(ids, slot_coef, a.num_slots, j, correction)) continue;
        const Transformed t = transform(slot_u[j], bias != nullptr ? bias[local] : 0.f);
        out[local] = from_float<Out>((coef * expf(t.z - lse) - uniform - correction) * t.chain);
    }
}

}  // namespace

cudaError_t chunk_stats(const ChunkStatsArgs& args, cudaStream_t stream) {
    if (args.rows <= 0) return cudaSuccess;
    chunk_stats_kernel<<<args.rows, kThreads, 0, stream>>>(args);
    return cudaGetLastError();
}

cudaError_t logits_grad(const LogitsGradArgs& args, cudaStream_t stream) {
    if (args.rows <= 0) return cudaSuccess;
    switch (args.out_type) {
        case OutType::kBFloat16:
            logits_grad_kernel<__nv_bfloat16><<<args.rows, kThreads, 0, stream>>>(args);
            break;
        case OutType::kFloat16:
            logits_grad_kernel<__half><<<args.rows, kThreads, 0, stream>>>(args);
            break;
        default:
            logits_grad_kernel<float><<<args.rows, kThreads, 0, stream>>>(args);
    }
    return cudaGetLastError();
}

}  // namespace distil
