// conv_bn_relu2d's batch-norm (+ ReLU) kernels on CUDA (training mode), reading and
// writing through element strides. Simple, deterministic kernels:
//
//   bn_batch_stats      one block per channel: block sum of y -> mean, then block sum of
//                       (y - mean)^2 -> biased variance (two sweeps: no cancellation)
//   bn_normalize        one thread per element
//   bn_backward_reduce  one block per channel: sum gm * xhat and sum gm
//   bn_backward_apply   one thread per element
//
// Statistics accumulate in AccType (float for the half types and float32, double for
// float64). The per-element and per-partial bodies are __host__ __device__, so a host
// harness can run them without a GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "common/conv2d.h"
#include "conv_bn_relu2d.h"
#include "device_common.cuh"

namespace cnnext {
namespace cuda {
namespace kernels {
namespace {

// Offset of element j of channel c, j in [0, N * H * W) in (n, h, w) order.
CNNEXT_HD int64_t channel_offset(int64_t j, int64_t c, int64_t H, int64_t W, const Strides4& s) {
  const int64_t w = j % W;
  const int64_t q = j / W;
  return (q / H) * s.n + c * s.c + (q % H) * s.h + w * s.w;
}

// (n, c, h, w) offset of linear element i (w fastest, or c fastest when kChannelsLast),
// and its channel.
template <bool kChannelsLast>
CNNEXT_HD int64_t element_offset(int64_t i, int64_t C, int64_t H, int64_t W, const Strides4& s,
                                 int64_t* c) {
  int64_t n, h, w;
  if (kChannelsLast) {
    *c = i % C;
    i /= C;
    w = i % W;
    i /= W;
    h = i % H;
    n = i / H;
  } else {
    w = i % W;
    i /= W;
    h = i % H;
    i /= H;
    *c = i % C;
    n = i / C;
  }
  return n * s.n + *c * s.c + h * s.h + w * s.w;
}

// Partial sum over terms j0, j0 + step, ... of channel c of (y - shift)^power, power 1 or 2.
template <typename T>
CNNEXT_HD typename AccType<T>::type bn_moment_partial(const T* __restrict__ y, int64_t N,
                                                      int64_t H, int64_t W, const Strides4& s,
                                                      int64_t c, typename AccType<T>::type shift,
                                                      int power, int64_t j0, int64_t step) {
  using Acc = AccType<T>;
  using A = typename Acc::type;
  A acc = A(0);
  for (int64_t j = j0; j < N * H * W; j += step) {
    const A d = Acc::to(y[channel_offset(j, c, H, W, s)]) - shift;
    acc += power == 1 ? d : d * d;
  }
  return acc;
}

template <typename A>
CNNEXT_HD A inv_std(A var, double eps) {
  return A(1) / sqrt(var + static_cast<A>(eps));
}

// out element i: [relu]((y - mean) * invstd * gamma + beta).
template <typename T, bool kChannelsLast>
CNNEXT_HD void bn_normalize_element(const T* __restrict__ y, int64_t C, int64_t H, int64_t W,
                                    const Strides4& s, const typename AccType<T>::type* mean,
                                    const typename AccType<T>::type* var,
                                    const T* __restrict__ gamma, const T* __restrict__ beta,
                                    double eps, bool relu, T* __restrict__ out, int64_t i) {
  using Acc = AccType<T>;
  using A = typename Acc::type;
  int64_t c;
  const int64_t off = element_offset<kChannelsLast>(i, C, H, W, s, &c);
  A v = (Acc::to(y[off]) - mean[c]) * inv_std(var[c], eps);
  if (gamma != nullptr) v *= Acc::to(gamma[c]);
  if (beta != nullptr) v += Acc::to(beta[c]);
  if (relu && v < A(0)) v = A(0);
  out[off] = Acc::from(v);
}

// gm at offset off: g, zero where out <= 0 (out given; NaN passes, as torch's ReLU).
template <typename T>
CNNEXT_HD typename AccType<T>::type masked_grad(const T* __restrict__ g, const T* __restrict__ out,
                                                int64_t off) {
  using Acc = AccType<T>;
  using A = typename Acc::type;
  if (out != nullptr && Acc::to(out[off]) <= A(0)) return A(0);
  return Acc::to(g[off]);
}

// Partial sums over terms j0, j0 + step, ... of channel c: *sum_gm = sum gm,
// *sum_gmx = sum gm * (y - mean).
template <typename T>
CNNEXT_HD void bn_backward_partial(const T* __restrict__ g, const T* __restrict__ out,
                                   const T* __restrict__ y, int64_t N, int64_t H, int64_t W,
                                   const Strides4& s, int64_t c, typename AccType<T>::type mean,
                                   int64_t j0, int64_t step, typename AccType<T>::type* sum_gm,
                                   typename AccType<T>::type* sum_gmx) {
  using Acc = AccType<T>;
  using A = typename Acc::type;
  A a0 = A(0), a1 = A(0);
  for (int64_t j = j0; j < N * H * W; j += step) {
    const int64_t off = channel_offset(j, c, H, W, s);
    const A gm = masked_grad(g, out, off);
    a0 += gm;
    a1 += gm * (Acc::to(y[off]) - mean);
  }
  *sum_gm = a0;
  *sum_gmx = a1;
}

// dy element i = gamma * invstd * (gm - sum_gm / M - xhat * sum_gm_xhat / M).
template <typename T, bool kChannelsLast>
CNNEXT_HD void bn_backward_element(const T* __restrict__ g, const T* __restrict__ out,
                                   const T* __restrict__ y, int64_t C, int64_t H, int64_t W,
                                   const Strides4& s, int64_t M,
                                   const typename AccType<T>::type* mean,
                                   const typename AccType<T>::type* var,
                                   const T* __restrict__ gamma,
                                   const typename AccType<T>::type* sums, double eps,
                                   T* __restrict__ dy, int64_t i) {
  using Acc = AccType<T>;
  using A = typename Acc::type;
  int64_t c;
  const int64_t off = element_offset<kChannelsLast>(i, C, H, W, s, &c);
  const A invstd = inv_std(var[c], eps);
  const A xhat = (Acc::to(y[off]) - mean[c]) * invstd;
  const A k = gamma != nullptr ? Acc::to(gamma[c]) * invstd : invstd;
  const A m = static_cast<A>(M);
  dy[off] = Acc::from(k * (masked_grad(g, out, off) - sums[C + c] / m - xhat * sums[c] / m));
}

// Sum of v over the block, given to every thread.
template <typename A>
__device__ A block_sum_all(A v) {
  __shared__ A total;
  v = block_sum(v);
  if (threadIdx.x == 0) total = v;
  __syncthreads();
  const A r = total;
  __syncthreads();
  return r;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    bn_batch_stats_kernel(const T* __restrict__ y, const int64_t N, const int64_t C,
                          const int64_t H, const int64_t W, const Strides4 s,
                          typename AccType<T>::type* __restrict__ mean,
                          typename AccType<T>::type* __restrict__ var) {
  using A = typename AccType<T>::type;
  const A count = static_cast<A>(N * H * W);
  for (int64_t c = blockIdx.x; c < C; c += gridDim.x) {
    const A mu = block_sum_all(bn_moment_partial<T>(y, N, H, W, s, c, A(0), 1, threadIdx.x, blockDim.x)) / count;
    const A m2 = block_sum(bn_moment_partial<T>(y, N, H, W, s, c, mu, 2, threadIdx.x, blockDim.x));
    if (threadIdx.x == 0) {
      mean[c] = mu;
      var[c] = m2 / count;
    }
  }
}

template <typename T, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads)
    bn_normalize_kernel(const T* __restrict__ y, const int64_t C, const int64_t H, const int64_t W,
                        const Strides4 s, const typename AccType<T>::type* __restrict__ mean,
                        const typename AccType<T>::type* __restrict__ var,
                        const T* __restrict__ gamma, const T* __restrict__ beta, const double eps,
                        const bool relu, T* __restrict__ out, const int64_t total) {
  for (int64_t i = grid_first(); i < total; i += grid_step())
    bn_normalize_element<T, kChannelsLast>(y, C, H, W, s, mean, var, gamma, beta, eps, relu, out, i);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    bn_backward_reduce_kernel(const T* __restrict__ g, const T* __restrict__ out,
                              const T* __restrict__ y, const int64_t N, const int64_t C,
                              const int64_t H, const int64_t W, const Strides4 s,
                              const typename AccType<T>::type* __restrict__ mean,
                              const typename AccType<T>::type* __restrict__ var, const double eps,
                              typename AccType<T>::type* __restrict__ sums) {
  using A = typename AccType<T>::type;
  for (int64_t c = blockIdx.x; c < C; c += gridDim.x) {
    A sg, sgx;
    bn_backward_partial<T>(g, out, y, N, H, W, s, c, mean[c], threadIdx.x, blockDim.x, &sg, &sgx);
    sg = block_sum(sg);
    sgx = block_sum(sgx);
    if (threadIdx.x == 0) {
      sums[c] = sgx * inv_std(var[c], eps);
      sums[C + c] = sg;
    }
  }
}

template <typename T, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads)
    bn_backward_apply_kernel(const T* __restrict__ g, const T* __restrict__ out,
                             const T* __restrict__ y, const int64_t C, const int64_t H,
                             const int64_t W, const Strides4 s, const int64_t M,
                             const typename AccType<T>::type* __restrict__ mean,
                             const typename AccType<T>::type* __restrict__ var,
                             const T* __restrict__ gamma,
                             const typename AccType<T>::type* __restrict__ sums, const double eps,
                             T* __restrict__ dy, const int64_t total) {
  for (int64_t i = grid_first(); i < total; i += grid_step())
    bn_backward_element<T, kChannelsLast>(g, out, y, C, H, W, s, M, mean, var, gamma, sums, eps, dy, i);
}

bool channels_fastest(const Strides4& s) { return s.c < s.w; }

}  // namespace

cudaError_t bn_batch_stats(DType dt, const void* y, int64_t N, int64_t C, int64_t H, int64_t W,
                           Strides4 s, void* mean, void* var, cudaStream_t stream) {
  if (C == 0 || N * H * W == 0) return cudaSuccess;
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    using A = typename AccType<T>::type;
    bn_batch_stats_kernel<T><<<grid_size(C, 1), kThreads, 0, stream>>>(
        static_cast<const T*>(y), N, C, H, W, s, static_cast<A*>(mean), static_cast<A*>(var));
    return cudaGetLastError();
  });
}

cudaError_t bn_normalize(DType dt, const void* y, int64_t N, int64_t C, int64_t H, int64_t W,
                         Strides4 s, const void* mean, const void* var, const void* gamma,
                         const void* beta, double eps, bool relu, void* out, cudaStream_t stream) {
  const int64_t total = N * C * H * W;
  if (total == 0) return cudaSuccess;
  const bool cl = channels_fastest(s);
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    using A = typename AccType<T>::type;
    const T* yp = static_cast<const T*>(y);
    const A* mp = static_cast<const A*>(mean);
    const A* vp = static_cast<const A*>(var);
    const T* gp = static_cast<const T*>(gamma);
    const T* bp = static_cast<const T*>(beta);
    T* op = static_cast<T*>(out);
    if (cl) {
      bn_normalize_kernel<T, true><<<grid_size(total), kThreads, 0, stream>>>(
          yp, C, H, W, s, mp, vp, gp, bp, eps, relu, op, total);
    } else {
      bn_normalize_kernel<T, false><<<grid_size(total), kThreads, 0, stream>>>(
          yp, C, H, W, s, mp, vp, gp, bp, eps, relu, op, total);
    }
    return cudaGetLastError();
  });
}

cudaError_t bn_backward_reduce(DType dt, const void* g, const void* out, const void* y,
                               int64_t N, int64_t C, int64_t H, int64_t W, Strides4 s,
                               const void* mean, const void* var, double eps, void* sums,
                               cudaStream_t stream) {
  if (C == 0 || N * H * W == 0) return cudaSuccess;
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    using A = typename AccType<T>::type;
    bn_backward_reduce_kernel<T><<<grid_size(C, 1), kThreads, 0, stream>>>(
        static_cast<const T*>(g), static_cast<const T*>(out), static_cast<const T*>(y), N, C, H, W,
        s, static_cast<const A*>(mean), static_cast<const A*>(var), eps, static_cast<A*>(sums));
    return cudaGetLastError();
  });
}

cudaError_t bn_backward_apply(DType dt, const void* g, const void* out, const void* y,
                              int64_t N, int64_t C, int64_t H, int64_t W, Strides4 s,
                              const void* mean, const void* var, const void* gamma,
                              const void* sums, double eps, void* dy, cudaStream_t stream) {
  const int64_t total = N * C * H * W;
  if (total == 0) return cudaSuccess;
  const bool cl = channels_fastest(s);
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    using A = typename AccType<T>::type;
    const T* gp = static_cast<const T*>(g);
    const T* op = static_cast<const T*>(out);
    const T* yp = static_cast<const T*>(y);
    const A* mp = static_cast<const A*>(mean);
    const A* vp = static_cast<const A*>(var);
    const T* gam = static_cast<const T*>(gamma);
    const A* sp = static_cast<const A*>(sums);
    T* dp = static_cast<T*>(dy);
    const int64_t M = N * H * W;
    if (cl) {
      bn_backward_apply_kernel<T, true><<<grid_size(total), kThreads, 0, stream>>>(
          gp, op, yp, C, H, W, s, M, mp, vp, gam, sp, eps, dp, total);
    } else {
      bn_backward_apply_kernel<T, false><<<grid_size(total), kThreads, 0, stream>>>(
          gp, op, yp, C, H, W, s, M, mp, vp, gam, sp, eps, dp, total);
    }
    return cudaGetLastError();
  });
}

}  // namespace kernels
}  // namespace cuda
}  // namespace cnnext
