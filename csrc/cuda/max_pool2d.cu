// max_pool2d and max_unpool2d on CUDA: one thread per output element, reading and
// writing through strides; the kernels are thin grid-stride loops around the
// __host__ __device__ per-element bodies below (tests/cuda_host/max_pool2d_host.cu
// runs those on the CPU).
//
//   forward          one thread per output element: torch's scan (max_pool_takes).
//   backward         GATHER, no atomics: one thread per grad_input element sums, in tap
//                    order, grad_output over the windows that contain it and chose it.
//                    Deterministic.
//   gather_planes    one thread per output element: src at its index (max_pool2d_select,
//                    max_unpool2d_backward); a bad index is reported through `bad`.
//   max_unpool2d     one thread per input element scatters it; a bad index is reported.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/conv2d.h"
#include "common/pool2d.h"
#include "device_common.cuh"
#include "max_pool2d.h"

namespace cnnext {
namespace cuda {
namespace kernels {
namespace {

bool channels_fastest_mp(const Strides4& s) { return s.c < s.w; }


template <typename T>
CNNEXT_HD bool is_nan_acc(T v) { return v != v; }

// Output element i (linear, in kChannelsLast order) of max pooling.
template <typename T, bool kChannelsLast>
CNNEXT_HD void max_pool_forward_element(const Pool2dParams& p, const T* __restrict__ x,
                                        const Strides4& xs, T* __restrict__ y, const Strides4& ys,
                                        int64_t* __restrict__ yi, const Strides4& is, int64_t i) {
  using Acc = AccType<T>;
  using A = typename Acc::type;
  int64_t n, c, oh, ow;
  unravel<kChannelsLast>(i, p.C, p.OH, p.OW, &n, &c, &oh, &ow);
  int64_t hlo, hhi, wlo, whi;
  max_window(oh, p.H, p.KH, p.SH, p.PH, p.DH, &hlo, &hhi);
  max_window(ow, p.W, p.KW, p.SW, p.PW, p.DW, &wlo, &whi);
  const T* xp = x + n * xs.n + c * xs.c;
  A best = -A(INFINITY);
  T best_t = Acc::from(best);
  int64_t best_i = hlo * p.W + wlo;
  for (int64_t ih = hlo; ih < hhi; ih += p.DH) {
    for (int64_t iw = wlo; iw < whi; iw += p.DW) {
      const T v = xp[ih * xs.h + iw * xs.w];
      const A a = Acc::to(v);
      if (max_pool_takes(a, best)) {
        best = a;
        best_t = v;
        best_i = ih * p.W + iw;
      }
    }
  }
  y[n * ys.n + c * ys.c + oh * ys.h + ow * ys.w] = best_t;
  yi[n * is.n + c * is.c + oh * is.h + ow * is.w] = best_i;
}

// grad_input element i (linear, in kChannelsLast order): the gather.
template <typename T, bool kChannelsLast>
CNNEXT_HD void max_pool_backward_element(const Pool2dParams& p, const T* __restrict__ gy,
                                         const Strides4& gys, const int64_t* __restrict__ idx,
                                         const Strides4& is, T* __restrict__ gx,
                                         const Strides4& gxs, int64_t i) {
  using Acc = AccType<T>;
  using A = typename Acc::type;
  int64_t n, c, ih, iw;
  unravel<kChannelsLast>(i, p.C, p.H, p.W, &n, &c, &ih, &iw);
  const int64_t me = ih * p.W + iw;
  const T* gp = gy + n * gys.n + c * gys.c;
  const int64_t* ip = idx + n * is.n + c * is.c;
  A acc = A(0);
  for (int64_t kh = 0; kh < p.KH; ++kh) {
    int64_t oh;
    if (!conv_out_coord(ih, kh, p.SH, p.PH, p.DH, p.OH, &oh)) continue;
    for (int64_t kw = 0; kw < p.KW; ++kw) {
      int64_t ow;
      if (!conv_out_coord(iw, kw, p.SW, p.PW, p.DW, p.OW, &ow)) continue;
      if (ip[oh * is.h + ow * is.w] == me) acc += Acc::to(gp[oh * gys.h + ow * gys.w]);
    }
  }
  gx[n * gxs.n + c * gxs.c + ih * gxs.h + iw * gxs.w] = Acc::from(acc);
}

// Output element i of gather_planes (linear, in kChannelsLast order). Returns false
// (and writes zero) when its index lies outside the source plane; *bad_value gets it.
template <typename T, bool kChannelsLast>
CNNEXT_HD bool gather_element(const Pool2dParams* pool, const T* __restrict__ src,
                              const Strides4& ss, int64_t Hs, int64_t Ws,
                              const int64_t* __restrict__ idx, const Strides4& is, int64_t C,
                              int64_t h, int64_t w, T* __restrict__ out, const Strides4& os,
                              int64_t i, int64_t* bad_value) {
  int64_t n, c, oh, ow;
  unravel<kChannelsLast>(i, C, h, w, &n, &c, &oh, &ow);
  T v = AccType<T>::from(0);
  bool ok = true;
  const bool taps = pool == nullptr ||
                    (max_window_nonempty(oh, pool->H, pool->KH, pool->SH, pool->PH, pool->DH) &&
                     max_window_nonempty(ow, pool->W, pool->KW, pool->SW, pool->PW, pool->DW));
  if (taps) {
    const int64_t k = idx[n * is.n + c * is.c + oh * is.h + ow * is.w];
    if (k < 0 || k >= Hs * Ws) {
      ok = false;
      *bad_value = k;
    } else {
      v = src[n * ss.n + c * ss.c + (k / Ws) * ss.h + (k % Ws) * ss.w];
    }
  }
  out[n * os.n + c * os.c + oh * os.h + ow * os.w] = v;
  return ok;
}

// Input element i (linear, w fastest) of max_unpool2d: scatters it. Returns false when
// its index lies outside the output plane; *bad_value gets it.
template <typename T>
CNNEXT_HD bool unpool_element(const T* __restrict__ x, const Strides4& xs,
                              const int64_t* __restrict__ idx, const Strides4& is, int64_t C,
                              int64_t H, int64_t W, T* __restrict__ out, const Strides4& os,
                              int64_t OH, int64_t OW, int64_t i, int64_t* bad_value) {
  int64_t n, c, h, w;
  unravel<false>(i, C, H, W, &n, &c, &h, &w);
  const int64_t k = idx[n * is.n + c * is.c + h * is.h + w * is.w];
  if (k < 0 || k >= OH * OW) {
    *bad_value = k;
    return false;
  }
  out[n * os.n + c * os.c + (k / OW) * os.h + (k % OW) * os.w] = x[n * xs.n + c * xs.c + h * xs.h + w * xs.w];
  return true;
}

#if defined(__CUDACC__)
__device__ void report_bad(int64_t* bad, int64_t value) {
  auto* flag = reinterpret_cast<unsigned long long*>(bad);
  if (atomicCAS(flag, 0ull, 1ull) == 0ull) bad[1] = value;
}

template <typename T, bool CL>
__global__ void forward_kernel(Pool2dParams p, const T* x, Strides4 xs, T* y, Strides4 ys,
                               int64_t* yi, Strides4 is, int64_t total) {
  for (int64_t i = grid_first(); i < total; i += grid_step())
    max_pool_forward_element<T, CL>(p, x, xs, y, ys, yi, is, i);
}

template <typename T, bool CL>
__global__ void backward_kernel(Pool2dParams p, const T* gy, Strides4 gys, const int64_t* idx,
                                Strides4 is, T* gx, Strides4 gxs, int64_t total) {
  for (int64_t i = grid_first(); i < total; i += grid_step())
    max_pool_backward_element<T, CL>(p, gy, gys, idx, is, gx, gxs, i);
}

template <typename T, bool CL>
__global__ void gather_kernel(bool has_pool, Pool2dParams pool, const T* src, Strides4 ss,
                              int64_t Hs, int64_t Ws, const int64_t* idx, Strides4 is, int64_t C,
                              int64_t h, int64_t w, T* out, Strides4 os, int64_t* bad,
                              int64_t total) {
  for (int64_t i = grid_first(); i < total; i += grid_step()) {
    int64_t v = 0;
    if (!gather_element<T, CL>(has_pool ? &pool : nullptr, src, ss, Hs, Ws, idx, is, C, h, w,
                               out, os, i, &v))
      report_bad(bad, v);
  }
}

template <typename T>
__global__ void unpool_kernel(const T* x, Strides4 xs, const int64_t* idx, Strides4 is, int64_t C,
                              int64_t H, int64_t W, T* out, Strides4 os, int64_t OH, int64_t OW,
                              int64_t* bad, int64_t total) {
  for (int64_t i = grid_first(); i < total; i += grid_step()) {
    int64_t v = 0;
    if (!unpool_element<T>(x, xs, idx, is, C, H, W, out, os, OH, OW, i, &v)) report_bad(bad, v);
  }
}
#endif  // __CUDACC__

}  // namespace

#if defined(__CUDACC__)
cudaError_t max_pool2d_forward(const Pool2dParams& p, DType dt, const void* x, Strides4 xs,
                               void* y, Strides4 ys, int64_t* yi, Strides4 is,
                               cudaStream_t stream) {
  const int64_t total = p.N * p.C * p.OH * p.OW;
  if (total == 0) return cudaSuccess;
  const bool cl = channels_fastest_mp(ys);
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    if (cl)
      forward_kernel<T, true><<<grid_size(total), kThreads, 0, stream>>>(
          p, static_cast<const T*>(x), xs, static_cast<T*>(y), ys, yi, is, total);
    else
      forward_kernel<T, false><<<grid_size(total), kThreads, 0, stream>>>(
          p, static_cast<const T*>(x), xs, static_cast<T*>(y), ys, yi, is, total);
    return cudaGetLastError();
  });
}

cudaError_t max_pool2d_backward(const Pool2dParams& p, DType dt, const void* gy, Strides4 gys,
                                const int64_t* idx, Strides4 is, void* gx, Strides4 gxs,
                                cudaStream_t stream) {
  const int64_t total = p.N * p.C * p.H * p.W;
  if (total == 0) return cudaSuccess;
  const bool cl = channels_fastest_mp(gxs);
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    if (cl)
      backward_kernel<T, true><<<grid_size(total), kThreads, 0, stream>>>(
          p, static_cast<const T*>(gy), gys, idx, is, static_cast<T*>(gx), gxs, total);
    else
      backward_kernel<T, false><<<grid_size(total), kThreads, 0, stream>>>(
          p, static_cast<const T*>(gy), gys, idx, is, static_cast<T*>(gx), gxs, total);
    return cudaGetLastError();
  });
}

cudaError_t gather_planes(const Pool2dParams* pool, DType dt, const void* src, Strides4 ss,
                          int64_t Hs, int64_t Ws, const int64_t* idx, Strides4 is, int64_t N,
                          int64_t C, int64_t h, int64_t w, void* out, Strides4 os,
                          int64_t* bad, cudaStream_t stream) {
  const int64_t total = N * C * h * w;
  if (total == 0) return cudaSuccess;
  const bool cl = channels_fastest_mp(os);
  const Pool2dParams pp = pool != nullptr ? *pool : Pool2dParams{};
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    if (cl)
      gather_kernel<T, true><<<grid_size(total), kThreads, 0, stream>>>(
          pool != nullptr, pp, static_cast<const T*>(src), ss, Hs, Ws, idx, is, C, h, w,
          static_cast<T*>(out), os, bad, total);
    else
      gather_kernel<T, false><<<grid_size(total), kThreads, 0, stream>>>(
          pool != nullptr, pp, static_cast<const T*>(src), ss, Hs, Ws, idx, is, C, h, w,
          static_cast<T*>(out), os, bad, total);
    return cudaGetLastError();
  });
}

cudaError_t max_unpool2d(DType dt, const void* x, Strides4 xs, const int64_t* idx, Strides4 is,
                         int64_t N, int64_t C, int64_t H, int64_t W, void* out, Strides4 os,
                         int64_t OH, int64_t OW, int64_t* bad, cudaStream_t stream) {
  const int64_t total = N * C * H * W;
  if (total == 0 || OH * OW == 0) return cudaSuccess;
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    unpool_kernel<T><<<grid_size(total), kThreads, 0, stream>>>(
        static_cast<const T*>(x), xs, idx, is, C, H, W, static_cast<T*>(out), os, OH, OW, bad,
        total);
    return cudaGetLastError();
  });
}
#endif  // __CUDACC__

}  // namespace kernels
}  // namespace cuda
}  // namespace cnnext
