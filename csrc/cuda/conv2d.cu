// conv2d on CUDA: direct kernels, one output value per thread (or per block for the
// reductions), reading and writing every tensor through its strides.
//
//   forward          one thread per y element: loop over the taps and the group's
//                    input channels (conv_in_coord).
//   input backward   gather: one thread per grad_input element, loop over the taps and
//                    the group's output channels that read it (conv_out_coord). No
//                    atomics: each element is written once, by one thread.
//   weight backward  one block per grad_weight element: a block reduction over the
//                    (n, oh, ow) positions whose tap lands on real input.
//   channel_sum      one block per channel: a block reduction over (n, h, w).
//   add_channel_bias one thread per element: t[n, c, h, w] += bias[c] (the bias of the
//                    transposed convolution, whose main part is input backward).
//
// Every sum is taken in a fixed order, so results are bitwise reproducible.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/conv2d.h"
#include "conv2d.h"
#include "device_common.cuh"

namespace cnnext {
namespace cuda {
namespace kernels {
namespace {

// Whether a 4-D tensor of strides s is laid out channels-last, i.e. threads should
// walk the channel dim fastest so that neighbouring threads write neighbouring memory.
bool channels_fastest(const Strides4& s) { return s.c < s.w; }

// Splits a linear index into (n, c, h, w) of a (N, C, H, W) tensor, with w fastest
// (kChannelsLast false) or c fastest (true).

// The per-element bodies below are __host__ __device__: the kernels are thin loops
// around them, and a host harness can run them without a GPU.

// Computes y element i (linear index in kChannelsLast order); with relu, max(y, 0)
// (NaN stays NaN).
template <typename T, bool kChannelsLast>
CNNEXT_HD void forward_element(const Conv2dParams& p, const T* __restrict__ x, const Strides4& xs,
                               const T* __restrict__ w, const T* __restrict__ bias,
                               T* __restrict__ y, const Strides4& ys, int64_t i,
                               bool relu = false) {
  using Acc = AccType<T>;
  using A = typename Acc::type;
  const int64_t Cg = p.in_per_group(), Og = p.out_per_group();
  const int64_t taps = p.KH * p.KW;
  int64_t n, o, oh, ow;
  unravel<kChannelsLast>(i, p.O, p.OH, p.OW, &n, &o, &oh, &ow);
  const int64_t g = o / Og;
  const T* xg = x + n * xs.n + g * Cg * xs.c;  // first input channel of the group
  const T* wo = w + o * Cg * taps;               // w[o][0][0][0]
  A acc = bias != nullptr ? Acc::to(bias[o]) : A(0);
  for (int64_t kh = 0; kh < p.KH; ++kh) {
    const int64_t ih = conv_in_coord(oh, kh, p.SH, p.PH, p.DH);
    if (ih < 0 || ih >= p.H) continue;
    for (int64_t kw = 0; kw < p.KW; ++kw) {
      const int64_t iw = conv_in_coord(ow, kw, p.SW, p.PW, p.DW);
      if (iw < 0 || iw >= p.W) continue;
      const T* xp = xg + ih * xs.h + iw * xs.w;
      const T* wp = wo + kh * p.KW + kw;
      for (int64_t c = 0; c < Cg; ++c) acc += Acc::to(xp[c * xs.c]) * Acc::to(wp[c * taps]);
    }
  }
  if (relu && acc < A(0)) acc = A(0);
  y[n * ys.n + o * ys.c + oh * ys.h + ow * ys.w] = Acc::from(acc);
}

// Computes grad_input element i (linear index in kChannelsLast order): the sum over
// the taps and the group's output channels whose window reads it.
template <typename T, bool kChannelsLast>
CNNEXT_HD void input_backward_element(const Conv2dParams& p, const T* __restrict__ gy,
                                      const Strides4& gys, const T* __restrict__ w,
                                      T* __restrict__ gx, const Strides4& gxs, int64_t i) {
  using Acc = AccType<T>;
  using A = typename Acc::type;
  const int64_t Cg = p.in_per_group(), Og = p.out_per_group();
  const int64_t taps = p.KH * p.KW;
  const int64_t w_step = Cg * taps;  // from w[o][cg][kh][kw] to w[o + 1][cg][kh][kw]
  int64_t n, c, ih, iw;
  unravel<kChannelsLast>(i, p.C, p.H, p.W, &n, &c, &ih, &iw);
  const int64_t g = c / Cg, cg = c - g * Cg;
  const T* gyg = gy + n * gys.n + g * Og * gys.c;  // first output channel of the group
  const T* wg = w + (g * Og * Cg + cg) * taps;     // w[g * Og][cg][0][0]
  A acc = A(0);
  for (int64_t kh = 0; kh < p.KH; ++kh) {
    int64_t oh;
    if (!conv_out_coord(ih, kh, p.SH, p.PH, p.DH, p.OH, &oh)) continue;
    for (int64_t kw = 0; kw < p.KW; ++kw) {
      int64_t ow;
      if (!conv_out_coord(iw, kw, p.SW, p.PW, p.DW, p.OW, &ow)) continue;
      const T* gp = gyg + oh * gys.h + ow * gys.w;
      const T* wp = wg + kh * p.KW + kw;
      for (int64_t oc = 0; oc < Og; ++oc) acc += Acc::to(gp[oc * gys.c]) * Acc::to(wp[oc * w_step]);
    }
  }
  gx[n * gxs.n + c * gxs.c + ih * gxs.h + iw * gxs.w] = Acc::from(acc);
}

// Partial sum, over the terms j0, j0 + step, ..., of grad_weight element
// e = ((o * Cg + cg) * KH + kh) * KW + kw: the products gy[n, o, oh, ow] *
// x[n, c, ih, iw] over the (n, oh, ow) whose tap (kh, kw) reads real input.
template <typename T>
CNNEXT_HD typename AccType<T>::type weight_backward_partial(
    const Conv2dParams& p, const T* __restrict__ gy, const Strides4& gys, const T* __restrict__ x,
    const Strides4& xs, int64_t e, int64_t j0, int64_t step) {
  using Acc = AccType<T>;
  using A = typename Acc::type;
  const int64_t Cg = p.in_per_group(), Og = p.out_per_group();
  int64_t r = e;
  const int64_t kw = r % p.KW;
  r /= p.KW;
  const int64_t kh = r % p.KH;
  r /= p.KH;
  const int64_t cg = r % Cg;
  const int64_t o = r / Cg;
  const int64_t c = (o / Og) * Cg + cg;
  int64_t oh0, oh1, ow0, ow1;
  conv_valid_out_range(kh, p.H, p.SH, p.PH, p.DH, p.OH, &oh0, &oh1);
  conv_valid_out_range(kw, p.W, p.SW, p.PW, p.DW, p.OW, &ow0, &ow1);
  const int64_t rows = oh1 - oh0, cols = ow1 - ow0;
  const int64_t count = p.N * rows * cols;
  const T* gyo = gy + o * gys.c;
  const T* xc = x + c * xs.c;
  A acc = A(0);
  for (int64_t j = j0; j < count; j += step) {
    int64_t q = j;
    const int64_t ow = ow0 + q % cols;
    q /= cols;
    const int64_t oh = oh0 + q % rows;
    const int64_t n = q / rows;
    const int64_t ih = conv_in_coord(oh, kh, p.SH, p.PH, p.DH);
    const int64_t iw = conv_in_coord(ow, kw, p.SW, p.PW, p.DW);
    acc += Acc::to(gyo[n * gys.n + oh * gys.h + ow * gys.w]) *
           Acc::to(xc[n * xs.n + ih * xs.h + iw * xs.w]);
  }
  return acc;
}

// Partial sum, over the terms j0, j0 + step, ..., of channel c of t (N, C, H, W)
// summed over (n, h, w).
template <typename T>
CNNEXT_HD typename AccType<T>::type channel_sum_partial(const T* __restrict__ t, int64_t N,
                                                        int64_t H, int64_t W, const Strides4& ts,
                                                        int64_t c, int64_t j0, int64_t step) {
  using Acc = AccType<T>;
  using A = typename Acc::type;
  const int64_t count = N * H * W;
  const T* tc = t + c * ts.c;
  A acc = A(0);
  for (int64_t j = j0; j < count; j += step) {
    int64_t q = j;
    const int64_t w = q % W;
    q /= W;
    const int64_t h = q % H;
    const int64_t n = q / H;
    acc += Acc::to(tc[n * ts.n + h * ts.h + w * ts.w]);
  }
  return acc;
}

// Adds bias[c] to element i (linear index in kChannelsLast order) of t (N, C, H, W).
template <typename T, bool kChannelsLast>
CNNEXT_HD void add_bias_element(T* __restrict__ t, int64_t C, int64_t H, int64_t W,
                                const Strides4& ts, const T* __restrict__ bias, int64_t i) {
  using Acc = AccType<T>;
  int64_t n, c, h, w;
  unravel<kChannelsLast>(i, C, H, W, &n, &c, &h, &w);
  T* e = t + n * ts.n + c * ts.c + h * ts.h + w * ts.w;
  *e = Acc::from(Acc::to(*e) + Acc::to(bias[c]));
}

template <typename T, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads)
    conv2d_forward_kernel(const Conv2dParams p, const T* __restrict__ x, const Strides4 xs,
                          const T* __restrict__ w, const T* __restrict__ bias, T* __restrict__ y,
                          const Strides4 ys, const int64_t total, const bool relu) {
  for (int64_t i = grid_first(); i < total; i += grid_step())
    forward_element<T, kChannelsLast>(p, x, xs, w, bias, y, ys, i, relu);
}

template <typename T, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads)
    conv2d_input_backward_kernel(const Conv2dParams p, const T* __restrict__ gy, const Strides4 gys,
                                 const T* __restrict__ w, T* __restrict__ gx, const Strides4 gxs,
                                 const int64_t total) {
  for (int64_t i = grid_first(); i < total; i += grid_step())
    input_backward_element<T, kChannelsLast>(p, gy, gys, w, gx, gxs, i);
}

// One block per grad_weight element (blocks stride over elements when there are more
// elements than blocks); the threads of the block split its sum.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    conv2d_weight_backward_kernel(const Conv2dParams p, const T* __restrict__ gy,
                                  const Strides4 gys, const T* __restrict__ x, const Strides4 xs,
                                  T* __restrict__ gw, const int64_t total) {
  for (int64_t e = blockIdx.x; e < total; e += gridDim.x) {
    const auto acc = block_sum(weight_backward_partial<T>(p, gy, gys, x, xs, e, threadIdx.x, blockDim.x));
    if (threadIdx.x == 0) gw[e] = AccType<T>::from(acc);
  }
}

// One block per channel (blocks stride over channels when there are more channels
// than blocks); the threads of the block split its sum.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    channel_sum_kernel(const T* __restrict__ t, const int64_t N, const int64_t C, const int64_t H,
                       const int64_t W, const Strides4 ts, T* __restrict__ out) {
  for (int64_t c = blockIdx.x; c < C; c += gridDim.x) {
    const auto acc = block_sum(channel_sum_partial<T>(t, N, H, W, ts, c, threadIdx.x, blockDim.x));
    if (threadIdx.x == 0) out[c] = AccType<T>::from(acc);
  }
}

template <typename T, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads)
    add_channel_bias_kernel(T* __restrict__ t, const int64_t C, const int64_t H, const int64_t W,
                            const Strides4 ts, const T* __restrict__ bias, const int64_t total) {
  for (int64_t i = grid_first(); i < total; i += grid_step())
    add_bias_element<T, kChannelsLast>(t, C, H, W, ts, bias, i);
}

}  // namespace

cudaError_t conv2d_forward(const Conv2dParams& p, DType dt, const void* x, Strides4 xs,
                           const void* w, const void* bias, void* y, Strides4 ys,
                           cudaStream_t stream, bool relu) {
  const int64_t total = p.N * p.O * p.OH * p.OW;
  if (total == 0) return cudaSuccess;
  const bool cl = channels_fastest(ys);
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x);
    const T* wp = static_cast<const T*>(w);
    const T* bp = static_cast<const T*>(bias);
    T* yp = static_cast<T*>(y);
    if (cl) {
      conv2d_forward_kernel<T, true>
          <<<grid_size(total), kThreads, 0, stream>>>(p, xp, xs, wp, bp, yp, ys, total, relu);
    } else {
      conv2d_forward_kernel<T, false>
          <<<grid_size(total), kThreads, 0, stream>>>(p, xp, xs, wp, bp, yp, ys, total, relu);
    }
    return cudaGetLastError();
  });
}

cudaError_t conv2d_input_backward(const Conv2dParams& p, DType dt, const void* gy, Strides4 gys,
                                  const void* w, void* gx, Strides4 gxs, cudaStream_t stream) {
  const int64_t total = p.N * p.C * p.H * p.W;
  if (total == 0) return cudaSuccess;
  const bool cl = channels_fastest(gxs);
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const T* gyp = static_cast<const T*>(gy);
    const T* wp = static_cast<const T*>(w);
    T* gxp = static_cast<T*>(gx);
    if (cl) {
      conv2d_input_backward_kernel<T, true>
          <<<grid_size(total), kThreads, 0, stream>>>(p, gyp, gys, wp, gxp, gxs, total);
    } else {
      conv2d_input_backward_kernel<T, false>
          <<<grid_size(total), kThreads, 0, stream>>>(p, gyp, gys, wp, gxp, gxs, total);
    }
    return cudaGetLastError();
  });
}

cudaError_t conv2d_weight_backward(const Conv2dParams& p, DType dt, const void* gy,
                                   Strides4 gys, const void* x, Strides4 xs, void* gw,
                                   cudaStream_t stream) {
  const int64_t total = p.O * p.in_per_group() * p.KH * p.KW;
  if (total == 0) return cudaSuccess;
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    conv2d_weight_backward_kernel<T><<<grid_size(total, 1), kThreads, 0, stream>>>(
        p, static_cast<const T*>(gy), gys, static_cast<const T*>(x), xs, static_cast<T*>(gw),
        total);
    return cudaGetLastError();
  });
}

cudaError_t channel_sum(DType dt, const void* t, int64_t N, int64_t C, int64_t H, int64_t W,
                        Strides4 ts, void* out, cudaStream_t stream) {
  if (C == 0) return cudaSuccess;
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    channel_sum_kernel<T><<<grid_size(C, 1), kThreads, 0, stream>>>(
        static_cast<const T*>(t), N, C, H, W, ts, static_cast<T*>(out));
    return cudaGetLastError();
  });
}

cudaError_t add_channel_bias(DType dt, void* t, int64_t N, int64_t C, int64_t H, int64_t W,
                             Strides4 ts, const void* bias, cudaStream_t stream) {
  const int64_t total = N * C * H * W;
  if (total == 0) return cudaSuccess;
  const bool cl = channels_fastest(ts);
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    T* tp = static_cast<T*>(t);
    const T* bp = static_cast<const T*>(bias);
    if (cl) {
      add_channel_bias_kernel<T, true>
          <<<grid_size(total), kThreads, 0, stream>>>(tp, C, H, W, ts, bp, total);
    } else {
      add_channel_bias_kernel<T, false>
          <<<grid_size(total), kThreads, 0, stream>>>(tp, C, H, W, ts, bp, total);
    }
    return cudaGetLastError();
  });
}

}  // namespace kernels
}  // namespace cuda
}  // namespace cnnext
