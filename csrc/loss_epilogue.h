// Chunk epilogue of the `cuda` loss backend: torch-agnostic launchers over raw pointers.
//
// A chunk of logits [rows, cols] (columns vocab_start .. vocab_start + cols - 1 of the
// vocabulary) comes from a cuBLAS GEMM with fp32 output: u = x W^T. Two kernels finish
// it, each reading u once and recomputing z = softcap(u + b) / T on the fly (the same
// rounded operations in both, so both see the same z):
//
//   chunk_stats   the per-row (max, sum exp(z - max), sum z) of the chunk and z at the
//                 row's slot ids that fall in it; z written back over u only when asked
//                 (the sampling backend reads the transformed logits afterwards);
//   logits_grad   dL/du = (row_coef exp(z - lse) - uniform - sum_j slot_coef_j [v = id_j])
//                 * (1 - tanh^2), written once, in the output's dtype (bf16/fp16 for the
//                 gradient GEMMs, or fp32), over u's own row (in place) or elsewhere.
//
// Neither keeps a tanh buffer nor writes z for the loss: per logit the chunk costs the
// GEMM's 4-byte write, two 4-byte reads and the gradient's write, against six passes
// when z and tanh(u / c) were stored. In place, a chunk's workspace is the 4 bytes of
// its fp32 logits alone, so a fixed workspace holds 1.5x the rows of bf16 chunks. The
// per-row algebra between the two kernels (tails, label smoothing, z-loss, reductions)
// stays in Python, shared with the other backends (row_epilogue.h does both passes in
// one where a row fits a cluster's shared memory).
// Everything here is plain CUDA C++, so nvcc compiles it without torch's CUDA build
// (tests/csrc).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace distil {

// z = softcap * tanh((u + bias) / softcap) * inv_temp, or (u + bias) * inv_temp.
struct LogitsTransform {
    const float* bias;         // [cols] fp32 at vocab_start, or nullptr
    float softcap;             // <= 0: none
    float inv_temp;
};

struct ChunkStatsArgs {
    float* logits;             // [rows, ld] fp32 u; overwritten with z only if write_z
    int64_t ld;                // row stride of logits, in elements
    int rows;
    int cols;
    int64_t vocab_start;       // vocabulary id of column 0
    LogitsTransform transform;
    bool write_z;
    const int64_t* ids;        // [rows, num_slots] vocabulary ids; out-of-chunk ids are skipped
    int num_slots;
    float* slot_logits;        // [rows, num_slots]: z written where the id falls in this chunk
    float* partial;            // [rows, 3]: max, sum exp(z - max), sum z of this chunk
};

enum class OutType { kFloat32, kBFloat16, kFloat16 };

struct LogitsGradArgs {
    const float* logits;       // [rows, ld] fp32 u; `out` may overwrite it (below)
    int64_t ld;
    int rows;
    int cols;
    int64_t vocab_start;
    LogitsTransform transform;
    const float* row_coef;     // [rows]: the softmax's coefficient (temperature folded in)
    const float* lse;          // [rows]: the row's full log-sum-exp of z
    const float* uniform;      // [rows] or nullptr: label smoothing's eps / V term
    const int64_t* ids;        // [rows, num_slots]
    const float* slot_coef;    // [rows, num_slots]
    int num_slots;
    float* slot_scratch;       // [rows, num_slots] fp32 workspace: u at the slot ids, kept
    // [rows, ld_out] of out_type: dL/du. Either in place, row r of out starting where row
    // r of logits does (ld_out * sizeof(out) == ld * 4), or not overlapping logits at all.
    void* out;
    int64_t ld_out;
    OutType out_type;
};

cudaError_t chunk_stats(const ChunkStatsArgs& args, cudaStream_t stream);
cudaError_t logits_grad(const LogitsGradArgs& args, cudaStream_t stream);

}  // namespace distil
