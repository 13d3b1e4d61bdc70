// Sampling epilogue kernels of the `cuda` backend (see sampling_epilogue.h).
//
// row_topk takes one block per row and reads it twice: a histogram of the keys' top bits,
// then the keys in the k-th one's bin and above, sorted in shared memory. gumbel_argmax
// splits rows into column ranges (one block each, 16-byte loads) and merges the ranges'
// partials in a second, per-row kernel. Selection is exact and
// deterministic: radix select on keys that order like the floats, ties resolved by the
// lower id; argmax reductions and the merge of ranges break ties by the lower id too.
// Built without fast math: the Gumbel transform (gumbel.h) needs logf accurate to an ulp,
// or the same seed could draw other ids than the other backends.

#include "sampling_epilogue.h"

#include <cmath>
#include <cstdint>

#include "gumbel.h"
#include "row_clusters.h"
#include "row_walk.h"
#include "topk_keys.h"

namespace distil {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Gumbel-max: samples drawn per pass over a row (their bests stay in registers), blocks
// the split plan aims at, and the fewest Philox groups a split takes.
constexpr int kSampleBatch = 4;
constexpr int kTargetBlocks = 1024;
constexpr int kMinGroupsPerSplit = 512;

// --- log-sum-exp terms at temperature 1 and at `temperature` -----------------------------

struct TwoLse {
    float raw_max, raw_sum, z_max, z_sum;
};

__host__ __device__ __forceinline__ void fold(float& m, float& s, float v) {
    if (v > m) {
        s = s * expf(m - v) + 1.f;
        m = v;
    } else if (v != -INFINITY) {
        // A -inf logit (a bias masking an id) adds nothing; exp(-inf - -inf) would be NaN
        // while the thread has seen only -inf. NaN still propagates.
        s += expf(v - m);
    }
}

__host__ __device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
    const float top = fmaxf(m, m2);
    if (top == -INFINITY) {
        s += s2;  // each 0 or NaN (a side that saw only -inf and NaN): a NaN survives
        return;
    }
    s = s * expf(m - top) + s2 * expf(m2 - top);
    m = top;
}

__device__ __forceinline__ TwoLse reduce_lse(TwoLse t, TwoLse* shared) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        merge(t.raw_max, t.raw_sum, __shfl_xor_sync(0xffffffffu, t.raw_max, offset),
              __shfl_xor_sync(0xffffffffu, t.raw_sum, offset));
        merge(t.z_max, t.z_sum, __shfl_xor_sync(0xffffffffu, t.z_max, offset),
              __shfl_xor_sync(0xffffffffu, t.z_sum, offset));
    }
    if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = t;
    __syncthreads();
    t = shared[0];
    for (int w = 1; w < kWarps; ++w) {
        merge(t.raw_max, t.raw_sum, shared[w].raw_max, shared[w].raw_sum);
        merge(t.z_max, t.z_sum, shared[w].z_max, shared[w].z_sum);
    }
    return t;
}

__device__ __forceinline__ void write_partial(float* partial, int64_t row, const TwoLse& t) {
    partial[row * 4 + 0] = t.raw_max;
    partial[row * 4 + 1] = t.raw_sum;
    partial[row * 4 + 2] = t.z_max;
    partial[row * 4 + 3] = t.z_sum;
}

// --- top-k by radix select -------------------------------------------------------------------

// An exclusive prefix sum over the block; `scratch` holds kWarps ints.
__device__ __forceinline__ int block_exclusive_scan(int value, int* scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    int inclusive = value;
    for (int offset = 1; offset < 32; offset <<= 1) {
        const int up = __shfl_up_sync(0xffffffffu, inclusive, offset);
        if (lane >= offset) inclusive += up;
    }
    if (lane == 31) scratch[warp] = inclusive;
    __syncthreads();
    int before = 0;
    for (int w = 0; w < warp; ++w) before += scratch[w];
    return before + inclusive - value;
}

// Calls visit(value, column) for every column of row `l`, 16-byte loads where aligned.
template <typename Visit>
__device__ __forceinline__ void for_each_logit(const float* l, const RowSpan& span, Visit&& visit) {
    walk_row(
        span, threadIdx.x, kThreads, [&](int c) { visit(l[c], c); },
        [&](const int (&cols)[kUnroll], const bool (&ok)[kUnroll]) {
            float4 x[kUnroll];
#pragma unroll
            for (int i = 0; i < kUnroll; ++i) x[i] = *reinterpret_cast<const float4*>(l + cols[i]);
#pragma unroll
            for (int i = 0; i < kUnroll; ++i) {
                if (!ok[i]) continue;
                visit(x[i].x, cols[i]);
                visit(x[i].y, cols[i] + 1);
                visit(x[i].z, cols[i] + 2);
                visit(x[i].w, cols[i] + 3);
            }
        });
}

// The top-k pass keeps a histogram of the keys' top bits (topk_keys.h) and up to
// kCandidates (key, column) candidates in dynamic shared memory: 48 KB a block.
constexpr int kCandidates = 4096;
constexpr size_t kTopKSharedBytes = sizeof(unsigned) * kBins + (sizeof(uint32_t) + sizeof(int)) * kCandidates;

// The bin of a row's k-th largest key, and the keys in it and above, from the block's
// complete histogram; written by the one thread that finds them. Thread i holds the 16
// bins counted down from the top at 16 i: an exclusive scan in thread order counts the
// keys in higher bins, and the thread where the running count reaches k finds the bin
// among its own.
__device__ __forceinline__ void find_kth_bin(const unsigned* bins, int k, int* scan_scratch, int& bin_out,
                                             int& candidates_out) {
    constexpr int kPerThread = kBins / kThreads;
    const int top = kBins - kPerThread * static_cast<int>(threadIdx.x) - 1;
    const int above = block_exclusive_scan(bins_total(bins, top, kPerThread), scan_scratch);
    int bin, candidates;
    if (kth_key_bin(bins, top, kPerThread, above, k, bin, candidates)) {
        bin_out = bin;
        candidates_out = candidates;
    }
}

// Sorts the first `count` candidates into (key desc, index asc) and writes the first k:
// a bitonic sort over the next power of two, padded with keys that sort last.
__device__ __forceinline__ void sort_and_write(uint32_t* cand_key, int* cand_index, int count, const RowTopKArgs& a,
                                               int64_t row, const float* l) {
    int size = 1;
    while (size < count) size <<= 1;
    for (int i = count + threadIdx.x; i < size; i += kThreads) {
        cand_key[i] = 0u;  // below every float's key but -NaN's: sorts last
        cand_index[i] = INT32_MAX;
    }
    __syncthreads();
    for (int width = 2; width <= size; width <<= 1) {
        for (int stride = width >> 1; stride > 0; stride >>= 1) {
            for (int i = threadIdx.x; i < size / 2; i += kThreads) {
                const int lo = 2 * stride * (i / stride) + i % stride;
                const int hi = lo + stride;
                const bool forward = (lo & width) == 0;
                const bool swap = forward ? precedes(cand_key[hi], cand_index[hi], cand_key[lo], cand_index[lo])
                                          : precedes(cand_key[lo], cand_index[lo], cand_key[hi], cand_index[hi]);
                if (swap) {
                    const uint32_t k = cand_key[lo];
                    cand_key[lo] = cand_key[hi];
                    cand_key[hi] = k;
                    const int j = cand_index[lo];
                    cand_index[lo] = cand_index[hi];
                    cand_index[hi] = j;
                }
            }
            __syncthreads();
        }
    }
    for (int j = threadIdx.x; j < a.k; j += kThreads) {
        a.values[row * a.k + j] = l[cand_index[j]];
        a.ids[row * a.k + j] = a.vocab_start + cand_index[j];
    }
}

// The k largest keys of a row whose top-12-bit bins hold too many keys at the k-th one
// (near-equal logits): radix select a byte at a time, each pass over the row in global
// memory; then every key above the k-th and the lowest-index keys equal to it.
__device__ __forceinline__ void radix_select(uint32_t* cand_key, int* cand_index, unsigned* histogram,
                                             const RowTopKArgs& a, int64_t row, const float* l, const RowSpan& span) {
    __shared__ uint32_t s_prefix;
    __shared__ int s_remaining, s_count, s_equal;
    __shared__ int scan_scratch[kWarps];
    // After each pass `prefix` holds the k-th key's known high bytes and `remaining` its
    // rank among the keys sharing them.
    uint32_t prefix = 0, mask = 0;
    int remaining = a.k;
    if (threadIdx.x == 0) s_count = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += kThreads) histogram[i] = 0;
        __syncthreads();
        for_each_logit(l, span, [&](float v, int) {
            const uint32_t key = order_key(v);
            if ((key & mask) == prefix) atomicAdd(&histogram[(key >> shift) & 255u], 1u);
        });
        __syncthreads();
        if (threadIdx.x == 0) {
            int above = 0;
            for (int digit = 255; digit >= 0; --digit) {
                const int here = static_cast<int>(histogram[digit]);
                if (above + here >= remaining) {
                    s_prefix = prefix | (static_cast<uint32_t>(digit) << shift);
                    s_remaining = remaining - above;
                    s_equal = here;  // after the last byte: how many keys equal the k-th
                    break;
                }
                above += here;
            }
        }
        __syncthreads();
        prefix = s_prefix;
        remaining = s_remaining;
        mask |= 255u << shift;
    }
    const uint32_t threshold = prefix;
    if (s_equal == remaining) {
        // No tie at the k-th key to break: every key at or above it is in, in any order.
        for_each_logit(l, span, [&](float v, int c) {
            const uint32_t key = order_key(v);
            if (key < threshold) return;
            const int slot = atomicAdd(&s_count, 1);
            // Exactly k keys qualify; the bound keeps even a miscount inside the buffers.
            if (slot < a.k) {
                cand_key[slot] = key;
                cand_index[slot] = c;
            }
        });
    } else {
        // Every key above the threshold, and the `remaining` lowest-index keys equal to
        // it: each thread takes a contiguous range, so a prefix sum orders the equal keys
        // by index.
        const int range = (a.cols + kThreads - 1) / kThreads;
        const int begin = min(a.cols, static_cast<int>(threadIdx.x) * range);
        const int end = min(a.cols, begin + range);
        int equal = 0;
        for (int c = begin; c < end; ++c) equal += order_key(l[c]) == threshold;
        int equal_before = block_exclusive_scan(equal, scan_scratch);
        __syncthreads();
        for (int c = begin; c < end; ++c) {
            const uint32_t key = order_key(l[c]);
            bool take = key > threshold;
            if (key == threshold) take = equal_before++ < remaining;
            if (take) {
                const int slot = atomicAdd(&s_count, 1);
                if (slot < a.k) {
                    cand_key[slot] = key;
                    cand_index[slot] = c;
                }
            }
        }
    }
    __syncthreads();
    sort_and_write(cand_key, cand_index, a.k, a, row, l);
}

// One block a row. The first pass over the row folds both log-sum-exps and counts the
// keys' top 12 bits; the bin holding the k-th key then bounds the candidates, and the
// second pass gathers every key in that bin or above (an eighth of an octave of logits
// at the k-th: a few hundred at k = 64 on a 152k vocabulary) for a sort in shared
// memory. Two reads of the row instead of the five of a byte-at-a-time radix select,
// which remains for rows whose bins crowd past kCandidates. Four blocks an SM (48 KB of
// shared memory each; 64 registers a thread): without a block count ptxas for sm_90a
// caps the kernel at 40 registers and spills.
__global__ void __launch_bounds__(kThreads, 4) row_topk_kernel(RowTopKArgs a, const uint8_t* only_rows) {
    // Rows the one-pass kernel left to this one (nullptr: every row).
    if (only_rows != nullptr && only_rows[blockIdx.x] == 0) return;
    extern __shared__ unsigned topk_shared[];
    unsigned* bins = topk_shared;
    uint32_t* cand_key = topk_shared + kBins;
    int* cand_index = reinterpret_cast<int*>(cand_key + kCandidates);
    __shared__ TwoLse lse_scratch[kWarps];
    __shared__ int scan_scratch[kWarps];
    __shared__ int s_bin, s_count, s_candidates;

    const int64_t row = blockIdx.x;
    const float* l = a.logits + row * a.ld;
    const RowSpan span = row_span(l, a.cols);
    for (int i = threadIdx.x; i < kBins; i += kThreads) bins[i] = 0;
    if (threadIdx.x == 0) s_count = 0;
    __syncthreads();
    TwoLse t{-INFINITY, 0.f, -INFINITY, 0.f};
    for_each_logit(l, span, [&](float v, int) {
        fold(t.raw_max, t.raw_sum, v);
        fold(t.z_max, t.z_sum, __fdiv_rn(v, a.temperature));
        atomicAdd(&bins[key_bin(order_key(v))], 1u);
    });
    t = reduce_lse(t, lse_scratch);  // its barrier also completes the histogram
    if (threadIdx.x == 0) write_partial(a.partial, row, t);
    find_kth_bin(bins, a.k, scan_scratch, s_bin, s_candidates);
    __syncthreads();
    if (s_candidates > kCandidates) {
        radix_select(cand_key, cand_index, bins, a, row, l, span);
        return;
    }
    const int lowest = s_bin;
    for_each_logit(l, span, [&](float v, int c) {
        const uint32_t key = order_key(v);
        if (key_bin(key) < lowest) return;
        const int slot = atomicAdd(&s_count, 1);
        if (slot < kCandidates) {  // exactly s_candidates qualify; the bound keeps a miscount inside
            cand_key[slot] = key;
            cand_index[slot] = c;
        }
    });
    __syncthreads();
    sort_and_write(cand_key, cand_index, min(s_count, kCandidates), a, row, l);
}

// --- top-k in one read of the row: a thread-block cluster holds it (sm_90) ------------------

// Candidates rank 0 of a cluster gathers (more: the row goes to row_topk_kernel).
constexpr int kClusterCandidates = 2048;
// Slices of keys up to ~76 KB leave two blocks an SM (with the bins and candidates: 108
// KB each); larger rows run one block an SM, up to ~190 KB of keys.
constexpr size_t kTopKSharedSlice = 80 << 10;
constexpr size_t kTopKMaxSlice = 190 << 10;

size_t topk_cluster_shared_bytes(int slice) {
    return sizeof(uint32_t) * static_cast<size_t>(slice) + sizeof(unsigned) * kBins +
           (sizeof(uint32_t) + sizeof(int)) * kClusterCandidates;
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
namespace cg = cooperative_groups;

struct TopKClusterShared {
    TwoLse lse;      // this block's terms
    int bin;         // rank 0: the k-th key's bin; candidates in it and above
    int candidates;
    int count;       // rank 0: candidates gathered so far
};
#endif

// Block `rank` of a row's cluster holds columns [rank * slice, (rank + 1) * slice) as
// keys in shared memory, read from HBM once, with the lse folds and a histogram of the
// keys' bins. The blocks add their histograms into rank 0's (distributed shared memory
// atomics, non-empty bins only); rank 0 finds the k-th key's bin and merges the lse
// terms; every block sends its keys in that bin or above to rank 0, which sorts them and
// writes the row. A row whose candidates pass kClusterCandidates is marked in `redo` for
// row_topk_kernel. Four cluster barriers a row; after the last, no block reads another's
// shared memory.
__global__ void __launch_bounds__(kThreads, 2) row_topk_cluster_kernel(RowTopKArgs a, int slice, uint8_t* redo) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    const cg::cluster_group cluster = cg::this_cluster();
    const auto [rank, blocks, row, c0, width] = row_slice(cluster, slice, a.cols);

    extern __shared__ uint32_t cluster_shared[];
    uint32_t* keys = cluster_shared;
    unsigned* bins = keys + slice;
    uint32_t* cand_key = bins + kBins;
    int* cand_index = reinterpret_cast<int*>(cand_key + kClusterCandidates);
    __shared__ TopKClusterShared shared;
    __shared__ TwoLse lse_scratch[kWarps];
    __shared__ int scan_scratch[kWarps];

    for (int i = threadIdx.x; i < kBins; i += kThreads) bins[i] = 0;
    if (threadIdx.x == 0) shared.count = 0;
    // Rank 0's bins and count are zero before any block adds to them.
    cluster.sync();

    const float* l = a.logits + row * a.ld;
    TwoLse t{-INFINITY, 0.f, -INFINITY, 0.f};
    for_each_logit(l + c0, row_span(l + c0, width), [&](float v, int c) {
        fold(t.raw_max, t.raw_sum, v);
        fold(t.z_max, t.z_sum, __fdiv_rn(v, a.temperature));
        const uint32_t key = order_key(v);
        keys[c] = key;
        atomicAdd(&bins[key_bin(key)], 1u);
    });
    t = reduce_lse(t, lse_scratch);  // its barrier also completes the keys and the bins
    if (threadIdx.x == 0) shared.lse = t;
    if (rank != 0) {
        unsigned* total = cluster.map_shared_rank(bins, 0);
        for (int i = threadIdx.x; i < kBins; i += kThreads) {
            if (bins[i] != 0) atomicAdd(total + i, bins[i]);
        }
    }
    // Rank 0's bins hold the row's histogram; every block's lse terms are written.
    cluster.sync();

    if (rank == 0) {
        find_kth_bin(bins, a.k, scan_scratch, shared.bin, shared.candidates);
        if (threadIdx.x == 0) {
            TwoLse total = shared.lse;
            for (int r = 1; r < blocks; ++r) {
                const TwoLse other = cluster.map_shared_rank(&shared, r)->lse;
                merge(total.raw_max, total.raw_sum, other.raw_max, other.raw_sum);
                merge(total.z_max, total.z_sum, other.z_max, other.z_sum);
            }
            write_partial(a.partial, row, total);
        }
    }
    // Rank 0's bin is known.
    cluster.sync();

    TopKClusterShared* first = cluster.map_shared_rank(&shared, 0);
    const int lowest = first->bin;
    const bool gather = first->candidates <= kClusterCandidates;
    if (gather) {
        int* count = &first->count;
        uint32_t* first_key = cluster.map_shared_rank(cand_key, 0);
        int* first_index = cluster.map_shared_rank(cand_index, 0);
        for (int c = threadIdx.x; c < width; c += kThreads) {
            const uint32_t key = keys[c];
            if (key_bin(key) < lowest) continue;
            const int slot = atomicAdd(count, 1);
            if (slot < kClusterCandidates) {  // exactly `candidates` qualify; the bound keeps a miscount inside
                first_key[slot] = key;
                first_index[slot] = c0 + c;
            }
        }
    } else if (rank == 0 && threadIdx.x == 0) {
        redo[row] = 1;
    }
    // Every candidate is in rank 0's shared memory.
    cluster.sync();
    if (rank == 0 && gather) sort_and_write(cand_key, cand_index, min(shared.count, kClusterCandidates), a, row, l);
#else
    __trap();  // built without sm_90 code: row_topk_one_pass launches on sm_90 devices only
#endif
}

// --- Gumbel-max ----------------------------------------------------------------------------

struct Best {
    float score;
    int index;  // column in the chunk; INT32_MAX: none yet
};

__device__ __forceinline__ Best better(Best a, Best b) {
    return (b.score > a.score || (b.score == a.score && b.index < a.index)) ? b : a;
}

__device__ __forceinline__ Best reduce_best(Best b, Best* shared) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        Best other{__shfl_xor_sync(0xffffffffu, b.score, offset), __shfl_xor_sync(0xffffffffu, b.index, offset)};
        b = better(b, other);
    }
    __syncthreads();  // `shared` may still be read from the previous sample's reduction
    if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = b;
    __syncthreads();
    b = shared[0];
    for (int w = 1; w < kWarps; ++w) b = better(b, shared[w]);
    return b;
}

// What one block leaves for the merge: its columns' lse terms and, per sample of the
// pass, its best (score, column).
struct SplitPart {
    TwoLse lse;
    float score[kSampleBatch];
    int index[kSampleBatch];
};

struct SplitPlan {
    int splits;
    int64_t groups_per_split;  // Philox groups of 4 ids
};

// Rows split into column ranges until about kTargetBlocks blocks run (a batch of 64 rows
// in one block each would leave half an H100 idle and each SM streaming a 600 KB row
// alone), each range at least kMinGroupsPerSplit groups. A function of the shape only,
// so a draw does not depend on the device.
SplitPlan plan_splits(int rows, int64_t vocab_start, int cols) {
    const int64_t groups = ((vocab_start + cols - 1) >> 2) - (vocab_start >> 2) + 1;
    const int64_t wanted = (kTargetBlocks + rows - 1) / rows;
    const int64_t most = groups / kMinGroupsPerSplit > 1 ? groups / kMinGroupsPerSplit : 1;
    const int64_t splits = wanted < most ? wanted : most;
    const int64_t per_split = (groups + splits - 1) / splits;
    return {static_cast<int>((groups + per_split - 1) / per_split), per_split};
}

// The 4 logits of Philox group `group` (columns c0 .. c0 + 3 of the chunk): one 16-byte
// load where the row allows it, else one load per column inside the chunk.
__device__ __forceinline__ float4 load_group(const float* l, int64_t c0, int cols, bool vector) {
    if (vector && c0 + 3 < cols) return *reinterpret_cast<const float4*>(l + c0);
    float v[4];
#pragma unroll
    for (int w = 0; w < 4; ++w) v[w] = c0 + w >= 0 && c0 + w < cols ? l[c0 + w] : 0.f;
    return make_float4(v[0], v[1], v[2], v[3]);
}

// Block (row, split) folds its columns' lse terms (with_lse) and keeps, for samples
// first_sample .. first_sample + count - 1, the best z + g of its columns (greedy: z).
__global__ void __launch_bounds__(kThreads) gumbel_split_kernel(GumbelArgmaxArgs a, int64_t groups_per_split,
                                                               int first_sample, int count, bool with_lse,
                                                               SplitPart* parts) {
    __shared__ TwoLse lse_scratch[kWarps];
    __shared__ Best best_scratch[kWarps];
    const int64_t row = blockIdx.x;
    const float* l = a.logits + row * a.ld;
    const float temperature = a.greedy ? 1.f : a.temperature;
    const int64_t group_begin = (a.vocab_start >> 2) + blockIdx.y * groups_per_split;
    const int64_t last_group = (a.vocab_start + a.cols - 1) >> 2;
    const int64_t group_end = group_begin + groups_per_split < last_group + 1 ? group_begin + groups_per_split
                                                                               : last_group + 1;
    // Ids v = 4 group + w sit at column v - vocab_start: 16-byte aligned groups need a
    // vocab_start of a multiple of 4 and an aligned row.
    const bool vector = a.vocab_start % 4 == 0 && reinterpret_cast<uintptr_t>(l) % 16 == 0;
    const uint32_t k0 = static_cast<uint32_t>(a.k0[row]), k1 = static_cast<uint32_t>(a.k1[row]);
    const uint32_t pos_lo = static_cast<uint32_t>(a.pos_lo[row]), pos_hi = static_cast<uint32_t>(a.pos_hi[row]);
    TwoLse t{-INFINITY, 0.f, -INFINITY, 0.f};
    Best best[kSampleBatch];
#pragma unroll
    for (int j = 0; j < kSampleBatch; ++j) best[j] = {-INFINITY, INT32_MAX};
    // kUnroll groups' loads are in flight before any is used (row_walk.h says why).
    for (int64_t g0 = group_begin + threadIdx.x; g0 < group_end; g0 += kUnroll * kThreads) {
        float4 values[kUnroll];
        int64_t groups[kUnroll];
#pragma unroll
        for (int i = 0; i < kUnroll; ++i) {
            groups[i] = g0 + i * kThreads < group_end ? g0 + i * kThreads : g0;
            values[i] = load_group(l, 4 * groups[i] - a.vocab_start, a.cols, vector);
        }
#pragma unroll
        for (int i = 0; i < kUnroll; ++i) {
            if (g0 + i * kThreads >= group_end) continue;
            const int64_t c0 = 4 * groups[i] - a.vocab_start;
            const float v[4] = {values[i].x, values[i].y, values[i].z, values[i].w};
            float z[4];
#pragma unroll
            for (int w = 0; w < 4; ++w) {
                z[w] = a.greedy ? v[w] : __fdiv_rn(v[w], temperature);
                if (with_lse && c0 + w >= 0 && c0 + w < a.cols) {
                    fold(t.raw_max, t.raw_sum, v[w]);
                    fold(t.z_max, t.z_sum, z[w]);
                }
            }
#pragma unroll
            for (int j = 0; j < kSampleBatch; ++j) {
                if (j >= count) break;
                uint32_t words[4] = {static_cast<uint32_t>(groups[i]), pos_lo, static_cast<uint32_t>(first_sample + j),
                                     pos_hi};
                if (!a.greedy) philox4x32(words, k0, k1);
#pragma unroll
                for (int w = 0; w < 4; ++w) {
                    if (c0 + w < 0 || c0 + w >= a.cols) continue;
                    const float score = a.greedy ? z[w] : z[w] + gumbel(words[w]);
                    best[j] = better(best[j], Best{score, static_cast<int>(c0 + w)});
                }
            }
        }
    }
    SplitPart* part = parts + row * gridDim.y + blockIdx.y;
    if (with_lse) {
        t = reduce_lse(t, lse_scratch);
        if (threadIdx.x == 0) part->lse = t;
    }
#pragma unroll
    for (int j = 0; j < kSampleBatch; ++j) {
        if (j >= count) break;
        const Best b = reduce_best(best[j], best_scratch);
        if (threadIdx.x == 0) {
            part->score[j] = b.score;
            part->index[j] = b.index;
        }
    }
}

// One thread per row merges its splits in column order (ties keep the lower column) and
// writes samples first_sample .. first_sample + count - 1; greedy rows repeat sample 0.
__global__ void __launch_bounds__(kThreads) gumbel_merge_kernel(GumbelArgmaxArgs a, int splits, int first_sample,
                                                               int count, bool with_lse, const SplitPart* parts) {
    const int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
    if (row >= a.rows) return;
    const SplitPart* part = parts + row * splits;
    if (with_lse) {
        TwoLse t = part[0].lse;
        for (int s = 1; s < splits; ++s) {
            merge(t.raw_max, t.raw_sum, part[s].lse.raw_max, part[s].lse.raw_sum);
            merge(t.z_max, t.z_sum, part[s].lse.z_max, part[s].lse.z_sum);
        }
        write_partial(a.partial, row, t);
    }
    const float* l = a.logits + row * a.ld;
    for (int j = 0; j < count; ++j) {
        const int source = a.greedy ? 0 : j;
        Best b{part[0].score[source], part[0].index[source]};
        for (int s = 1; s < splits; ++s) b = better(b, Best{part[s].score[source], part[s].index[source]});
        // Finite logits always give a winner; a row of NaNs gives none, and column 0
        // stands in rather than an index past the row.
        const int index = b.index == INT32_MAX ? 0 : b.index;
        const int64_t out = row * a.num_samples + first_sample + j;
        a.ids[out] = a.vocab_start + index;
        a.scores[out] = b.score;
        a.logits_out[out] = l[index];
    }
}

}  // namespace

cudaError_t row_topk(const RowTopKArgs& args, cudaStream_t stream) {
    if (args.rows <= 0) return cudaSuccess;
    if (args.k < 1 || args.k > kMaxTopK || args.k > args.cols) return cudaErrorInvalidValue;
    // Over the default 48 KB of shared memory a block once the static arrays join it.
    const cudaError_t error = cudaFuncSetAttribute(row_topk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                   static_cast<int>(kTopKSharedBytes));
    if (error != cudaSuccess) return error;
    row_topk_kernel<<<args.rows, kThreads, kTopKSharedBytes, stream>>>(args, nullptr);
    return cudaGetLastError();
}

int row_topk_one_pass_cluster(int cols) {
    if (cols <= 0) return 0;
    for (const size_t budget : {kTopKSharedSlice, kTopKMaxSlice}) {
        for (const int cluster : kRowClusterSizes) {
            const int slice = (cols + cluster - 1) / cluster;
            if (sizeof(uint32_t) * static_cast<size_t>(slice) <= budget) return cluster;
        }
    }
    return 0;
}

size_t row_topk_one_pass_workspace_bytes(int rows) { return rows > 0 ? static_cast<size_t>(rows) : 0; }

cudaError_t row_topk_one_pass(const RowTopKArgs& args, void* workspace, cudaStream_t stream) {
    if (args.rows <= 0) return cudaSuccess;
    if (args.k < 1 || args.k > kMaxTopK || args.k > args.cols || workspace == nullptr) return cudaErrorInvalidValue;
    const int cluster = row_topk_one_pass_cluster(args.cols);
    if (cluster == 0) return cudaErrorInvalidValue;
    const int slice = (args.cols + cluster - 1) / cluster;
    auto* redo = static_cast<uint8_t*>(workspace);
    cudaError_t error = cudaMemsetAsync(redo, 0, static_cast<size_t>(args.rows), stream);
    if (error != cudaSuccess) return error;
    error = launch_row_clusters(row_topk_cluster_kernel, args.rows, cluster, kThreads,
                                topk_cluster_shared_bytes(slice), stream, args, slice, redo);
    if (error != cudaSuccess) return error;
    // The rows whose candidates crowded past the cluster's buffer (near-equal logits):
    // their blocks run, the others return at once.
    error = cudaFuncSetAttribute(row_topk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 static_cast<int>(kTopKSharedBytes));
    if (error != cudaSuccess) return error;
    row_topk_kernel<<<args.rows, kThreads, kTopKSharedBytes, stream>>>(args, redo);
    return cudaGetLastError();
}

size_t gumbel_argmax_workspace_bytes(int rows, int64_t vocab_start, int cols) {
    if (rows <= 0 || cols <= 0) return 0;
    return static_cast<size_t>(rows) * plan_splits(rows, vocab_start, cols).splits * sizeof(SplitPart);
}

cudaError_t gumbel_argmax(const GumbelArgmaxArgs& args, cudaStream_t stream) {
    if (args.rows <= 0) return cudaSuccess;
    if (args.cols < 1 || args.num_samples < 1 || args.workspace == nullptr) return cudaErrorInvalidValue;
    const SplitPlan plan = plan_splits(args.rows, args.vocab_start, args.cols);
    auto* parts = static_cast<SplitPart*>(args.workspace);
    const dim3 split_grid(args.rows, plan.splits);
    const int merge_blocks = (args.rows + kThreads - 1) / kThreads;
    if (args.greedy) {
        // No noise: one argmax per row serves every sample.
        gumbel_split_kernel<<<split_grid, kThreads, 0, stream>>>(args, plan.groups_per_split, 0, 1, true, parts);
        gumbel_merge_kernel<<<merge_blocks, kThreads, 0, stream>>>(args, plan.splits, 0, args.num_samples, true,
                                                                   parts);
        return cudaGetLastError();
    }
    for (int first = 0; first < args.num_samples; first += kSampleBatch) {
        const int count = args.num_samples - first < kSampleBatch ? args.num_samples - first : kSampleBatch;
        gumbel_split_kernel<<<split_grid, kThreads, 0, stream>>>(args, plan.groups_per_split, first, count,
                                                                 first == 0, parts);
        gumbel_merge_kernel<<<merge_blocks, kThreads, 0, stream>>>(args, plan.splits, first, count, first == 0,
                                                                   parts);
    }
    return cudaGetLastError();
}

}  // namespace distil
