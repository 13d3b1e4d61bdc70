// A row's logits-gradient coefficients from its statistics, on the device.
//
// targets.py's row_terms (the per-row algebra every backend shares) in CUDA C++, for the
// one-pass loss epilogue (row_epilogue.cu): that kernel holds a whole row on chip, so it
// turns the row's log-sum-exp and slot logits into the gradient's coefficients itself
// instead of handing them to Python between two passes over the row. Only the parts of
// the algebra that need the statistics are here; what depends on the targets alone
// (renormalised weights, a bucket's missing mass, the reduction's row weight) comes
// precomputed. Host-callable, so tests/csrc checks it against row_terms on the CPU.
//
//   dL/dz_v = row_coef * q_v - uniform - sum_j slot_coef_j [v == id_j]
//
// Slots [0, num_target) follow the tail rules and label smoothing; later slots are plain
// signed weights on log q (distil_loss's credit term).
#pragma once

#include <cmath>
#include <cstdint>

#include <cuda_runtime.h>

namespace distil {

struct RowTermsOptions {
    int num_target;     // slots under the tail rules; the rest are plain weights
    float smoothing;    // label smoothing eps
    float z_loss;
    float inv_vocab;    // 1 / V: smoothing's uniform term is eps / V
    float bucket_clamp; // a bucket's 1 - sum q is clamped here (its gradient is then 0)
};

// What a row's slots contribute, summed over them (the kernel sums them across a warp).
struct SlotSums {
    float weight;  // sum of the target slots' weights a_j
    float q;       // sum of q_j = exp(z_j - lse) over the valid target slots
    float extra;   // sum of the plain slots' weights
    bool valid;    // some target slot is valid: the row is not ignored
};

// q_j of target slot j: exp(z_j - lse) where the slot is valid, else 0.
__host__ __device__ __forceinline__ float slot_q(bool valid, float slot_logit, float lse) {
    return valid ? expf(slot_logit - lse) : 0.f;
}

// The row's scalars: row_coef and uniform times `upstream`, and what each slot's
// coefficient needs (`slot_coefficient`). `rest`: a bucket tail's 1 - sum w, clamped at
// 0 (0 for the other tails, which then reduce to row_coef = sum a and slot_coef = a).
struct RowScalars {
    float row_coef;
    float uniform;
    float beta;        // the bucket's rest / (1 - sum q), 0 where clamped
    float target_scale;  // (1 - eps) * upstream: a target slot's coefficient factor
    float upstream;
};

__host__ __device__ __forceinline__ RowScalars row_scalars(const RowTermsOptions& o, const SlotSums& sums,
                                                           float rest, float upstream, float lse) {
    const float outside = 1.f - sums.q;
    const float beta = outside < o.bucket_clamp ? 0.f : rest / outside;
    float row_coef = sums.weight - beta * sums.q;
    float uniform = 0.f;
    if (o.smoothing != 0.f) row_coef = (1.f - o.smoothing) * row_coef + o.smoothing;
    if (o.z_loss != 0.f) row_coef = row_coef + 2.f * o.z_loss * lse;
    if (!sums.valid) {
        row_coef = 0.f;
    } else if (o.smoothing != 0.f) {
        uniform = o.smoothing * o.inv_vocab;
    }
    row_coef += sums.extra;
    return {row_coef * upstream, uniform * upstream, beta, (1.f - o.smoothing) * upstream, upstream};
}

// Slot j's coefficient: (a_j - beta q_j) (1 - eps) for a target slot, its weight for a
// plain one; times upstream.
__host__ __device__ __forceinline__ float slot_coefficient(const RowTermsOptions& o, const RowScalars& r, int slot,
                                                           float weight, float q) {
    if (slot >= o.num_target) return weight * r.upstream;
    return (weight - r.beta * q) * r.target_scale;
}

}  // namespace distil
