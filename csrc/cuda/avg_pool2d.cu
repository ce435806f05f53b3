// avg_pool2d and adaptive_avg_pool2d on CUDA, reading and writing every tensor through
// its strides.
//
//   forward          one thread per output element: the sum of its window
//                    (avg_pool_window_h / _w), divided by its divisor.
//   global forward   (one window covering a plane, the hot case of ResNet-style heads)
//                    one warp per output when the input's planes are not
//                    channels-last: the lanes stride over the plane and a fixed
//                    shuffle tree adds their partial sums. Channels-last input keeps
//                    one thread per output, whose neighbours then read neighbouring
//                    channels.
//   backward         a gather: one thread per grad_input element sums grad / divisor
//                    over the windows that contain it (avg_pool_windows_containing).
//                    No atomics: each element is written once, by one thread.
//
// Every sum is taken in a fixed order, so results are bitwise reproducible.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "avg_pool2d.h"
#include "common/avg_pool2d.h"
#include "device_common.cuh"

namespace cnnext {
namespace cuda {
namespace kernels {
namespace avg_pool2d_detail {

// Whether a 4-D tensor of strides s is laid out channels-last (threads walk the
// channel dim fastest, so that neighbouring threads touch neighbouring memory).
inline bool channels_fastest(const Strides4& s) { return s.c < s.w; }

// Splits a linear index into (n, c, h, w) of a (N, C, H, W) tensor, w fastest
// (kChannelsLast false) or c fastest (true).

// The per-element bodies below are __host__ __device__: the kernels are thin loops
// around them, and tests/cuda_host/avg_pool2d_host.cu runs them on the host.

// Computes y element i (linear index in kChannelsLast order).
template <typename T, bool kChannelsLast>
CNNEXT_HD void forward_element(const AvgPool2dParams& a, const T* __restrict__ x,
                               const Strides4& xs, T* __restrict__ y, const Strides4& ys,
                               int64_t i) {
  using Acc = AccType<T>;
  using A = typename Acc::type;
  int64_t n, c, oh, ow, h0, h1, w0, w1;
  unravel<kChannelsLast>(i, a.p.C, a.p.OH, a.p.OW, &n, &c, &oh, &ow);
  const int64_t fh = avg_pool_window_h(a, oh, &h0, &h1);
  const int64_t fw = avg_pool_window_w(a, ow, &w0, &w1);
  const T* xp = x + n * xs.n + c * xs.c;
  A acc = A(0);
  for (int64_t ih = h0; ih < h1; ++ih)
    for (int64_t iw = w0; iw < w1; ++iw) acc += Acc::to(xp[ih * xs.h + iw * xs.w]);
  y[n * ys.n + c * ys.c + oh * ys.h + ow * ys.w] =
      Acc::from(acc / static_cast<A>(avg_pool_divisor(a, fh, fw)));
}

// Partial sum of plane (n, c) = `plane` (0 <= plane < N * C) of x over the elements
// j0, j0 + step, ... of the plane in row-major order: what lane j0 of a global-pooling
// warp adds up.
template <typename T>
CNNEXT_HD typename AccType<T>::type global_partial(const AvgPool2dParams& a,
                                                   const T* __restrict__ x, const Strides4& xs,
                                                   int64_t plane, int64_t j0, int64_t step) {
  using Acc = AccType<T>;
  const int64_t n = plane / a.p.C, c = plane % a.p.C;
  const T* xp = x + n * xs.n + c * xs.c;
  typename Acc::type acc = 0;
  for (int64_t j = j0; j < a.p.H * a.p.W; j += step)
    acc += Acc::to(xp[(j / a.p.W) * xs.h + (j % a.p.W) * xs.w]);
  return acc;
}

// Writes output (plane, 0, 0) of global pooling from the sum of its plane.
template <typename T>
CNNEXT_HD void global_store(const AvgPool2dParams& a, typename AccType<T>::type sum, int64_t plane,
                            T* __restrict__ y, const Strides4& ys) {
  using A = typename AccType<T>::type;
  const int64_t n = plane / a.p.C, c = plane % a.p.C;
  y[n * ys.n + c * ys.c] =
      AccType<T>::from(sum / static_cast<A>(avg_pool_divisor(a, a.p.H, a.p.W)));
}

// Computes grad_input element i (linear index in kChannelsLast order): the sum of
// grad_output / divisor over the windows containing it.
template <typename T, bool kChannelsLast>
CNNEXT_HD void backward_element(const AvgPool2dParams& a, const T* __restrict__ gy,
                                const Strides4& gys, T* __restrict__ gx, const Strides4& gxs,
                                int64_t i) {
  using Acc = AccType<T>;
  using A = typename Acc::type;
  const Pool2dParams& p = a.p;
  int64_t n, c, ih, iw, oh0, oh1, ow0, ow1;
  unravel<kChannelsLast>(i, p.C, p.H, p.W, &n, &c, &ih, &iw);
  avg_pool_windows_containing(a, ih, p.H, p.OH, p.KH, p.SH, p.PH, &oh0, &oh1);
  avg_pool_windows_containing(a, iw, p.W, p.OW, p.KW, p.SW, p.PW, &ow0, &ow1);
  const T* gp = gy + n * gys.n + c * gys.c;
  A acc = A(0);
  for (int64_t oh = oh0; oh < oh1; ++oh) {
    int64_t lo, hi;
    const int64_t fh = avg_pool_window_h(a, oh, &lo, &hi);
    for (int64_t ow = ow0; ow < ow1; ++ow) {
      const int64_t fw = avg_pool_window_w(a, ow, &lo, &hi);
      acc += Acc::to(gp[oh * gys.h + ow * gys.w]) / static_cast<A>(avg_pool_divisor(a, fh, fw));
    }
  }
  gx[n * gxs.n + c * gxs.c + ih * gxs.h + iw * gxs.w] = Acc::from(acc);
}

// Whether output (0, 0) is the only one and its window the whole plane.
inline bool is_global(const AvgPool2dParams& a) {
  if (a.p.OH != 1 || a.p.OW != 1) return false;
  int64_t h0, h1, w0, w1;
  avg_pool_window_h(a, 0, &h0, &h1);
  avg_pool_window_w(a, 0, &w0, &w1);
  return h0 == 0 && h1 == a.p.H && w0 == 0 && w1 == a.p.W;
}

template <typename T, bool kChannelsLast>
__global__ void forward_kernel(AvgPool2dParams a, const T* __restrict__ x, Strides4 xs,
                               T* __restrict__ y, Strides4 ys, int64_t total) {
  for (int64_t i = grid_first(); i < total; i += grid_step())
    forward_element<T, kChannelsLast>(a, x, xs, y, ys, i);
}

// One warp per plane; blockDim.x a multiple of 32.
template <typename T>
__global__ void global_forward_kernel(AvgPool2dParams a, const T* __restrict__ x, Strides4 xs,
                                      T* __restrict__ y, Strides4 ys, int64_t planes) {
  const int64_t warps = grid_step() / 32;
  const int lane = threadIdx.x & 31;
  for (int64_t plane = grid_first() / 32; plane < planes; plane += warps) {
    auto v = global_partial<T>(a, x, xs, plane, lane, 32);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0) global_store<T>(a, v, plane, y, ys);
  }
}

template <typename T, bool kChannelsLast>
__global__ void backward_kernel(AvgPool2dParams a, const T* __restrict__ gy, Strides4 gys,
                                T* __restrict__ gx, Strides4 gxs, int64_t total) {
  for (int64_t i = grid_first(); i < total; i += grid_step())
    backward_element<T, kChannelsLast>(a, gy, gys, gx, gxs, i);
}

}  // namespace avg_pool2d_detail

cudaError_t avg_pool2d_forward(const AvgPool2dParams& a, DType dt, const void* x, Strides4 xs,
                               void* y, Strides4 ys, cudaStream_t stream) {
  using namespace avg_pool2d_detail;
  const int64_t total = a.p.N * a.p.C * a.p.OH * a.p.OW;
  if (total == 0) return cudaSuccess;
  const bool cl = channels_fastest(xs);
  const bool warp_per_plane = is_global(a) && !cl && a.p.H * a.p.W >= 32;
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x);
    T* yp = static_cast<T*>(y);
    if (warp_per_plane) {
      global_forward_kernel<T><<<grid_size(total * 32), kThreads, 0, stream>>>(a, xp, xs, yp, ys,
                                                                               total);
    } else if (channels_fastest(ys)) {
      forward_kernel<T, true><<<grid_size(total), kThreads, 0, stream>>>(a, xp, xs, yp, ys, total);
    } else {
      forward_kernel<T, false><<<grid_size(total), kThreads, 0, stream>>>(a, xp, xs, yp, ys, total);
    }
    return cudaGetLastError();
  });
}

cudaError_t avg_pool2d_backward(const AvgPool2dParams& a, DType dt, const void* gy, Strides4 gys,
                                void* gx, Strides4 gxs, cudaStream_t stream) {
  using namespace avg_pool2d_detail;
  const int64_t total = a.p.N * a.p.C * a.p.H * a.p.W;
  if (total == 0) return cudaSuccess;
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const T* gyp = static_cast<const T*>(gy);
    T* gxp = static_cast<T*>(gx);
    if (channels_fastest(gxs)) {
      backward_kernel<T, true><<<grid_size(total), kThreads, 0, stream>>>(a, gyp, gys, gxp, gxs, total);
    } else {
      backward_kernel<T, false><<<grid_size(total), kThreads, 0, stream>>>(a, gyp, gys, gxp, gxs, total);
    }
    return cudaGetLastError();
  });
}

}  // namespace kernels
}  // namespace cuda
}  // namespace cnnext
