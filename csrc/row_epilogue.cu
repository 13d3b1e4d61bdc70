// One-pass loss epilogue: a chunk row held in a thread-block cluster (see row_epilogue.h).
//
// Block `rank` of a row's cluster owns columns [rank * slice, (rank + 1) * slice). It
// reads them from HBM once (16-byte loads, kLoadUnroll in flight a thread), keeps u + b
// in shared memory and folds z into its log-sum-exp state. After one cluster barrier every
// block merges the cluster's states in rank order and reads the slot logits from the
// blocks that own them, so all blocks reach the same lse and coefficients, bit for bit.
// Then each writes its slice's gradient from shared memory over the row's first bytes:
// every block's loads of the row were done before that barrier, so no store lands on a
// logit still to be read. A second barrier, split into arrive and wait, keeps each block's
// shared memory alive until the others have read it.

#include "row_epilogue.h"

#include <cmath>
#include <cstdint>

#include "epilogue_math.h"
#include "row_clusters.h"
#include "row_terms.h"
#include "row_walk.h"

namespace distil {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;
// A slice of at most ~100 KB lets two blocks (two rows' clusters) share an SM, so one
// row's exchange overlaps another's loads: Qwen2.5-7B's 152064 ids take 8 x 76 KB.
// Larger rows (Gemma-2's 256000: 8 x 125 KB) run one block an SM, up to ~200 KB.
constexpr size_t kSharedSliceBytes = 100 << 10;
constexpr size_t kMaxSliceBytes = 200 << 10;
// Slot arrays live beside the slice (z and coefficient of each slot).
constexpr int kMaxSlots = 1024;

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
constexpr int kLoadUnroll = 4;

struct RowShared {
    float lse;
    float row_coef;
    float uniform;
};

__device__ __forceinline__ void cluster_arrive() { asm volatile("barrier.cluster.arrive.release;\n" ::); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire;\n" ::); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

#endif

template <typename Out>
__global__ void __launch_bounds__(kThreads, 2) row_epilogue_kernel(RowEpilogueArgs a, int slice) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    const cg::cluster_group cluster = cg::this_cluster();
    const auto [rank, blocks, row, c0, width] = row_slice(cluster, slice, a.cols);

    extern __shared__ float4 dynamic_shared[];
    __shared__ RowShared row_shared;
    float* u = a.logits + row * a.ld + c0;
    const RowSpan span = row_span(u, width);
    // local[c] = u[c] + b[c] of this slice, shifted so that the float4 of column
    // span.head + 4v sits on a 16-byte boundary as it does in global memory.
    float* local = reinterpret_cast<float*>(dynamic_shared) + ((4 - span.head) & 3);
    float* slot_z = reinterpret_cast<float*>(dynamic_shared) + slice + 4;
    float* slot_coef = slot_z + a.num_slots;
    LseState* block_state = reinterpret_cast<LseState*>(slot_coef + a.num_slots);

    const Transform transform(a.transform);
    const float* bias = a.transform.bias != nullptr ? a.transform.bias + c0 : nullptr;
    const bool bias_vector = bias != nullptr && aligned_to(bias + span.head, 16);
    LseState s{-INFINITY, 0.f, 0.f};
    for (int t = threadIdx.x; t < span.head + span.tail; t += kThreads) {
        const int c = t < span.head ? t : span.head + 4 * span.vecs + (t - span.head);
        const float v = transform.biased(__ldcs(u + c), bias != nullptr ? bias[c] : 0.f);
        local[c] = v;
        fold(s, transform.apply(v).z);
    }
    for (int base = threadIdx.x; base < span.vecs; base += kLoadUnroll * kThreads) {
        float4 x[kLoadUnroll], b[kLoadUnroll];
#pragma unroll
        for (int i = 0; i < kLoadUnroll; ++i) {
            const int v = base + i * kThreads;
            // The logits are read once: streaming loads leave L2 to the GEMMs' operands.
            if (v < span.vecs) x[i] = __ldcs(reinterpret_cast<const float4*>(u + span.head + 4 * v));
        }
#pragma unroll
        for (int i = 0; i < kLoadUnroll; ++i) {
            const int v = base + i * kThreads;
            if (v < span.vecs) b[i] = bias4(bias, span.head + 4 * v, bias_vector);
        }
#pragma unroll
        for (int i = 0; i < kLoadUnroll; ++i) {
            const int v = base + i * kThreads;
            if (v >= span.vecs) continue;
            const float4 y = make_float4(transform.biased(x[i].x, b[i].x), transform.biased(x[i].y, b[i].y),
                                         transform.biased(x[i].z, b[i].z), transform.biased(x[i].w, b[i].w));
            *reinterpret_cast<float4*>(local + span.head + 4 * v) = y;
            fold(s, transform.apply(y.x).z);
            fold(s, transform.apply(y.y).z);
            fold(s, transform.apply(y.z).z);
            fold(s, transform.apply(y.w).z);
        }
    }
    s = block_reduce<kThreads>(s);  // its barrier also publishes `local` to the block
    if (threadIdx.x == 0) *block_state = s;
    const int64_t* ids = a.ids + row * a.num_slots;
    for (int j = threadIdx.x; j < a.num_slots; j += kThreads) {
        const int64_t c = ids[j] - c0;
        if (c < 0 || c >= width) continue;
        const float z = transform.apply(local[c]).z;
        slot_z[j] = z;
        a.slot_logits[row * a.num_slots + j] = z;
    }
    // Every block's state and slot logits are written, and all of the row has been read.
    cluster.sync();

    if (threadIdx.x < 32) {
        const int lane = threadIdx.x;
        LseState total{-INFINITY, 0.f, 0.f};
        for (int r = 0; r < blocks; ++r) total = merge(total, *cluster.map_shared_rank(block_state, r));
        const float lse = total.max + logf(total.sum);
        const float* weight = a.slot_weight + row * a.num_slots;
        const uint8_t* valid = a.slot_valid + row * a.num_slots;
        SlotSums sums{0.f, 0.f, 0.f, false};
        bool any_valid = false;
        for (int j = lane; j < a.num_slots; j += 32) {
            if (j >= a.terms.num_target) {
                sums.extra += weight[j];
                continue;
            }
            const int64_t id = ids[j];
            const bool ok = valid[j] != 0 && id >= 0 && id < a.cols;
            const float q = ok ? slot_q(true, *cluster.map_shared_rank(slot_z + j, static_cast<int>(id / slice)), lse)
                               : 0.f;
            slot_coef[j] = q;  // this slot's q until its coefficient replaces it below
            sums.weight += weight[j];
            sums.q += q;
            any_valid = any_valid || valid[j] != 0;
        }
        sums.weight = warp_sum(sums.weight);
        sums.q = warp_sum(sums.q);
        sums.extra = warp_sum(sums.extra);
        sums.valid = __any_sync(0xffffffffu, any_valid);
        const RowScalars scalars = row_scalars(a.terms, sums, a.rest[row], a.upstream[row], lse);
        for (int j = lane; j < a.num_slots; j += 32) {
            const float q = j < a.terms.num_target ? slot_coef[j] : 0.f;
            slot_coef[j] = slot_coefficient(a.terms, scalars, j, weight[j], q);
        }
        if (lane == 0) {
            row_shared = {lse, scalars.row_coef, scalars.uniform};
            if (rank == 0) {
                a.lse[row] = lse;
                if (a.logit_sum != nullptr) a.logit_sum[row] = total.zsum;
            }
        }
    }
    // This block reads no other block's shared memory from here on.
    cluster_arrive();
    __syncthreads();

    const float lse = row_shared.lse;
    const float coef = row_shared.row_coef;
    const float uniform = row_shared.uniform;
    Out* out = reinterpret_cast<Out*>(a.logits + row * a.ld) + c0;
    const bool out_vector = aligned_to(out + span.head, 4 * sizeof(Out));
    auto grad = [&](float v) {
        const Transformed t = transform.apply(v);
        return (coef * expf(t.z - lse) - uniform) * t.chain;
    };
    for (int t = threadIdx.x; t < span.head + span.tail; t += kThreads) {
        const int c = t < span.head ? t : span.head + 4 * span.vecs + (t - span.head);
        out[c] = from_float<Out>(grad(local[c]));
    }
    for (int v = threadIdx.x; v < span.vecs; v += kThreads) {
        const int c = span.head + 4 * v;
        const float4 y = *reinterpret_cast<const float4*>(local + c);
        store4(out + c, out_vector, grad(y.x), grad(y.y), grad(y.z), grad(y.w));
    }
    // The columns at slot ids are written again, whole, after the barrier orders them
    // after the first writes: the correction joins the fp32 value before its one
    // rounding. The first slot of each distinct id sums the coefficients of its repeats.
    __syncthreads();
    for (int j = threadIdx.x; j < a.num_slots; j += kThreads) {
        const int64_t c = ids[j] - c0;
        float correction;
        if (c < 0 || c >= width || !first_slot_correction(ids, slot_coef, a.num_slots, j, correction)) continue;
        const Transformed t = transform.apply(local[c]);
        out[c] = from_float<Out>((coef * expf(t.z - lse) - uniform - correction) * t.chain);
    }
    cluster_wait();
#else
    __trap();  // built without sm_90 code: row_epilogue launches on sm_90 devices only
#endif
}

}  // namespace

RowEpiloguePlan row_epilogue_plan(int cols, int num_slots) {
    if (cols <= 0 || num_slots < 0 || num_slots > kMaxSlots) return {0, 0, 0};
    for (const size_t budget : {kSharedSliceBytes, kMaxSliceBytes}) {
        for (const int cluster : kRowClusterSizes) {
            const int slice = ((cols + cluster - 1) / cluster + 3) / 4 * 4;
            // The slice (4 spare floats for its alignment shift), two slot arrays, the state.
            const size_t bytes = sizeof(float) * (static_cast<size_t>(slice) + 4 + 2 * num_slots) + sizeof(LseState);
            if (bytes <= budget) return {cluster, slice, bytes};
        }
    }
    return {0, 0, 0};
}

cudaError_t row_epilogue(const RowEpilogueArgs& args, cudaStream_t stream) {
    if (args.rows <= 0) return cudaSuccess;
    const RowEpiloguePlan plan = row_epilogue_plan(args.cols, args.num_slots);
    if (plan.cluster == 0) return cudaErrorInvalidValue;
    switch (args.out_type) {
        case OutType::kBFloat16:
            return launch_row_clusters(row_epilogue_kernel<__nv_bfloat16>, args.rows, plan.cluster, kThreads,
                                       plan.smem_bytes, stream, args, plan.slice);
        case OutType::kFloat16:
            return launch_row_clusters(row_epilogue_kernel<__half>, args.rows, plan.cluster, kThreads,
                                       plan.smem_bytes, stream, args, plan.slice);
        default:
            return launch_row_clusters(row_epilogue_kernel<float>, args.rows, plan.cluster, kThreads,
                                       plan.smem_bytes, stream, args, plan.slice);
    }
}

}  // namespace distil
