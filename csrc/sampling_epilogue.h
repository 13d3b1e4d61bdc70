// Sampling epilogue of the `cuda` backend: per-row selection over a chunk of logits.
//
// A chunk of logits [rows, cols] (vocabulary ids vocab_start .. vocab_start + cols - 1,
// bias and softcap already applied: temperature 1) comes from a cuBLAS GEMM and the loss
// epilogue's `chunk_stats`. Both kernels also return each row's log-sum-exp terms at
// temperature 1 and at `temperature` (z = logit / temperature, rounded as a division, as
// the other backends form it): no other pass over the chunk is needed for them.
//
//   row_topk       the k largest logits of each row, ordered by (value desc, id asc),
//                  by a radix select on order-preserving keys (k <= kMaxTopK);
//   gumbel_argmax  per sample j, argmax_v z_v + g_v,j (ties to the lower id) with
//                  z = logit / temperature and g the Gumbel noise of the Philox stream the
//                  other backends share: id v takes word v % 4 of Philox4x32-10 at
//                  counter (v / 4, pos_lo, j, pos_hi) under key (k0, k1); u = (2w + 1) /
//                  2^33, E = -log(u) in float64, g = -log(E) in float. Greedy: argmax z.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace distil {

constexpr int kMaxTopK = 1024;

struct RowTopKArgs {
    const float* logits;   // [rows, ld]
    int64_t ld;
    int rows;
    int cols;
    int64_t vocab_start;
    int k;                 // 1 <= k <= min(cols, kMaxTopK)
    float temperature;     // > 0
    float* values;         // [rows, k] out: logits (temperature 1), sorted
    int64_t* ids;          // [rows, k] out: vocabulary ids
    float* partial;        // [rows, 4] out: max, sum exp(l - max) of l; then of z = l / temperature
};

struct GumbelArgmaxArgs {
    const float* logits;   // [rows, ld], temperature 1
    int64_t ld;
    int rows;
    int cols;
    int64_t vocab_start;
    float temperature;     // > 0; ignored when greedy
    bool greedy;           // temperature 0: argmax of the logits, no noise
    const int64_t* k0;     // [rows] Philox key words and position words, uint32 in int64
    const int64_t* k1;
    const int64_t* pos_lo;
    const int64_t* pos_hi;
    int num_samples;
    int64_t* ids;          // [rows, num_samples] out
    float* scores;         // [rows, num_samples] out: the winning z + g (z for greedy)
    float* logits_out;     // [rows, num_samples] out: the winner's logit (temperature 1)
    float* partial;        // [rows, 4] out, as RowTopKArgs::partial
    void* workspace;       // gumbel_argmax_workspace_bytes(rows, vocab_start, cols) bytes on the device
};

cudaError_t row_topk(const RowTopKArgs& args, cudaStream_t stream);
// row_topk in one read of each row (sm_90): a thread-block cluster holds the row's keys
// in shared memory. `row_topk_one_pass_cluster` gives its blocks a row (0: too wide for
// it); the workspace marks the rows it leaves to row_topk's kernel, which runs after it.
// cudaErrorNotSupported before sm_90.
int row_topk_one_pass_cluster(int cols);
size_t row_topk_one_pass_workspace_bytes(int rows);
cudaError_t row_topk_one_pass(const RowTopKArgs& args, void* workspace, cudaStream_t stream);
// Device scratch gumbel_argmax needs for the per-range partials it merges.
size_t gumbel_argmax_workspace_bytes(int rows, int64_t vocab_start, int cols);
cudaError_t gumbel_argmax(const GumbelArgmaxArgs& args, cudaStream_t stream);

}  // namespace distil
