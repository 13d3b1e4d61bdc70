// How a block's threads walk one fp32 row of a chunk: 16-byte loads, several in flight.
//
// The epilogue kernels are bound by HBM bandwidth, and a thread that uses each loaded
// float before issuing the next load keeps one 4-byte load in flight: 32 warps an SM
// then hold 4 KB of loads, about a third of what ~3 TB/s at ~500 ns latency needs
// (Little's law). Here each thread issues kUnroll 16-byte loads before it uses any: 32
// KB in flight an SM at 1024 threads. A row starts anywhere (its stride is the vocabulary
// size), so up to three columns before the first 16-byte boundary and up to three after
// the last whole float4 go one at a time.
//
// `walk_row` and `walk_row_in_place` are host-callable so that tests/csrc checks on the
// CPU that every column is visited once, in bounds and aligned, for any start and width
// (and, in place, that no store lands on a column before every thread has loaded it).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace distil {

constexpr int kUnroll = 2;  // float4 loads a thread issues before using one

struct RowSpan {
    int head;   // columns before the first 16-byte boundary (0-3)
    int vecs;   // whole float4s from there
    int tail;   // columns after them (0-3)
};

__host__ __device__ __forceinline__ RowSpan row_span(const float* row, int cols) {
    const int misaligned = static_cast<int>((reinterpret_cast<uintptr_t>(row) % 16) / 4);
    const int head = misaligned == 0 ? 0 : (4 - misaligned < cols ? 4 - misaligned : cols);
    const int vecs = (cols - head) / 4;
    return {head, vecs, cols - head - 4 * vecs};
}

// Calls one(col) for each head and tail column, and batch(cols, ok) with kUnroll
// first-columns of float4s (each 16-byte aligned and inside the row: an index past the
// row's last float4 repeats the step's first, with ok false, so loads need no branch).
// Thread `tid` of `threads` takes float4s tid, tid + threads, ... in steps of kUnroll.
#pragma nv_exec_check_disable
template <typename One, typename Batch>
__host__ __device__ __forceinline__ void walk_row(const RowSpan& span, int tid, int threads, One&& one,
                                                  Batch&& batch) {
    for (int s = tid; s < span.head + span.tail; s += threads) {
        one(s < span.head ? s : span.head + 4 * span.vecs + (s - span.head));
    }
    for (int v = tid; v < span.vecs; v += kUnroll * threads) {
        int cols[kUnroll];
        bool ok[kUnroll];
#pragma unroll
        for (int i = 0; i < kUnroll; ++i) {
            const int vi = v + i * threads;
            ok[i] = vi < span.vecs;
            cols[i] = span.head + 4 * (ok[i] ? vi : v);
        }
        batch(cols, ok);
    }
}

// `walk_row`'s columns for a kernel whose output overwrites the row it reads: output
// column c (elements of at most 4 bytes, the row's first bytes) lies at byte
// out_size * c of the row, at or before u's column c, so it only ever lands on columns
// the walk has already reached. The walk goes in steps that every thread of the block
// takes together (a uniform count, so `sync`, the block's barrier, is reached by all):
// a step loads its columns, meets at the barrier, then stores them, so a store only
// overwrites columns that every thread loaded before that barrier. Head and tail
// columns load before the first barrier; the head stores after it, the tail after the
// last step, when every column has been loaded. Used with `sync` a no-op and one thread
// at a time, host code checks that order on the CPU (tests/csrc). `threads` >= 6.
//
//   load1(c) -> V1, store1(c, V1): single columns;
//   load4(c) -> V4, store4(c, V4): the float4 at column c, 16-byte aligned (V4 is what
//   the kernel loads with it, the bias beside the logits say).
#pragma nv_exec_check_disable
template <int Unroll, typename Load1, typename Store1, typename Load4, typename Store4, typename Sync>
__host__ __device__ __forceinline__ void walk_row_in_place(const RowSpan& span, int tid, int threads, Load1&& load1,
                                                           Store1&& store1, Load4&& load4, Store4&& store4,
                                                           Sync&& sync) {
    // Head and tail hold 6 columns at most: one each for the first threads (threads >= 6).
    const bool edge = tid < span.head + span.tail;
    const int edge_column = tid < span.head ? tid : span.head + 4 * span.vecs + (tid - span.head);
    decltype(load1(0)) edge_value{};
    if (edge) edge_value = load1(edge_column);
    sync();
    if (edge && tid < span.head) store1(edge_column, edge_value);
    for (int base = 0; base < span.vecs; base += Unroll * threads) {
        decltype(load4(0)) value[Unroll];
#pragma unroll
        for (int i = 0; i < Unroll; ++i) {
            const int v = base + tid + i * threads;
            if (v < span.vecs) value[i] = load4(span.head + 4 * v);
        }
        sync();
#pragma unroll
        for (int i = 0; i < Unroll; ++i) {
            const int v = base + tid + i * threads;
            if (v < span.vecs) store4(span.head + 4 * v, value[i]);
        }
    }
    if (edge && tid >= span.head) store1(edge_column, edge_value);
}

}  // namespace distil
