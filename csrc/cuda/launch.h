// What every CUDA launcher shares: the dtype tag the torch side passes down and the
// launch-size arithmetic. Torch-free: included by the .cu files (nvcc) and by the
// torch-facing csrc/cuda/*.cpp (host compiler) alike.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace cnnext {
namespace cuda {
namespace kernels {

// Element type of the tensors a launcher reads and writes. The torch side maps
// at::ScalarType onto it; the .cu files map it onto float / double / __half /
// __nv_bfloat16.
enum class DType { F32, F64, F16, BF16 };

// Threads per block of the elementwise (one thread per element) kernels and of the
// block reductions.
constexpr int kThreads = 256;

// Upper bound on the blocks of a grid-stride launch. Far below gridDim.x's limit
// (2^31 - 1), and still enough blocks to fill any current GPU many times over; the
// kernels loop when there is more work than threads.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

// Blocks for `work` items processed `per_block` at a time, at least 1 and at most
// kMaxBlocks. Call only with work > 0 (launchers return early on empty work).
inline unsigned int grid_size(int64_t work, int64_t per_block = kThreads) {
  int64_t blocks = (work + per_block - 1) / per_block;
  if (blocks < 1) blocks = 1;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  return static_cast<unsigned int>(blocks);
}

}  // namespace kernels
}  // namespace cuda
}  // namespace cnnext
