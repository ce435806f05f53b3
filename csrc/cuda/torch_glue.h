// The torch side of the CUDA path, shared by csrc/cuda/*_launch.cpp: dtype mapping and
// the current stream. Included only by those .cpp files (CUDA builds), never by a .cu.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/launch.h"
#include "tensors.h"

namespace cnnext {
namespace cuda {

inline kernels::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kernels::DType::F32;
    case at::kDouble: return kernels::DType::F64;
    case at::kHalf: return kernels::DType::F16;
    case at::kBFloat16: return kernels::DType::BF16;
    default: break;
  }
  // csrc/ops admits only the four types above; reaching this is a bug.
  TORCH_CHECK(false, "cnnext CUDA: unsupported dtype ", t.scalar_type());
}

// The current stream of the current device (which the caller's guard has set).
// c10's own header, not ATen/cuda/CUDAContext.h: that one pulls in the cuBLAS,
// cuSPARSE and cuSOLVER headers, which nothing here needs.
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace cuda
}  // namespace cnnext
