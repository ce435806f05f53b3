// Device-side helpers shared by the CUDA kernels: accumulation types, DType dispatch,
// grid-stride loops and a deterministic block reduction. nvcc only; torch-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/macros.h"
#include "launch.h"

namespace cnnext {
namespace cuda {
namespace kernels {

// The type a kernel accumulates T in, and the conversions to and from it:
// float for float16, bfloat16 and float32; double for float64. Host and device, so
// that per-element kernel bodies can also run (and be tested) on the host.
template <typename T>
struct AccType {
  using type = float;
  static CNNEXT_HD float to(T v) { return static_cast<float>(v); }
  static CNNEXT_HD T from(float v) { return static_cast<T>(v); }
};

template <>
struct AccType<double> {
  using type = double;
  static CNNEXT_HD double to(double v) { return v; }
  static CNNEXT_HD double from(double v) { return v; }
};

template <>
struct AccType<__half> {
  using type = float;
  static CNNEXT_HD float to(__half v) { return __half2float(v); }
  static CNNEXT_HD __half from(float v) { return __float2half_rn(v); }
};

template <>
struct AccType<__nv_bfloat16> {
  using type = float;
  static CNNEXT_HD float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  static CNNEXT_HD __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

// Calls f(T{}) with the C++ type of dt (float, double, __half, __nv_bfloat16) and
// returns what it returns; an unknown tag is cudaErrorInvalidValue.
template <typename F>
cudaError_t dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::F32: return f(float{});
    case DType::F64: return f(double{});
    case DType::F16: return f(__half{});
    case DType::BF16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// First index of this thread in a grid-stride loop over [0, total), and the step.
__device__ __forceinline__ int64_t grid_first() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_step() {
  return static_cast<int64_t>(blockDim.x) * gridDim.x;
}

// Sum of v over the threads of the block, returned to thread 0 (other threads get
// partial sums). blockDim.x must be a multiple of 32, at most 1024, and every thread
// of the block must call it. The order of the additions depends only on blockDim.x,
// so the result is deterministic. Ends with a barrier, so it may be called again
// (in a loop) straight away.
template <typename A>
__device__ A block_sum(A v) {
  __shared__ A warp_sums[32];
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < (blockDim.x >> 5) ? warp_sums[lane] : A(0);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  __syncthreads();
  return v;
}

// The coordinates (n, c, h, w) of element i of an (N, C, H, W) tensor enumerated in
// NCHW order, or in NHWC order when kChannelsLast: how the elementwise kernels walk
// their outputs (the linear order that matches the output's memory order).
template <bool kChannelsLast>
CNNEXT_HD void unravel(int64_t i, int64_t C, int64_t H, int64_t W, int64_t* n, int64_t* c,
                       int64_t* h, int64_t* w) {
  if (kChannelsLast) {
    *c = i % C;
    i /= C;
    *w = i % W;
    i /= W;
    *h = i % H;
    *n = i / H;
  } else {
    *w = i % W;
    i /= W;
    *h = i % H;
    i /= H;
    *c = i % C;
    *n = i / C;
  }
}

}  // namespace kernels
}  // namespace cuda
}  // namespace cnnext
