// One row of a chunk to a thread-block cluster (sm_90): what the one-pass kernels share.
//
// row_epilogue.cu (the loss) and sampling_epilogue.cu (top-k) hold a whole row in the
// shared memory of a cluster of blocks, block `rank` owning columns [rank * slice,
// (rank + 1) * slice), so that the row is read from HBM once. Clusters and distributed
// shared memory are sm_90's: the launcher refuses older devices, and kernels built for an
// older target (whose bodies trap), with cudaErrorNotSupported, which the Python side
// answers by taking the two-pass kernels.
#pragma once

#include <cooperative_groups.h>

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace distil {

// 8: the largest portable cluster.
constexpr int kRowClusterSizes[] = {1, 2, 4, 8};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
struct RowSlice {
    int rank;       // this block's place in the row's cluster
    int blocks;     // the cluster's size
    int64_t row;
    int first;      // the slice's first column
    int width;      // its columns (the last slices of a narrow row may have none)
};

// Grid x is rows * cluster size; cluster i takes row i.
__device__ __forceinline__ RowSlice row_slice(const cooperative_groups::cluster_group& cluster, int slice, int cols) {
    const int rank = static_cast<int>(cluster.block_rank());
    const int blocks = static_cast<int>(cluster.num_blocks());
    const int first = min(rank * slice, cols);
    return {rank, blocks, static_cast<int64_t>(blockIdx.x / blocks), first, min(slice, cols - first)};
}
#endif

// Launches `kernel` on `rows` clusters of `cluster` blocks of `threads`, each with
// `shared_bytes` of dynamic shared memory; cudaErrorNotSupported before sm_90 or for a
// kernel without sm_90 code (a compute_80 build JIT-ed for the device).
template <typename... Params, typename... Args>
cudaError_t launch_row_clusters(void (*kernel)(Params...), int rows, int cluster, int threads, size_t shared_bytes,
                                cudaStream_t stream, Args&&... args) {
    int device = 0, major = 0;
    cudaError_t error = cudaGetDevice(&device);
    if (error == cudaSuccess) error = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    if (error != cudaSuccess) return error;
    if (major < 9) return cudaErrorNotSupported;
    cudaFuncAttributes attributes{};
    error = cudaFuncGetAttributes(&attributes, kernel);
    if (error != cudaSuccess) return error;
    if (attributes.ptxVersion < 90) return cudaErrorNotSupported;
    error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes));
    if (error != cudaSuccess) return error;
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(static_cast<unsigned>(rows) * static_cast<unsigned>(cluster));
    config.blockDim = dim3(static_cast<unsigned>(threads));
    config.dynamicSmemBytes = shared_bytes;
    config.stream = stream;
    cudaLaunchAttribute attribute{};
    attribute.id = cudaLaunchAttributeClusterDimension;
    attribute.val.clusterDim.x = static_cast<unsigned>(cluster);
    attribute.val.clusterDim.y = 1;
    attribute.val.clusterDim.z = 1;
    config.attrs = &attribute;
    config.numAttrs = 1;
    return cudaLaunchKernelEx(&config, kernel, static_cast<Args&&>(args)...);
}

}  // namespace distil
