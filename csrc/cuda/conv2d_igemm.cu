// Implicit-GEMM conv2d on CUDA: the entry points of csrc/cuda/conv2d_igemm.h. The
// kernels and their launchers are in conv2d_igemm_kernels.cuh; the launchers are
// instantiated in conv2d_igemm_{f32,tf32,f16,bf16}.cu and only declared here, so this
// file compiles none of the GEMM kernels, only the statistics reduction below.
#include "conv2d_igemm_kernels.cuh"

CNNEXT_IGEMM_INSTANTIATE(extern, float, false)
CNNEXT_IGEMM_INSTANTIATE(extern, float, true)
CNNEXT_IGEMM_INSTANTIATE(extern, __half, true)
CNNEXT_IGEMM_INSTANTIATE(extern, __nv_bfloat16, true)

namespace cnnext {
namespace cuda {
namespace kernels {
namespace igemm {

// One block per channel: thread partials over the tiles, then a fixed tree over the
// threads (deterministic); mean and biased variance in float.
__global__ void __launch_bounds__(kThreadsPerBlock)
    stats_finish_kernel(const float* __restrict__ stats, const int64_t tiles,
                        const int64_t channels, float* __restrict__ mean, float* __restrict__ var) {
  __shared__ float sh[kThreadsPerBlock][3];
  for (int64_t c = blockIdx.x; c < channels; c += gridDim.x) {
    const int t = static_cast<int>(threadIdx.x);
    stats_thread_partial(stats, tiles, channels, c, t, kThreadsPerBlock, sh[t]);
    __syncthreads();
    for (int half = kThreadsPerBlock / 2; half > 0; half /= 2) {
      if (t < half) chan_combine(sh[t], sh[t + half]);
      __syncthreads();
    }
    if (t == 0) {
      mean[c] = sh[0][1];
      var[c] = sh[0][0] > 0.f ? sh[0][2] / sh[0][0] : 0.f;
    }
    __syncthreads();
  }
}

}  // namespace igemm

int64_t igemm_stats_floats(const IgemmProblem& q) { return igemm::stats_floats(q); }

cudaError_t igemm_stats_finish(const IgemmProblem& q, const float* stats, float* mean, float* var,
                               cudaStream_t stream) {
  const int64_t channels = q.G * q.Ncol;
  if (channels == 0 || q.M == 0) return cudaSuccess;
  igemm::stats_finish_kernel<<<grid_size(channels, 1), igemm::kThreadsPerBlock, 0, stream>>>(
      stats, (q.M + igemm::kBM - 1) / igemm::kBM, channels, mean, var);
  return cudaGetLastError();
}

bool igemm_supported(const IgemmProblem& q, DType dt) {
  if (dt == DType::F64) return false;
  if ((q.Ncol + igemm::kBN - 1) / igemm::kBN > 65535 || q.G > 65535) return false;
  if ((q.M + igemm::kBM - 1) / igemm::kBM > 0x7fffffff) return false;
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
    (void)cudaGetLastError();  // leave no sticky error behind for the next launch check
    return false;
  }
  return major >= 8;
}

int64_t igemm_target_blocks() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return 1;
  }
  return 2 * static_cast<int64_t>(sms);
}

bool igemm_wgrad_supported(const IgemmWgradProblem& q, DType dt) {
  IgemmProblem shape{};
  shape.M = q.M; shape.Ncol = q.Ncol; shape.G = q.G * q.splits;
  return igemm_supported(shape, dt) && (q.M + igemm::kBM - 1) / igemm::kBM <= 0x7fffffff;
}

bool igemm_wgrad_profitable(const IgemmWgradProblem& q) {
  return q.M >= 16 && q.Ncol >= 16 && q.K >= 256;
}

cudaError_t conv2d_igemm_wgrad(const IgemmWgradProblem& q, DType dt, IgemmF32Math math,
                               const void* gy, const void* x, float* workspace, void* gw,
                               cudaStream_t stream) {
  if (q.G * q.M * q.Ncol == 0) return cudaSuccess;
  switch (dt) {
    case DType::F32:
      return math == IgemmF32Math::kTF32
                 ? igemm::launch_wgrad<float, true>(q, gy, x, workspace, gw, stream)
                 : igemm::launch_wgrad<float, false>(q, gy, x, workspace, gw, stream);
    case DType::F16: return igemm::launch_wgrad<__half, true>(q, gy, x, workspace, gw, stream);
    case DType::BF16:
      return igemm::launch_wgrad<__nv_bfloat16, true>(q, gy, x, workspace, gw, stream);
    default: break;
  }
  return cudaErrorInvalidValue;
}

bool igemm_profitable(const IgemmProblem& q) {
  return q.Ncol >= 16 && q.K >= 16 && q.M >= 64;
}

cudaError_t conv2d_igemm(const IgemmProblem& q, DType dt, IgemmF32Math math, const void* a,
                         const void* b, const void* bias, void* c, cudaStream_t stream,
                         float* stats) {
  if (q.M == 0 || q.Ncol == 0 || q.G == 0) return cudaSuccess;
  if (dt == DType::F64) return cudaErrorInvalidValue;
  switch (dt) {
    case DType::F32:
      return math == IgemmF32Math::kTF32
                 ? igemm::launch<float, true>(q, a, b, bias, c, stats, stream)
                 : igemm::launch<float, false>(q, a, b, bias, c, stats, stream);
    case DType::F16: return igemm::launch<__half, true>(q, a, b, bias, c, stats, stream);
    case DType::BF16: return igemm::launch<__nv_bfloat16, true>(q, a, b, bias, c, stats, stream);
    default: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace kernels
}  // namespace cuda
}  // namespace cnnext
