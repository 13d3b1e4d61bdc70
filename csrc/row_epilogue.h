// The `cuda` loss backend's epilogue in one pass over a chunk's logits (sm_90).
//
// loss_epilogue.h finishes a chunk in two kernels, each reading the fp32 logits once,
// because the gradient's coefficients (targets.py's per-row algebra, in Python) need the
// row's log-sum-exp first: per logit the two passes move 4 + 4 + 2 bytes (bf16 gradient).
// Here a thread-block cluster holds the whole row in its blocks' shared memory (a
// 152k-id row is 600 KB: 76 KB in each of 8 blocks), so the row is read from HBM once:
// each block loads its slice and folds its log-sum-exp, the cluster exchanges the
// blocks' states and slot logits through distributed shared memory, every block computes
// the same coefficients from them (row_terms.h), and writes its slice's dL/du, rounded
// once, over the row's first bytes. 4 + 2 bytes a logit.
//
// The statistics come out as well (lse, z at the slot ids, sum z), for the loss value.
// What the algebra needs of the targets alone is computed beforehand: each slot's weight
// (renormalised for that tail), a bucket's missing mass, each row's upstream factor.
// Clusters and distributed shared memory are sm_90's; `row_epilogue` refuses older
// devices (cudaErrorNotSupported), and `row_epilogue_plan` says which rows fit.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "loss_epilogue.h"
#include "row_terms.h"

namespace distil {

struct RowEpilogueArgs {
    // [rows, ld] fp32 u of whole rows (column 0 is vocabulary id 0). dL/du of out_type
    // overwrites it: row r of the gradient starts where row r of u does.
    float* logits;
    int64_t ld;
    int rows;
    int cols;
    LogitsTransform transform;
    const int64_t* ids;         // [rows, num_slots]; ids outside [0, cols) are never read
    const float* slot_weight;   // [rows, num_slots]: a_j of target slots, w_j of plain ones
    const uint8_t* slot_valid;  // [rows, num_slots]: 0 at padding
    int num_slots;
    const float* rest;          // [rows]: a bucket's clamp(1 - sum w, 0); 0 for other tails
    const float* upstream;      // [rows]: each row's factor on every coefficient (1 / T folded in)
    RowTermsOptions terms;
    float* lse;                 // [rows] out
    float* slot_logits;         // [rows, num_slots] out: z at the slot ids in [0, cols)
    float* logit_sum;           // [rows] out, or nullptr
    OutType out_type;
};

struct RowEpiloguePlan {
    int cluster;        // blocks a row (0: the row does not fit; use the two passes)
    int slice;          // columns a block holds (a multiple of 4)
    size_t smem_bytes;  // dynamic shared memory a block
};

RowEpiloguePlan row_epilogue_plan(int cols, int num_slots);
cudaError_t row_epilogue(const RowEpilogueArgs& args, cudaStream_t stream);

}  // namespace distil
