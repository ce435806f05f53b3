// Average pooling and adaptive average pooling on the CPU, forward and backward.
//
// Both ops reduce to per-dimension tables computed once per call: for each output
// row (column) the input range its window sums and its divisor factor, and for each
// output position 1 / divisor. The loops then depend on the layout of the tensor
// they write:
//   contiguous (NCHW)  one (n, c) plane per work item. Forward sums the window's
//                      input rows into a row buffer (vectorised along W), then each
//                      output adds its columns of the buffer. Backward zeroes the
//                      plane and, per output row, spreads grad / divisor along a row
//                      buffer and adds that buffer to the window's input rows: a
//                      scatter, but within one plane owned by one thread, in a fixed
//                      order, so the result is deterministic.
//   channels_last      one (n, output row) per item (forward) or (n, input row)
//                      (backward, a gather over the windows containing each pixel:
//                      avg_pool_windows_containing); the innermost loop runs over
//                      channels, contiguous in memory.
//   global pooling     (one window covering the whole plane: adaptive 1x1, or a
//                      kernel the size of an unpadded input) has its own loops: a
//                      plane sum (NCHW) or a sum of pixel vectors (channels_last),
//                      and a broadcast for the backward.
// Every tensor is read through its strides; the output is allocated in the layout the
// op asked for. float32 accumulates in float (as torch's CPU kernels do): each sum has
// at most a window's terms, or for global pooling the plane's terms spread over vector
// lanes; float64 in double.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "ops/avg_pool2d.h"
#include "ops/tensors.h"

namespace cnnext {
namespace cpu {
namespace {

// Elements of work below which a parallel region costs more than it saves.
constexpr int64_t kGrainElems = 32768;

int64_t grain_for(int64_t elems_per_item) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, elems_per_item));
}

// Windows and divisors of one call (see csrc/common/avg_pool2d.h).
template <typename T>
struct Windows {
  std::vector<int64_t> hlo, hhi, wlo, whi;  // input range of each output row / column
  std::vector<T> inv;                       // 1 / divisor of each output, OH x OW
  bool global = false;                      // a single window covering the whole plane
  bool w_regular = false;                   // every column window is [ow * SW, ow * SW + KW)

  explicit Windows(const AvgPool2dParams& a) {
    const Pool2dParams& p = a.p;
    hlo.resize(p.OH); hhi.resize(p.OH); wlo.resize(p.OW); whi.resize(p.OW);
    std::vector<int64_t> fh(p.OH), fw(p.OW);
    for (int64_t oh = 0; oh < p.OH; ++oh) fh[oh] = avg_pool_window_h(a, oh, &hlo[oh], &hhi[oh]);
    for (int64_t ow = 0; ow < p.OW; ++ow) fw[ow] = avg_pool_window_w(a, ow, &wlo[ow], &whi[ow]);
    inv.resize(p.OH * p.OW);
    for (int64_t oh = 0; oh < p.OH; ++oh)
      for (int64_t ow = 0; ow < p.OW; ++ow)
        inv[oh * p.OW + ow] = static_cast<T>(1.0 / static_cast<double>(avg_pool_divisor(a, fh[oh], fw[ow])));
    global = p.OH == 1 && p.OW == 1 && hlo[0] == 0 && hhi[0] == p.H && wlo[0] == 0 && whi[0] == p.W;
    w_regular = !a.adaptive;
    for (int64_t ow = 0; ow < p.OW && w_regular; ++ow)
      w_regular = wlo[ow] == ow * p.SW && whi[ow] == ow * p.SW + p.KW;
  }
};

// dst[0, n) += src[0, n) (src through stride ss).
template <typename T>
inline void row_add(T* __restrict__ dst, const T* __restrict__ src, int64_t ss, int64_t n) {
  if (ss == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] += src[i * ss];
  }
}

template <typename T>
inline void row_copy(T* __restrict__ dst, const T* __restrict__ src, int64_t ss, int64_t n) {
  if (ss == 1) {
    std::memcpy(dst, src, sizeof(T) * n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i * ss];
  }
}

// Sum of a (rows x cols) block read through strides (rs, cs); lanes of partial sums
// when the columns are contiguous.
template <typename T>
inline T block_sum(const T* x, int64_t rows, int64_t cols, int64_t rs, int64_t cs) {
  if (cs == 1 && rs == cols) {
    const int64_t n = rows * cols;
    constexpr int64_t L = 16;
    T lane[L] = {};
    int64_t i = 0;
    for (; i + L <= n; i += L)
      for (int64_t l = 0; l < L; ++l) lane[l] += x[i + l];
    T s = 0;
    for (; i < n; ++i) s += x[i];
    for (int64_t l = 0; l < L; ++l) s += lane[l];
    return s;
  }
  T s = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) s += x[r * rs + c * cs];
  return s;
}

// ---------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------

// One (n, c) plane into a contiguous output plane y (OH x OW).
template <typename T>
void forward_plane(const AvgPool2dParams& a, const Windows<T>& win, const T* x, int64_t xh,
                   int64_t xw, T* y, T* rb, T* acc) {
  const Pool2dParams& p = a.p;
  if (win.global) {
    y[0] = block_sum(x, p.H, p.W, xh, xw) * win.inv[0];
    return;
  }
  for (int64_t oh = 0; oh < p.OH; ++oh) {
    const int64_t h0 = win.hlo[oh], h1 = win.hhi[oh];
    row_copy(rb, x + h0 * xh, xw, p.W);
    for (int64_t ih = h0 + 1; ih < h1; ++ih) row_add(rb, x + ih * xh, xw, p.W);
    T* yr = y + oh * p.OW;
    const T* inv = win.inv.data() + oh * p.OW;
    if (win.w_regular) {
      const int64_t SW = p.SW;
      if (p.KW == 2 && SW == 2) {
        for (int64_t ow = 0; ow < p.OW; ++ow) yr[ow] = (rb[2 * ow] + rb[2 * ow + 1]) * inv[ow];
        continue;
      }
      for (int64_t ow = 0; ow < p.OW; ++ow) acc[ow] = rb[ow * SW];
      for (int64_t kw = 1; kw < p.KW; ++kw)
        for (int64_t ow = 0; ow < p.OW; ++ow) acc[ow] += rb[ow * SW + kw];
      for (int64_t ow = 0; ow < p.OW; ++ow) yr[ow] = acc[ow] * inv[ow];
    } else {
      for (int64_t ow = 0; ow < p.OW; ++ow) {
        T s = 0;
        for (int64_t iw = win.wlo[ow]; iw < win.whi[ow]; ++iw) s += rb[iw];
        yr[ow] = s * inv[ow];
      }
    }
  }
}

template <typename T>
void forward_nchw(const AvgPool2dParams& a, const Windows<T>& win, const at::Tensor& input,
                  at::Tensor& out) {
  const Pool2dParams& p = a.p;
  const Strides4 xs = strides_of(input);
  const T* x = input.const_data_ptr<T>();
  T* y = out.mutable_data_ptr<T>();
  const int64_t per_item = p.H * p.W + p.OH * p.OW;
  at::parallel_for(0, p.N * p.C, grain_for(per_item), [&](int64_t b, int64_t e) {
    std::vector<T> rb(p.W), acc(p.OW);
    for (int64_t item = b; item < e; ++item) {
      const int64_t n = item / p.C, c = item % p.C;
      forward_plane(a, win, x + n * xs.n + c * xs.c, xs.h, xs.w, y + item * p.OH * p.OW,
                    rb.data(), acc.data());
    }
  });
}

// out[c] = scale * sum over the pixels (ih, iw) of rows [h0, h1), columns [w0, w1) of
// x[ih, iw, c] for c in [0, C); x points at channel 0 of pixel (0, 0) of one sample.
template <typename T>
inline void window_channels(const T* x, const Strides4& xs, int64_t h0, int64_t h1, int64_t w0,
                            int64_t w1, int64_t C, T scale, T* __restrict__ acc,
                            T* __restrict__ out, int64_t os) {
  std::fill(acc, acc + C, T(0));
  for (int64_t ih = h0; ih < h1; ++ih)
    for (int64_t iw = w0; iw < w1; ++iw) row_add(acc, x + ih * xs.h + iw * xs.w, xs.c, C);
  if (os == 1) {
    for (int64_t c = 0; c < C; ++c) out[c] = acc[c] * scale;
  } else {
    for (int64_t c = 0; c < C; ++c) out[c * os] = acc[c] * scale;
  }
}

// Channels-last output: one (n, output row, channel block) per item.
template <typename T>
void forward_channels_last(const AvgPool2dParams& a, const Windows<T>& win,
                           const at::Tensor& input, at::Tensor& out) {
  const Pool2dParams& p = a.p;
  const Strides4 xs = strides_of(input), ys = strides_of(out);
  const T* x = input.const_data_ptr<T>();
  T* y = out.mutable_data_ptr<T>();
  constexpr int64_t CB = 1024;  // channels per item: the accumulators stay in L1
  const int64_t cblocks = (p.C + CB - 1) / CB;
  const int64_t window_elems = p.OW * std::max<int64_t>(1, (p.H * p.W) / std::max<int64_t>(1, p.OH * p.OW));
  const int64_t per_item = std::min(p.C, CB) * (window_elems + p.OW);
  at::parallel_for(0, p.N * p.OH * cblocks, grain_for(per_item), [&](int64_t b, int64_t e) {
    std::vector<T> acc(std::min(p.C, CB));
    for (int64_t item = b; item < e; ++item) {
      const int64_t cb = item % cblocks, row = item / cblocks;
      const int64_t n = row / p.OH, oh = row % p.OH;
      const int64_t c0 = cb * CB, nc = std::min(CB, p.C - c0);
      const T* xn = x + n * xs.n + c0 * xs.c;
      for (int64_t ow = 0; ow < p.OW; ++ow) {
        window_channels(xn, xs, win.hlo[oh], win.hhi[oh], win.wlo[ow], win.whi[ow], nc,
                        win.inv[oh * p.OW + ow], acc.data(),
                        y + n * ys.n + c0 * ys.c + oh * ys.h + ow * ys.w, ys.c);
      }
    }
  });
}

// ---------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------

// One (n, c) plane of grad_input, contiguous (H x W), from grad_output's plane g read
// through strides (gh, gw): zero it, then add each output row's spread-out gradient.
template <typename T>
void backward_plane(const AvgPool2dParams& a, const Windows<T>& win, const T* g, int64_t gh,
                    int64_t gw, T* gx, T* rb) {
  const Pool2dParams& p = a.p;
  if (win.global) {
    const T v = g[0] * win.inv[0];
    std::fill(gx, gx + p.H * p.W, v);
    return;
  }
  std::fill(gx, gx + p.H * p.W, T(0));
  for (int64_t oh = 0; oh < p.OH; ++oh) {
    const T* gr = g + oh * gh;
    const T* inv = win.inv.data() + oh * p.OW;
    if (win.w_regular && p.KW == p.SW) {
      // Non-overlapping columns tiling [0, OW * KW): each buffer entry written once.
      const int64_t K = p.KW;
      for (int64_t ow = 0; ow < p.OW; ++ow) {
        const T v = gr[ow * gw] * inv[ow];
        for (int64_t k = 0; k < K; ++k) rb[ow * K + k] = v;
      }
      std::fill(rb + p.OW * K, rb + p.W, T(0));
    } else {
      std::fill(rb, rb + p.W, T(0));
      for (int64_t ow = 0; ow < p.OW; ++ow) {
        const T v = gr[ow * gw] * inv[ow];
        for (int64_t iw = win.wlo[ow]; iw < win.whi[ow]; ++iw) rb[iw] += v;
      }
    }
    for (int64_t ih = win.hlo[oh]; ih < win.hhi[oh]; ++ih) row_add(gx + ih * p.W, rb, 1, p.W);
  }
}

template <typename T>
void backward_nchw(const AvgPool2dParams& a, const Windows<T>& win, const at::Tensor& grad_output,
                   at::Tensor& gx) {
  const Pool2dParams& p = a.p;
  const Strides4 gs = strides_of(grad_output);
  const T* g = grad_output.const_data_ptr<T>();
  T* dx = gx.mutable_data_ptr<T>();
  const int64_t per_item = 2 * p.H * p.W + p.OH * p.OW;
  at::parallel_for(0, p.N * p.C, grain_for(per_item), [&](int64_t b, int64_t e) {
    std::vector<T> rb(p.W);
    for (int64_t item = b; item < e; ++item) {
      const int64_t n = item / p.C, c = item % p.C;
      backward_plane(a, win, g + n * gs.n + c * gs.c, gs.h, gs.w, dx + item * p.H * p.W,
                     rb.data());
    }
  });
}

// Channels-last grad_input: one (n, input row, channel block) per item; each pixel
// gathers grad / divisor over the windows that contain it.
template <typename T>
void backward_channels_last(const AvgPool2dParams& a, const Windows<T>& win,
                            const at::Tensor& grad_output, at::Tensor& gx) {
  const Pool2dParams& p = a.p;
  const Strides4 gs = strides_of(grad_output), xs = strides_of(gx);
  const T* g = grad_output.const_data_ptr<T>();
  T* dx = gx.mutable_data_ptr<T>();
  std::vector<int64_t> olo(p.H), ohi(p.H), wlo(p.W), whi(p.W);
  for (int64_t ih = 0; ih < p.H; ++ih)
    avg_pool_windows_containing(a, ih, p.H, p.OH, p.KH, p.SH, p.PH, &olo[ih], &ohi[ih]);
  for (int64_t iw = 0; iw < p.W; ++iw)
    avg_pool_windows_containing(a, iw, p.W, p.OW, p.KW, p.SW, p.PW, &wlo[iw], &whi[iw]);
  constexpr int64_t CB = 1024;
  const int64_t cblocks = (p.C + CB - 1) / CB;
  const int64_t per_item = std::min(p.C, CB) * p.W * 2;
  at::parallel_for(0, p.N * p.H * cblocks, grain_for(per_item), [&](int64_t b, int64_t e) {
    std::vector<T> acc(std::min(p.C, CB));
    T* ac = acc.data();
    for (int64_t item = b; item < e; ++item) {
      const int64_t cb = item % cblocks, row = item / cblocks;
      const int64_t n = row / p.H, ih = row % p.H;
      const int64_t c0 = cb * CB, nc = std::min(CB, p.C - c0);
      const T* gn = g + n * gs.n + c0 * gs.c;
      T* xr = dx + n * xs.n + c0 * xs.c + ih * xs.h;
      for (int64_t iw = 0; iw < p.W; ++iw) {
        std::fill(ac, ac + nc, T(0));
        for (int64_t oh = olo[ih]; oh < ohi[ih]; ++oh) {
          for (int64_t ow = wlo[iw]; ow < whi[iw]; ++ow) {
            const T s = win.inv[oh * p.OW + ow];
            const T* gp = gn + oh * gs.h + ow * gs.w;
            if (gs.c == 1) {
              for (int64_t c = 0; c < nc; ++c) ac[c] += gp[c] * s;
            } else {
              for (int64_t c = 0; c < nc; ++c) ac[c] += gp[c * gs.c] * s;
            }
          }
        }
        T* xp = xr + iw * xs.w;
        if (xs.c == 1) {
          std::memcpy(xp, ac, sizeof(T) * nc);
        } else {
          for (int64_t c = 0; c < nc; ++c) xp[c * xs.c] = ac[c];
        }
      }
    }
  });
}

}  // namespace

at::Tensor avg_pool2d_forward(const at::Tensor& input, const AvgPool2dParams& a,
                              at::MemoryFormat out_format) {
  const Pool2dParams& p = a.p;
  at::Tensor out = at::empty({p.N, p.C, p.OH, p.OW}, input.options().memory_format(out_format));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "cnnext_avg_pool2d", [&] {
    const Windows<scalar_t> win(a);
    if (out_format == at::MemoryFormat::ChannelsLast) {
      forward_channels_last(a, win, input, out);
    } else {
      forward_nchw(a, win, input, out);
    }
  });
  return out;
}

at::Tensor avg_pool2d_backward(const at::Tensor& grad_output, const AvgPool2dParams& a,
                               at::MemoryFormat out_format) {
  const Pool2dParams& p = a.p;
  at::Tensor gx = at::empty({p.N, p.C, p.H, p.W}, grad_output.options().memory_format(out_format));
  if (gx.numel() == 0) return gx;
  if (p.OH * p.OW == 0) return gx.zero_();  // adaptive output_size 0: no window reads anything
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "cnnext_avg_pool2d_backward", [&] {
    const Windows<scalar_t> win(a);
    if (out_format == at::MemoryFormat::ChannelsLast) {
      backward_channels_last(a, win, grad_output, gx);
    } else {
      backward_nchw(a, win, grad_output, gx);
    }
  });
  return gx;
}

}  // namespace cpu
}  // namespace cnnext
