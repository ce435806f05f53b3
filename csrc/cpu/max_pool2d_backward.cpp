// max_pool2d backward on the CPU: the scatter of grad_output into grad_input
// (max_pool2d_with_indices_backward) and the gathers (max_pool2d_select, and
// max_unpool2d_backward through max_pool2d_gather).
//
// Backward scatters grad_output into grad_input plane by plane, each plane by one
// thread, in output order (dense planes: one flat loop; float16 / bfloat16 dense planes
// sum in float and round once): deterministic (channels_last:
// one sample per thread, pixels in output order, channels inside). The gathers are one
// loop through the strides. Every index read from a tensor is checked against its plane
// before it is used.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/max_pool2d.h"
#include "cpu/max_pool2d_common.h"
#include "cpu/output_alloc.h"
#include "cpu/vec.h"
#include "paths.h"
#include "tensors.h"

namespace cnnext {
namespace cpu {
namespace {

CNNEXT_PATH(kBwdChannelsLast, "max_pool2d.bwd.channels_last");
CNNEXT_PATH(kBwdTiledCl, "max_pool2d.bwd.channels_last_tiled");
// The tiled backward met an index outside its window and handed over to the scatter.
CNNEXT_PATH(kBwdTiledClFallback, "max_pool2d.bwd.channels_last_tiled_fallback");
CNNEXT_PATH(kBwdFlat, "max_pool2d.bwd.flat_scatter");
CNNEXT_PATH(kBwdStrided, "max_pool2d.bwd.strided_scatter");
CNNEXT_PATH(kGatherCl, "max_pool2d.gather.channels_last");
CNNEXT_PATH(kGatherPlanes, "max_pool2d.gather.planes");

// The unsigned integer of T's width, for selects by bit masks.
template <typename T>
using Bits = std::conditional_t<sizeof(T) == 8, uint64_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>>;

// hit ? v + 0 : 0, in v's own type, by its bits: a zeroed grad_input plus v where the index
// hits (-0.0 becomes +0.0; every other value, NaN included, is unchanged), else +0.0. Integer
// operations only, so the loop around it vectorises (GCC would not if-convert the select
// of values, and c10's 16-bit conversions are not inlined).
template <typename T>
inline T select_plus_zero(bool hit, T v) {
  using U = Bits<T>;
  static_assert(sizeof(U) == sizeof(T), "T is 2, 4 or 8 bytes");
  U b;
  std::memcpy(&b, &v, sizeof(T));
  constexpr U kMagnitude = U(~U(0)) >> 1;
  b &= U(-U(hit)) & U(-U((b & kMagnitude) != 0));
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

// One input position's C channels of the tiled backward: d[c] = select_plus_zero(idx[c] ==
// pos, g[c]); returns how many hit. Plain loop for every type; for float on AVX2, 8
// channels a step (GCC left the plain loop scalar, with a branch per value: slower than
// the zero fill and scatter it replaces).
template <typename T>
inline int64_t tile_position(const T* __restrict__ g, const int64_t* __restrict__ idx, T* __restrict__ d,
                             int64_t C, int64_t pos) {
  int64_t m = 0;
  for (int64_t c = 0; c < C; ++c) {
    const bool hit = idx[c] == pos;
    d[c] = select_plus_zero(hit, g[c]);
    m += hit;
  }
  return m;
}

#ifdef CNNEXT_VEC_X86
CNNEXT_TARGET("avx2") int64_t tile_position_avx2(const float* __restrict__ g, const int64_t* __restrict__ idx,
                                                float* __restrict__ d, int64_t C, int64_t pos) {
  const __m256i want = _mm256_set1_epi64x(pos);
  const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF), zero = _mm256_setzero_si256();
  // The low 32 bits of each 64-bit compare result, in lane order: dwords 0, 2 of each
  // 128-bit half, then the halves side by side.
  const __m256i pick = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
  int64_t m = 0, c = 0;
  for (; c + 8 <= C; c += 8) {
    const __m256i e0 = _mm256_cmpeq_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + c)), want);
    const __m256i e1 = _mm256_cmpeq_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + c + 4)), want);
    const __m256i h = _mm256_permute2x128_si256(_mm256_permutevar8x32_epi32(e0, pick),
                                                _mm256_permutevar8x32_epi32(e1, pick), 0x20);
    const __m256i b = _mm256_castps_si256(_mm256_loadu_ps(g + c));
    // Not a zero (magnitude bits set) and hit: the value's bits, else +0.0.
    const __m256i nonzero = _mm256_xor_si256(_mm256_cmpeq_epi32(_mm256_and_si256(b, magnitude), zero),
                                             _mm256_set1_epi32(-1));
    _mm256_storeu_ps(d + c, _mm256_castsi256_ps(_mm256_and_si256(b, _mm256_and_si256(h, nonzero))));
    m += __builtin_popcount(unsigned(_mm256_movemask_ps(_mm256_castsi256_ps(h))));
  }
  return m + tile_position(g + c, idx + c, d + c, C - c, pos);
}
#endif

// Windows that do not overlap (stride >= kernel, dilation 1), channels_last with channels
// at unit stride in grad_output, indices and grad_input: each input position lies in at
// most one window, so grad_input is written once, without the zero fill and the
// read-add-write of a scatter: in a window, g where the index names the position, else 0;
// positions in no window (the gaps of a stride past the kernel, the rows and columns past
// the last window) 0. Work items are output rows: item (n, oh) writes input rows
// [tiled_segment_start(oh), tiled_segment_start(oh + 1)) of sample n (csrc/common/pool2d.h),
// its window's rows and the uncovered rows after them. Returns false, having written only parts of gx,
// where some index is not a position of its window (indices from elsewhere than this
// forward, or out of range): the caller then runs the general scatter, which sums or
// reports them. Counting the matches suffices for that: positions in a window are
// distinct, so each (pixel, channel) matches at most once, and all do exactly when the
// count reaches pixels x channels.
bool tiled_channels_last(const Pool2dParams& p) {
  return p.DH == 1 && p.DW == 1 && p.SH >= p.KH && p.SW >= p.KW;
}

template <typename T>
bool tiled_backward_channels_last(const T* g, const Strides4& gs, const int64_t* ip, const Strides4& is,
                                  T* dx, const Strides4& xs, const Pool2dParams& p) {
  const int64_t C = p.C;
  const bool avx2 = cpu_features().avx2_fma();
  std::atomic<bool> ok{true};
  at::parallel_for(0, p.N * p.OH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end && ok.load(std::memory_order_relaxed); ++item) {
      const int64_t n = item / p.OH, oh = item % p.OH;
      int64_t h_lo, h_hi;
      max_window(oh, p.H, p.KH, p.SH, p.PH, 1, &h_lo, &h_hi);
      const int64_t r0 = tiled_segment_start(oh, p.OH, p.H, p.SH, p.PH);
      const int64_t r1 = tiled_segment_start(oh + 1, p.OH, p.H, p.SH, p.PH);
      T* xn = dx + n * xs.n;
      // Rows of the item outside the window: zeros.
      for (int64_t ih = r0; ih < r1; ++ih)
        if (ih < h_lo || ih >= h_hi) std::fill(xn + ih * xs.h, xn + ih * xs.h + p.W * C, T(0));
      int64_t matches = 0;
      for (int64_t ow = 0; ow < p.OW; ++ow) {
        int64_t w_lo, w_hi;
        max_window(ow, p.W, p.KW, p.SW, p.PW, 1, &w_lo, &w_hi);
        const int64_t c0 = tiled_segment_start(ow, p.OW, p.W, p.SW, p.PW);
        const int64_t c1 = tiled_segment_start(ow + 1, p.OW, p.W, p.SW, p.PW);
        const T* __restrict__ gp = g + n * gs.n + oh * gs.h + ow * gs.w;
        const int64_t* __restrict__ ipx = ip + n * is.n + oh * is.h + ow * is.w;
        for (int64_t ih = h_lo; ih < h_hi; ++ih) {
          T* row = xn + ih * xs.h;
          for (int64_t iw = c0; iw < c1; ++iw) {
            T* __restrict__ d = row + iw * C;
            if (iw < w_lo || iw >= w_hi) {
              std::fill(d, d + C, T(0));
              continue;
            }
            const int64_t pos = ih * p.W + iw;
#ifdef CNNEXT_VEC_X86
            if constexpr (std::is_same_v<T, float>) {
              if (avx2) {
                matches += tile_position_avx2(gp, ipx, d, C, pos);
                continue;
              }
            }
#endif
            matches += tile_position(gp, ipx, d, C, pos);
          }
        }
      }
      if (matches != p.OW * C) ok.store(false, std::memory_order_relaxed);
    }
  });
  return ok.load();
}

}  // namespace

at::Tensor max_pool2d_backward(const at::Tensor& grad_output, const at::Tensor& indices,
                               const Pool2dParams& p, at::MemoryFormat out_format) {
  // Every path below writes all of gx: the scatters zero their sample or plane first (in
  // cache just before the scatter adds into it, instead of one pass over all of gx ahead).
  at::Tensor gx = empty_output({p.N, p.C, p.H, p.W}, grad_output.options().memory_format(out_format));
  if (gx.numel() == 0) return gx;
  if (grad_output.numel() == 0) return gx.zero_();
  const EmptyWindows empty(p);
  BadIndex bad;
  const int64_t HW = p.H * p.W;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(), "cnnext_max_pool2d_backward", [&] {
    const scalar_t* g = grad_output.const_data_ptr<scalar_t>();
    const int64_t* ip = indices.const_data_ptr<int64_t>();
    scalar_t* dx = gx.mutable_data_ptr<scalar_t>();
    const Strides4 gs = strides_of(grad_output), is = strides_of(indices), xs = strides_of(gx);
    // gx is allocated dense: flat plane index i is at i * xs.w.
    if (xs.c == 1 && p.C > 1) {
      // channels_last: one sample per thread, output pixels in order, channels inside
      // (each plane still receives its grads in output order: the same sums).
      const bool unit = gs.c == 1 && is.c == 1 && xs.w == p.C;
      if (unit && tiled_channels_last(p)) {
        if (tiled_backward_channels_last(g, gs, ip, is, dx, xs, p)) {
          kBwdTiledCl.hit();
          return;
        }
        kBwdTiledClFallback.hit();
      }
      kBwdChannelsLast.hit();
      const int64_t C = p.C;
      at::parallel_for(0, p.N, 1, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
          const scalar_t* gp = g + n * gs.n;
          const int64_t* ipp = ip + n * is.n;
          scalar_t* xp = dx + n * xs.n;
          std::fill(xp, xp + HW * C, scalar_t(0));
          for (int64_t oh = 0; oh < p.OH; ++oh) {
            if (empty.row_empty[oh]) continue;
            for (int64_t ow = 0; ow < p.OW; ++ow) {
              if (empty.col_empty[ow]) continue;
              const scalar_t* __restrict__ gpx = gp + oh * gs.h + ow * gs.w;
              const int64_t* __restrict__ ipx = ipp + oh * is.h + ow * is.w;
              if (unit) {  // channels contiguous in grad_output and indices
                const uint64_t hw = static_cast<uint64_t>(HW);
                for (int64_t c = 0; c < p.C; ++c) {
                  const int64_t i = ipx[c];
                  if (static_cast<uint64_t>(i) >= hw) {
                    bad.record(i);
                    continue;
                  }
                  xp[i * C + c] += gpx[c];
                }
                continue;
              }
              for (int64_t c = 0; c < p.C; ++c) {
                const int64_t i = ipx[c * is.c];
                if (i < 0 || i >= HW) {
                  bad.record(i);
                  continue;
                }
                xp[i * xs.w + c] += gpx[c * gs.c];
              }
            }
          }
        }
      });
      return;
    }
    bool any_empty = empty.any_col;
    for (int64_t oh = 0; oh < p.OH; ++oh) any_empty |= empty.row_empty[oh] != 0;
    const bool flat = !any_empty && xs.w == 1 && gs.w == 1 && gs.h == p.OW && is.w == 1 &&
                      is.h == p.OW;
    (flat ? kBwdFlat : kBwdStrided).hit();
    constexpr bool kHalf = std::is_same_v<scalar_t, at::BFloat16> || std::is_same_v<scalar_t, at::Half>;
    at::parallel_for(0, p.N * p.C, 1, [&](int64_t begin, int64_t end) {
      // float16 / bfloat16 dense planes: the sums in a float plane, rounded once (the
      // half type's read-add-round per tap was most of the time; where windows do not
      // overlap the result is the same, one value per input).
      std::vector<float> acc(kHalf && flat ? HW : 0);
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / p.C, c = plane % p.C;
        const scalar_t* gp = g + n * gs.n + c * gs.c;
        const int64_t* ipp = ip + n * is.n + c * is.c;
        scalar_t* xp = dx + n * xs.n + c * xs.c;
        if (kHalf && flat) {
          std::fill(acc.begin(), acc.end(), 0.f);
          float* ap = acc.data();
          const int64_t OHW = p.OH * p.OW;
          for (int64_t k = 0; k < OHW; ++k) {
            const int64_t i = ipp[k];
            if (static_cast<uint64_t>(i) >= static_cast<uint64_t>(HW)) {
              bad.record(i);
              continue;
            }
            ap[i] += static_cast<float>(gp[k]);
          }
          if constexpr (std::is_same_v<scalar_t, at::BFloat16>)
            vec::float_to_bf16(ap, reinterpret_cast<uint16_t*>(xp), HW);
          else
            for (int64_t i = 0; i < HW; ++i) xp[i] = static_cast<scalar_t>(ap[i]);
          continue;
        }
        // The plane (dense, xs.w == 1: the only NCHW layout gx is allocated in) zeroed,
        // then the scatter adds into it while it is in cache.
        std::fill(xp, xp + HW * xs.w, scalar_t(0));
        if (flat) {  // dense planes, every window with a tap: one flat loop
          const int64_t OHW = p.OH * p.OW;
          for (int64_t k = 0; k < OHW; ++k) {
            const int64_t i = ipp[k];
            if (static_cast<uint64_t>(i) >= static_cast<uint64_t>(HW)) {
              bad.record(i);
              continue;
            }
            xp[i] += gp[k];
          }
          continue;
        }
        for (int64_t oh = 0; oh < p.OH; ++oh) {
          if (empty.row_empty[oh]) continue;
          for (int64_t ow = 0; ow < p.OW; ++ow) {
            if (empty.col_empty[ow]) continue;
            const int64_t i = ipp[oh * is.h + ow * is.w];
            if (i < 0 || i >= HW) {
              bad.record(i);
              continue;
            }
            xp[i * xs.w] += gp[oh * gs.h + ow * gs.w];
          }
        }
      }
    });
  });
  bad.check("max_pool2d_with_indices_backward", p.H, p.W);
  return gx;
}

// out (N, C, h, w) = src (N, C, Hs, Ws) at indices (N, C, h, w); with `pool`, zero for
// the windows without a tap inside the input.
at::Tensor max_pool2d_gather(const char* op, const at::Tensor& src, const at::Tensor& indices,
                             const Pool2dParams* pool, at::MemoryFormat out_format) {
  at::Tensor out = empty_output(indices.sizes(), src.options().memory_format(out_format));
  if (out.numel() == 0) return out;
  const int64_t N = indices.size(0), C = indices.size(1), h = indices.size(2), w = indices.size(3);
  const int64_t Hs = src.size(2), Ws = src.size(3), HWs = Hs * Ws;
  // An empty source plane (max_unpool2d to an empty output, which checks no index
  // either) gives zeros.
  if (HWs == 0) return out.zero_();
  std::vector<char> row_ok(h, 1), col_ok(w, 1);
  if (pool != nullptr) {
    const EmptyWindows empty(*pool);
    for (int64_t o = 0; o < h; ++o) row_ok[o] = !empty.row_empty[o];
    for (int64_t o = 0; o < w; ++o) col_ok[o] = !empty.col_empty[o];
  }
  BadIndex bad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "cnnext_max_pool2d_gather", [&] {
    const scalar_t* sp = src.const_data_ptr<scalar_t>();
    const int64_t* ip = indices.const_data_ptr<int64_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    const Strides4 ss = strides_of(src), is = strides_of(indices), os = strides_of(out);
    if (os.c == 1 && C > 1) {
      kGatherCl.hit();
      // channels_last output: one output row (n, oh) per item, channels innermost.
      at::parallel_for(0, N * h, 1, [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const int64_t n = item / h, oh = item % h;
          const scalar_t* spp = sp + n * ss.n;
          const int64_t* ipp = ip + n * is.n + oh * is.h;
          scalar_t* opp = op_ + n * os.n + oh * os.h;
          for (int64_t ow = 0; ow < w; ++ow) {
            const bool ok = row_ok[oh] && col_ok[ow];
            for (int64_t c = 0; c < C; ++c) {
              scalar_t v = scalar_t(0);
              if (ok) {
                const int64_t i = ipp[ow * is.w + c * is.c];
                if (i < 0 || i >= HWs)
                  bad.record(i);
                else
                  v = spp[c * ss.c + flat_offset(ss, Ws, i)];
              }
              opp[ow * os.w + c] = v;
            }
          }
        }
      });
      return;
    }
    kGatherPlanes.hit();
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / C, c = plane % C;
        const scalar_t* spp = sp + n * ss.n + c * ss.c;
        const int64_t* ipp = ip + n * is.n + c * is.c;
        scalar_t* opp = op_ + n * os.n + c * os.c;
        for (int64_t oh = 0; oh < h; ++oh)
          for (int64_t ow = 0; ow < w; ++ow) {
            scalar_t v = scalar_t(0);
            if (row_ok[oh] && col_ok[ow]) {
              const int64_t i = ipp[oh * is.h + ow * is.w];
              if (i < 0 || i >= HWs)
                bad.record(i);
              else
                v = spp[flat_offset(ss, Ws, i)];
            }
            opp[oh * os.h + ow * os.w] = v;
          }
      }
    });
  });
  bad.check(op, Hs, Ws);
  return out;
}

at::Tensor max_pool2d_select(const at::Tensor& src, const at::Tensor& indices,
                             const Pool2dParams& p, at::MemoryFormat out_format) {
  return max_pool2d_gather("max_pool2d_select", src, indices, &p, out_format);
}

}  // namespace cpu
}  // namespace cnnext
