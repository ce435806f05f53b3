// See conv2d_tinyc.h.
#include "cpu/conv2d_tinyc.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/scratch.h"
#include "cpu/transpose16.h"
#include "cpu/sgemm.h"
#include "paths.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(CNNEXT_NO_AVX512)
#include <immintrin.h>
#define CNNEXT_TINYC 1
#endif

namespace cnnext {
namespace cpu {
namespace conv_tinyc {
namespace {

CNNEXT_PATH_NEEDS(kTinyC, "conv2d.fwd.tiny_c_lanes", kAvx2);
CNNEXT_PATH_NEEDS(kTinyCLast, "conv2d.fwd.tiny_c_lanes.channels_last_store", kAvx2);
// x's pixels dense (channels_last): rows copied whole into a [rows][cols][C] buffer.
CNNEXT_PATH_NEEDS(kTinyCPixels, "conv2d.fwd.tiny_c_lanes.pixel_rows", kAvx2);
// The 8-lane kernel (CPUs with AVX2 + FMA and no AVX-512F).
CNNEXT_PATH_NEEDS(kTinyCAvx2, "conv2d.fwd.tiny_c_lanes.avx2", kAvx2);

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Columns of an item's row buffer: the windows' reach across plus slack for a tile.
[[maybe_unused]] int64_t buffer_cols(const Conv2dParams& p) {
  return (p.OW - 1) * p.SW + conv_dilated_kernel(p.KW, p.DW) + 16 * p.SW;
}
// Input rows the windows of `rows` output rows read.
[[maybe_unused]] int64_t window_rows(const Conv2dParams& p, int64_t rows) {
  return (rows - 1) * p.SH + conv_dilated_kernel(p.KH, p.DH);
}

// Stores of either kernel into a y of any other strides, lane by lane: t's rows hold ld
// floats (n positions x m channels), plus bias, then ReLU.
[[maybe_unused]] void store_strided(const float* t, int64_t ld, int n, int64_t m, const float* bias, bool relu, float* y0,
                   const Strides4& ys) {
  for (int64_t o = 0; o < m; ++o) {
    const float b = bias ? bias[o] : 0.f;
    float* yo = y0 + o * ys.c;
    for (int r = 0; r < n; ++r) {
      float val = t[r * ld + o] + b;
      if (relu) val = std::max(val, 0.f);
      yo[r * ys.w] = val;
    }
  }
}

// Output channels per block (a last block holds fewer: whole vectors of 16), and positions
// per register tile by the block's vectors (4 x 6, 3 x 8, 2 x 12 accumulators; one vector:
// 16 positions).
constexpr int64_t kOB = 64;
constexpr int rmax(int nv) { return nv == 4 ? 6 : nv == 3 ? 8 : nv == 2 ? 12 : 16; }
// AVX2 (16 ymm registers): blocks of 16 channels, two vectors of 8 by 6 positions, or one
// vector by 12 (12 accumulators, the block's weight vectors and one broadcast).
constexpr int64_t kOB8 = 16;
constexpr int rmax8(int nv) { return nv == 2 ? 6 : 12; }
// Where the AVX2 kernel takes a layer: up to 8 input channels (LeNet's second layer: 6),
// at least 4 output channels (LeNet's first: 6).
constexpr int64_t kMaxC8 = 8, kMinO8 = 4;
// At most this many taps (C x KH x KW): their buffer offsets live in a table on the stack.
constexpr int64_t kMaxTaps8 = 1024;
// Positions per segment of a row: whole tiles of each size, whole 16 x 16 transposes.
constexpr int64_t kSeg = 48;

// Thread-local buffers kept between calls: slot 0 the packed weight, slot 1 the padded rows.
float* scratch(int slot, int64_t elems) { return thread_scratch(ScratchPool::TinyC, slot, elems); }

#ifdef CNNEXT_TINYC
struct Geo {
  int64_t C, KH, KW, cs, hs, DH, tw;  // buffer strides of a channel, a row; tw: of a kw step
  const int32_t* taps;                // AVX2 kernel: the buffer offset of each tap (c, kh, kw)
};

// acc[r][v] (r < R positions, v < NV vectors of 16 channels) = sum over the taps of
// w[tap][16 v + lane] * xb[tap offset + r * S] (S: the stride across).
template <int NV, int R, int S>
CNNEXT_TARGET("avx512f")
inline void tile(const float* xb, const Geo& g, const float* wk, float* out) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t c = 0; c < g.C; ++c) {
    for (int64_t kh = 0; kh < g.KH; ++kh) {
      const float* row = xb + c * g.cs + kh * g.DH * g.hs;
      for (int64_t kw = 0; kw < g.KW; ++kw) {
        const float* px = row + kw * g.tw;
        __m512 wv[NV];
        for (int v = 0; v < NV; ++v) wv[v] = _mm512_load_ps(wk + 16 * v);
        wk += 16 * NV;
        for (int r = 0; r < R; ++r) {
          const __m512 xv = _mm512_set1_ps(px[r * S]);
          for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(wv[v], xv, acc[r][v]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) _mm512_store_ps(out + (r * NV + v) * 16, acc[r][v]);
}

template <int NV, int S, int R = rmax(NV)>
CNNEXT_TARGET("avx512f")
void tile_n(int n, const float* xb, const Geo& g, const float* wk, float* out) {
  if constexpr (R > 1) {
    if (n < R) return tile_n<NV, S, R - 1>(n, xb, g, wk, out);
  }
  tile<NV, R, S>(xb, g, wk, out);
}

using TileFn = void (*)(int, const float*, const Geo&, const float*, float*);

template <int S>
TileFn tile_fn(int nv) {
  switch (nv) {
    case 4: return &tile_n<4, S>;
    case 3: return &tile_n<3, S>;
    case 2: return &tile_n<2, S>;
    default: return &tile_n<1, S>;
  }
}

// The buffer floats between adjacent output positions: steps with a tile instance.
bool step_ok(int64_t step) { return (step >= 1 && step <= 4) || step == 6 || step == 8; }

TileFn pick(int64_t step, int nv) {
  switch (step) {
    case 1: return tile_fn<1>(nv);
    case 2: return tile_fn<2>(nv);
    case 3: return tile_fn<3>(nv);
    case 4: return tile_fn<4>(nv);
    case 6: return tile_fn<6>(nv);
    default: return tile_fn<8>(nv);
  }
}


// Stores `n` positions x `m` channels of a segment (t[r][lane], rows of 16 nv floats, rows
// readable up to n rounded up to 16) plus bias, then ReLU: y0 points at (sample, channel
// o0, row, first column); `room` positions from y0 on may be written (those past n are
// rewritten by the next segment).
CNNEXT_TARGET("avx512f")
void store(const float* t, int nv, int n, int64_t m, const float* bias, bool relu, float* y0,
           const Strides4& ys, int64_t room) {
  const int64_t ld = 16 * nv;
  if (ys.c == 1) {
    for (int v = 0; v < nv; ++v) {
      const int64_t cnt = std::clamp<int64_t>(m - 16 * v, 0, 16);
      if (cnt == 0) break;
      const __mmask16 mk = __mmask16((1u << cnt) - 1);
      const __m512 b = bias ? _mm512_maskz_loadu_ps(mk, bias + 16 * v) : _mm512_setzero_ps();
      for (int r = 0; r < n; ++r) {
        __m512 val = _mm512_add_ps(_mm512_load_ps(t + r * ld + 16 * v), b);
        if (relu) val = _mm512_max_ps(_mm512_setzero_ps(), val);  // NaN kept: MAXPS returns its second operand on NaN
        _mm512_mask_storeu_ps(y0 + r * ys.w + 16 * v, mk, val);
      }
    }
    return;
  }
  if (ys.w == 1) {  // NCHW: per channel runs of 16 positions, transposed in registers
    for (int pb = 0; pb < n; pb += 16) {
      const int lanes = int(std::min<int64_t>(16, room - pb));
      const __mmask16 mk = __mmask16((1u << lanes) - 1);
      for (int v = 0; v < nv; ++v) {
        const int64_t cnt = std::clamp<int64_t>(m - 16 * v, 0, 16);
        if (cnt == 0) break;
        __m512 col[16];
        transpose16_regs(t + pb * ld + 16 * v, ld, col);
        for (int64_t j = 0; j < cnt; ++j) {
          __m512 val = col[j];
          if (bias) val = _mm512_maskz_add_ps(mk, val, _mm512_set1_ps(bias[16 * v + j]));
          if (relu) val = _mm512_max_ps(_mm512_setzero_ps(), val);  // NaN kept: MAXPS returns its second operand on NaN
          _mm512_mask_storeu_ps(y0 + (16 * v + j) * ys.c + pb, mk, val);
        }
      }
    }
    return;
  }
  store_strided(t, ld, n, m, bias, relu, y0, ys);
}

// The AVX2 kernel: as tile / tile_n / store above, with vectors of 8 channels.
template <int NV, int R, int S>
CNNEXT_TARGET("avx2,fma")
inline void tile8(const float* xb, const Geo& g, const float* wk, float* out) {
  // One loop over the taps (their offsets in g.taps). The loops over the accumulators are
  // unrolled by pragma: left as loops, GCC turned the final stores into a copy of the
  // accumulator array and so kept that array on the stack, storing to it at every tap.
  const int32_t* taps = g.taps;
  const int64_t K = g.C * g.KH * g.KW;
  __m256 acc[R * NV];
#pragma GCC unroll 16
  for (int i = 0; i < R * NV; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k, wk += 8 * NV) {
    const float* px = xb + taps[k];
    __m256 wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = _mm256_load_ps(wk + 8 * v);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_broadcast_ss(px + r * S);
      for (int v = 0; v < NV; ++v) acc[r * NV + v] = _mm256_fmadd_ps(wv[v], xv, acc[r * NV + v]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < R * NV; ++i) _mm256_store_ps(out + i * 8, acc[i]);
}

template <int NV, int S, int R = rmax8(NV)>
CNNEXT_TARGET("avx2,fma")
void tile8_n(int n, const float* xb, const Geo& g, const float* wk, float* out) {
  if constexpr (R > 1) {
    if (n < R) return tile8_n<NV, S, R - 1>(n, xb, g, wk, out);
  }
  tile8<NV, R, S>(xb, g, wk, out);
}

template <int S>
TileFn tile8_fn(int nv) {
  return nv == 2 ? &tile8_n<2, S> : &tile8_n<1, S>;
}

TileFn pick8(int64_t step, int nv) {
  switch (step) {
    case 1: return tile8_fn<1>(nv);
    case 2: return tile8_fn<2>(nv);
    case 3: return tile8_fn<3>(nv);
    case 4: return tile8_fn<4>(nv);
    case 6: return tile8_fn<6>(nv);
    default: return tile8_fn<8>(nv);
  }
}

// Lanes [0, n) of 8 (n clamped to [0, 8]) as a maskload / maskstore mask.
CNNEXT_TARGET("avx2,fma") inline __m256i lanes8(int64_t n) {
  const int32_t k = int32_t(std::clamp<int64_t>(n, 0, 8));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// col[j][i] = rows[i * ld + j], i, j < 8.
CNNEXT_TARGET("avx2,fma") inline void transpose8_regs(const float* rows, int64_t ld, __m256* col) {
  __m256 r[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_load_ps(rows + i * ld);
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  col[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  col[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  col[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  col[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  col[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  col[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  col[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  col[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// store() for the AVX2 kernel: t's rows hold 8 nv floats and are readable up to n rounded
// up to 8; the NCHW stores go through 8 x 8 register transposes.
CNNEXT_TARGET("avx2,fma")
void store8(const float* t, int nv, int n, int64_t m, const float* bias, bool relu, float* y0,
            const Strides4& ys, int64_t room) {
  const int64_t ld = 8 * nv;
  const __m256 zero = _mm256_setzero_ps();
  if (ys.c == 1) {
    for (int v = 0; v < nv; ++v) {
      const int64_t cnt = std::clamp<int64_t>(m - 8 * v, 0, 8);
      if (cnt == 0) break;
      const __m256i mk = lanes8(cnt);
      const __m256 b = bias ? _mm256_maskload_ps(bias + 8 * v, mk) : zero;
      // Masked stores only for a part vector: VMASKMOVPS stores are slow on AMD (the
      // channels_last stem 224^2 with them throughout: 1.1x the NCHW one).
      for (int r = 0; r < n; ++r) {
        __m256 val = _mm256_add_ps(_mm256_load_ps(t + r * ld + 8 * v), b);
        if (relu) val = _mm256_max_ps(zero, val);  // NaN kept: MAXPS returns its second operand on NaN
        if (cnt == 8) {
          _mm256_storeu_ps(y0 + r * ys.w + 8 * v, val);
        } else {
          _mm256_maskstore_ps(y0 + r * ys.w + 8 * v, mk, val);
        }
      }
    }
    return;
  }
  if (ys.w == 1) {  // NCHW: per channel runs of 8 positions, transposed in registers
    for (int pb = 0; pb < n; pb += 8) {
      const bool whole = room - pb >= 8;
      const __m256i mk = lanes8(room - pb);
      for (int v = 0; v < nv; ++v) {
        const int64_t cnt = std::clamp<int64_t>(m - 8 * v, 0, 8);
        if (cnt == 0) break;
        __m256 col[8];
        transpose8_regs(t + pb * ld + 8 * v, ld, col);
        for (int64_t j = 0; j < cnt; ++j) {
          __m256 val = col[j];
          if (bias) val = _mm256_add_ps(val, _mm256_set1_ps(bias[8 * v + j]));
          if (relu) val = _mm256_max_ps(zero, val);  // NaN kept: MAXPS returns its second operand on NaN
          if (whole) {
            _mm256_storeu_ps(y0 + (8 * v + j) * ys.c + pb, val);
          } else {
            _mm256_maskstore_ps(y0 + (8 * v + j) * ys.c + pb, mk, val);
          }
        }
      }
    }
    return;
  }
  store_strided(t, ld, n, m, bias, relu, y0, ys);
}
#endif

}  // namespace

bool applies(const Conv2dParams& p) {
#ifdef CNNEXT_TINYC
  if (!(p.G == 1 && p.C >= 1 && p.KH * p.KW >= 25 && p.SW >= 1 && p.SW <= 4 && p.N * p.OH * p.OW > 0))
    return false;
  if (sgemm::available()) return p.C <= 4 && p.O >= 16;
  // The tap offsets are int32: the buffer (at most the whole padded height of rows) must
  // hold fewer than 2^31 floats.
  return cpu_features().avx2_fma() && p.C <= kMaxC8 && p.O >= kMinO8 && p.C * p.KH * p.KW <= kMaxTaps8 &&
         p.C * window_rows(p, p.OH) * buffer_cols(p) < (int64_t(1) << 31);
#else
  (void)p;
  return false;
#endif
}

void forward(const float* x, const Strides4& xs, const float* w, const float* bias, float* y,
             const Strides4& ys, const Conv2dParams& p, bool relu, const RowsDoneFn& rows_done) {
#ifdef CNNEXT_TINYC
  kTinyC.hit();
  if (ys.c == 1) kTinyCLast.hit();
  // The AVX-512 kernel: blocks of 64 channels, vectors of 16; else the AVX2 one: blocks of
  // 16, vectors of 8.
  const bool wide = sgemm::available();
  if (!wide) kTinyCAvx2.hit();
  const int64_t ob = wide ? kOB : kOB8, lane = wide ? 16 : 8;
  const int64_t K = p.C * p.KH * p.KW;
  const int64_t blocks = ceil_div(p.O, ob);
  // Packed weight: block b holds channels [ob b, ob b + ob) as [k][width] (width: the
  // block's channels rounded up to whole vectors), zeros past O.
  const int64_t wsize = blocks * K * ob;
  float* wp = scratch(0, wsize);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t o0 = b * ob, m = std::min(ob, p.O - o0), width = ceil_div(m, lane) * lane;
    float* dst = wp + b * K * ob;
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < width; ++j) dst[k * width + j] = j < m ? w[(o0 + j) * K + k] : 0.f;
  }

  // Items: bands of output rows of one sample, enough of them to keep the threads busy.
  const int64_t T = at::get_num_threads();
  const int64_t bands = std::min(p.OH, std::max<int64_t>(1, ceil_div(8 * T, p.N)));
  const int64_t rows = ceil_div(p.OH, bands), per = ceil_div(p.OH, rows);
  const int64_t cols = buffer_cols(p);
  const int64_t in_rows_max = window_rows(p, rows);
  // x's pixels dense with 2 or more channels: the buffer keeps them ([rows][cols][C], whole
  // rows copied), else planar ([C][rows][cols]).
  const bool pixels = p.C > 1 && xs.c == 1 && xs.w == p.C && step_ok(p.SW * p.C);
  if (pixels) kTinyCPixels.hit();
  const int64_t ws = pixels ? p.C : 1, step = p.SW * ws;
  const TileFn fns[4] = {wide ? pick(step, 1) : pick8(step, 1), wide ? pick(step, 2) : pick8(step, 2),
                         wide ? pick(step, 3) : nullptr, wide ? pick(step, 4) : nullptr};
  auto item = [&](int64_t it) {
    const int64_t n = it / per, oh0 = (it % per) * rows, oh1 = std::min(p.OH, oh0 + rows);
    const int64_t in_rows = window_rows(p, oh1 - oh0);
    const int64_t ih0 = oh0 * p.SH - p.PH, iw0 = -p.PW;
    float* buf = scratch(1, p.C * in_rows_max * cols + kSeg * kOB + 16);  // tbuf: a segment, aligned
    float* tbuf = buf + p.C * in_rows_max * cols;
    tbuf = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(tbuf) + 63) & ~uintptr_t(63));
    Geo g{p.C, p.KH, p.KW, pixels ? 1 : in_rows * cols, pixels ? cols * p.C : cols, p.DH, p.DW * ws, nullptr};
    int32_t taps[kMaxTaps8];
    if (!wide) {
      int32_t* t = taps;
      for (int64_t c = 0; c < p.C; ++c)
        for (int64_t kh = 0; kh < p.KH; ++kh)
          for (int64_t kw = 0; kw < p.KW; ++kw) *t++ = int32_t(c * g.cs + kh * p.DH * g.hs + kw * g.tw);
      g.taps = taps;
    }
    const int64_t a = std::clamp<int64_t>(-iw0, 0, cols), e = std::clamp<int64_t>(p.W - iw0, a, cols);
    for (int64_t r = 0; pixels && r < in_rows; ++r) {
      float* d = buf + r * g.hs;
      const int64_t ih = ih0 + r;
      if (ih < 0 || ih >= p.H) {
        std::fill(d, d + g.hs, 0.f);
        continue;
      }
      std::fill(d, d + a * p.C, 0.f);
      std::memcpy(d + a * p.C, x + n * xs.n + ih * xs.h + (a + iw0) * xs.w, size_t((e - a) * p.C) * sizeof(float));
      std::fill(d + e * p.C, d + g.hs, 0.f);
    }
    for (int64_t c = 0; !pixels && c < p.C; ++c) {
      for (int64_t r = 0; r < in_rows; ++r) {
        float* d = buf + c * g.cs + r * cols;
        const int64_t ih = ih0 + r;
        if (ih < 0 || ih >= p.H) {
          std::fill(d, d + cols, 0.f);
          continue;
        }
        const float* s = x + n * xs.n + c * xs.c + ih * xs.h;
        std::fill(d, d + a, 0.f);
        if (xs.w == 1) {
          std::memcpy(d + a, s + (a + iw0), size_t(e - a) * sizeof(float));
        } else {
          for (int64_t q = a; q < e; ++q) d[q] = s[(q + iw0) * xs.w];
        }
        std::fill(d + e, d + cols, 0.f);
      }
    }
    // Channel blocks outermost: the block's weight stays in L1 and each channel plane of y
    // is written row after row.
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t o0 = b * ob, m = std::min(ob, p.O - o0);
      const int nv = int(ceil_div(m, lane)), R = wide ? rmax(nv) : rmax8(nv);
      const TileFn fn = fns[nv - 1];
      const float* wk = wp + b * K * ob;
      for (int64_t oh = oh0; oh < oh1; ++oh) {
        const float* xr = buf + (oh - oh0) * p.SH * g.hs;
        float* yb = y + n * ys.n + o0 * ys.c + oh * ys.h;
        for (int64_t s0 = 0; s0 < p.OW; s0 += kSeg) {
          const int sn = int(std::min<int64_t>(kSeg, p.OW - s0));
          for (int ow = 0; ow < sn; ow += R)
            fn(std::min(R, sn - ow), xr + (s0 + ow) * step, g, wk, tbuf + ow * lane * nv);
          if (wide) {
            store(tbuf, nv, sn, m, bias ? bias + o0 : nullptr, relu, yb + s0 * ys.w, ys, p.OW - s0);
          } else {
            store8(tbuf, nv, sn, m, bias ? bias + o0 : nullptr, relu, yb + s0 * ys.w, ys, p.OW - s0);
          }
        }
      }
    }
    if (rows_done) rows_done(n, oh0, oh1);
  };
  const int64_t count = p.N * per;
  if (T == 1 || count == 1) {
    for (int64_t i = 0; i < count; ++i) item(i);
  } else {
    at::parallel_for(0, count, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) item(i);
    });
  }
#else
  (void)x; (void)xs; (void)w; (void)bias; (void)y; (void)ys; (void)p; (void)relu; (void)rows_done;
#endif
}

}  // namespace conv_tinyc
}  // namespace cpu
}  // namespace cnnext
