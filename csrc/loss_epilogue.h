// Chunk epilogue of the `cuda` loss backend: torch-agnostic launchers over raw pointers.
//
// A chunk of logits [rows, cols] (columns vocab_start .. vocab_start + cols - 1 of the
// vocabulary) comes from a cuBLAS GEMM with fp32 output. Two kernels finish it in place:
//
//   chunk_stats   u -> z = softcap(u + b) / T, the per-row (max, sum exp(z - max), sum z)
//                 of the chunk, and z at the row's slot ids that fall in it;
//   logits_grad   z -> dL/du = (row_coef exp(z - lse) - uniform - sum_j slot_coef_j [v = id_j])
//                 * (1 - tanh^2), in fp32 and, when asked, rounded into a bf16/fp16 copy
//                 for the two gradient GEMMs.
//
// The per-row algebra between them (tails, label smoothing, z-loss, reductions) stays in
// Python, shared with the other backends. Everything here is plain CUDA C++, so nvcc
// compiles it without torch's CUDA build (tests/csrc).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace distil {

struct ChunkStatsArgs {
    float* logits;             // [rows, ld] fp32: u in, z out
    int64_t ld;                // row stride of logits and tanh, in elements
    int rows;
    int cols;
    int64_t vocab_start;       // vocabulary id of column 0
    const float* bias;         // [cols] fp32 at vocab_start, or nullptr
    float* tanh;               // [rows, ld] fp32 tanh(u / softcap), or nullptr (softcap <= 0)
    float softcap;             // <= 0: none
    float inv_temp;
    const int64_t* ids;        // [rows, num_slots] vocabulary ids; out-of-chunk ids are skipped
    int num_slots;
    float* slot_logits;        // [rows, num_slots]: written where the id falls in this chunk
    float* partial;            // [rows, 3]: max, sum exp(z - max), sum z of this chunk
};

enum class OutType { kFloat32, kBFloat16, kFloat16 };

struct LogitsGradArgs {
    float* logits;             // [rows, ld] fp32: z in, dL/du out
    int64_t ld;
    int rows;
    int cols;
    int64_t vocab_start;
    const float* tanh;         // [rows, ld] or nullptr (no softcap)
    const float* row_coef;     // [rows]: the softmax's coefficient (temperature folded in)
    const float* lse;          // [rows]: the row's full log-sum-exp of z
    const float* uniform;      // [rows] or nullptr: label smoothing's eps / V term
    const int64_t* ids;        // [rows, num_slots]
    const float* slot_coef;    // [rows, num_slots]
    int num_slots;
    void* out;                 // [rows, ld_out] of out_type, or nullptr: fp32 in place only
    int64_t ld_out;
    OutType out_type;
};

cudaError_t chunk_stats(const ChunkStatsArgs& args, cudaStream_t stream);
cudaError_t logits_grad(const LogitsGradArgs& args, cudaStream_t stream);

}  // namespace distil
