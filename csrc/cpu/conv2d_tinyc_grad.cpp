// See conv2d_tinyc.h: the AVX2 gradients of convolutions with few input and output channels.
#include "cpu/conv2d_tinyc.h"

#include <algorithm>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/items.h"
#include "cpu/scratch.h"
#include "cpu/sgemm.h"
#include "paths.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(CNNEXT_NO_AVX512)
#include <immintrin.h>
#define CNNEXT_TINYC_GRAD 1
#endif

namespace cnnext {
namespace cpu {
namespace conv_tinyc {
namespace {

CNNEXT_PATH_NEEDS(kInputGrad, "conv2d.input_grad.tiny_c_rows", kAvx2);
CNNEXT_PATH_NEEDS(kWeightGrad, "conv2d.weight_grad.tiny_c_flat", kAvx2);
// A non-finite weight (input gradient), or input or grad_output value (weight gradient): the
// kernels would multiply it by their zero padding, so the caller's path runs instead.
CNNEXT_PATH_NEEDS(kNonFinite, "conv2d.tiny_c_grad.nonfinite_fallback", kAvx2);

// The shapes taken (see grad_applies): at most 8 input and 16 output channels, at least 4
// output channels, at most 1024 taps.
constexpr int64_t kMaxC = 8, kMaxO = 16, kMinO = 4, kMaxTaps = 1024;
// Floats of one item's buffers the row bands are sized to (about 256 KiB: L2).
constexpr int64_t kBandFloats = int64_t(1) << 16;
// Items of the weight gradient at most (each one's partial sums are added in item order).
constexpr int64_t kMaxWgItems = 16;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Thread-local buffers (slots 0 and 1 are the forward's): 2 the item's padded rows, 3 the
// weight gradient's repacked grad_output rows, 4 its vector sums.
float* scratch(int slot, int64_t elems) { return thread_scratch(ScratchPool::TinyC, slot, elems); }

#ifdef CNNEXT_TINYC_GRAD
#define TG_AVX2 __attribute__((target("avx2,fma")))

// ---- input gradient ----
// gx[c][ih][iw] = sum over (o, kh, kw) of w[o][c][kh][kw] * gy[o][ih + PH - kh][iw + PW - kw]
// (terms past gy's edges are 0). Per item (a sample and a band of gx's rows): grad_output's
// rows the band reads, zero-padded (gyp[o][r][s] = gy[o][r0 + r - (KH - 1 - PH)][s - (KW - 1 -
// PW)]), so that gx's row ih reads gyp's row ih - r0 + KH - 1 - kh from column iw + KW - 1 - kw:
// 8 positions of a gx row a vector, RB rows x CB channels of accumulators per register tile,
// one load per row and tap, one broadcast per channel and tap.
struct GxGeo {
  int64_t Wg;     // gyp's row length: W rounded up to 8, plus KW - 1
  int64_t rows;   // gx rows a band
  int64_t Rg;     // gyp's rows: the band, 8 rows of slack for a last row tile, KH - 1
};

template <int RB, int CB>
TG_AVX2 void gx_tiles(const float* gyp, const GxGeo& g, const float* wr, const Conv2dParams& p, int64_t c0,
                      int64_t r0, int64_t r1, float* gx, const Strides4& xs) {
  // Locals: stores through gx could alias p and g, which the loops would then re-read.
  const int64_t plane = g.Rg * g.Wg, Wg = g.Wg, C = p.C, KH = p.KH, KW = p.KW, O = p.O, W = p.W;
  alignas(32) float lane[8];
  for (int64_t ih0 = r0; ih0 < r1; ih0 += RB) {
    // The taps kh that reach a row of gy for some row of the tile (the others read zeros).
    const int64_t kh_lo = std::max<int64_t>(0, ih0 + p.PH - p.OH + 1);
    const int64_t kh_hi = std::min<int64_t>(p.KH - 1, ih0 + RB - 1 + p.PH);
    for (int64_t iw0 = 0; iw0 < W; iw0 += 8) {
      __m256 acc[RB][CB];
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
        for (int cc = 0; cc < CB; ++cc) acc[r][cc] = _mm256_setzero_ps();
      for (int64_t o = 0; o < O; ++o) {
        for (int64_t kh = kh_lo; kh <= kh_hi; ++kh) {
          // Tap kw reads src - kw; the weights of its channels are at wk + kw * C.
          const float* src = gyp + o * plane + (ih0 - r0 + KH - 1 - kh) * Wg + iw0 + KW - 1;
          const float* wk = wr + ((o * KH + kh) * KW) * C + c0;
          for (int64_t kw = 0; kw < KW; ++kw, --src, wk += C) {
            __m256 v[RB];
#pragma GCC unroll 8
            for (int r = 0; r < RB; ++r) v[r] = _mm256_loadu_ps(src + r * Wg);
#pragma GCC unroll 8
            for (int cc = 0; cc < CB; ++cc) {
              const __m256 wv = _mm256_broadcast_ss(wk + cc);
#pragma GCC unroll 8
              for (int r = 0; r < RB; ++r) acc[r][cc] = _mm256_fmadd_ps(wv, v[r], acc[r][cc]);
            }
          }
        }
      }
      const int64_t ncol = std::min<int64_t>(8, W - iw0);
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) {
        if (ih0 + r >= r1) break;
#pragma GCC unroll 8
        for (int cc = 0; cc < CB; ++cc) {
          float* dst = gx + (c0 + cc) * xs.c + (ih0 + r) * xs.h + iw0 * xs.w;
          if (ncol == 8 && xs.w == 1) {
            _mm256_storeu_ps(dst, acc[r][cc]);
          } else {
            _mm256_store_ps(lane, acc[r][cc]);
            for (int64_t j = 0; j < ncol; ++j) dst[j * xs.w] = lane[j];
          }
        }
      }
    }
  }
}

// Row tiles by the channels of a block: RB x CB <= 12 accumulators (16 ymm registers).
constexpr int rows_for(int cb) { return cb >= 5 ? 2 : cb == 4 ? 3 : cb == 3 ? 4 : cb == 2 ? 6 : 8; }

template <int CB>
TG_AVX2 void gx_block(const float* gyp, const GxGeo& g, const float* wr, const Conv2dParams& p, int64_t c0,
                      int64_t r0, int64_t r1, float* gx, const Strides4& xs) {
  gx_tiles<rows_for(CB), CB>(gyp, g, wr, p, c0, r0, r1, gx, xs);
}

// The padded grad_output rows of the band [r0, r1) of sample n's gx.
void gx_pad_rows(const float* gy, const Strides4& gs, const Conv2dParams& p, const GxGeo& g, int64_t r0,
                 float* gyp) {
  const int64_t T = p.KH - 1 - p.PH, L = p.KW - 1 - p.PW;
  for (int64_t o = 0; o < p.O; ++o) {
    for (int64_t r = 0; r < g.Rg; ++r) {
      float* d = gyp + (o * g.Rg + r) * g.Wg;
      const int64_t h = r0 + r - T;
      if (h < 0 || h >= p.OH) {
        std::fill(d, d + g.Wg, 0.f);
        continue;
      }
      const float* s = gy + o * gs.c + h * gs.h;
      const int64_t w1 = std::min(g.Wg, L + p.OW);
      std::fill(d, d + L, 0.f);
      if (gs.w == 1) {
        std::copy(s, s + (w1 - L), d + L);
      } else {
        for (int64_t j = L; j < w1; ++j) d[j] = s[(j - L) * gs.w];
      }
      std::fill(d + w1, d + g.Wg, 0.f);
    }
  }
}

// ---- weight gradient ----
// gw[o][c][kh][kw] = sum over (n, oh, ow) of gy[n][o][oh][ow] * xp[n][c][oh + kh][ow + kw] (xp:
// x zero-padded by PH, PW). With rows of Wp = W + 2 PW columns on both sides (grad_output's
// rows repacked to that length, zero past OW), the sum over a band's positions is a dot product
// over j = row * Wp + column: gyr[o][j] * xr[c][j + kh * Wp + kw]. The columns j % Wp >= OW
// meet gyr's zeros; the x values they read (finite: checked as xr is filled) add nothing. A
// grad_output value meets the padding's zeros too, so both are checked: stock sums only the
// terms inside the input (an Inf there must not become NaN), and so does the caller's
// fallback.
// Register tiles of 4 output channels x 3 taps, 8 positions j a vector; the vector sums stay
// per item and are added up horizontally at its end.
struct GwGeo {
  int64_t Wp;      // padded row length
  int64_t rows;    // output rows a band
  int64_t bands;   // bands a sample
  int64_t Og;      // output channels rounded up to 4 (gyr's planes past O are zero)
  int64_t taps;    // C KH KW, rounded up to 3 (the extra taps read tap 0's vectors; unused)
  int64_t xplane;  // floats of an xr plane: (rows + KH - 1) * Wp and the slack of the last vectors
  int64_t jv;      // gyr's row: rows * Wp rounded up to 8
};

TG_AVX2 void gw_band(const float* gyr, const float* xr, const int64_t* toff, const GwGeo& g, int64_t jn,
                     float* sums) {
  const int64_t Og = g.Og, taps = g.taps, jv = g.jv;  // locals: the stores into sums could alias g
  for (int64_t o0 = 0; o0 < Og; o0 += 4) {
    const float* g0 = gyr + o0 * jv;
    for (int64_t t0 = 0; t0 < taps; t0 += 3) {
      const float* x0 = xr + toff[t0];
      const float* x1 = xr + toff[t0 + 1];
      const float* x2 = xr + toff[t0 + 2];
      __m256 acc[4][3];
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i)
#pragma GCC unroll 3
        for (int k = 0; k < 3; ++k) acc[i][k] = _mm256_setzero_ps();
      for (int64_t j = 0; j < jn; j += 8) {
        const __m256 xa = _mm256_loadu_ps(x0 + j), xb = _mm256_loadu_ps(x1 + j), xc = _mm256_loadu_ps(x2 + j);
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
          const __m256 gv = _mm256_loadu_ps(g0 + i * jv + j);
          acc[i][0] = _mm256_fmadd_ps(gv, xa, acc[i][0]);
          acc[i][1] = _mm256_fmadd_ps(gv, xb, acc[i][1]);
          acc[i][2] = _mm256_fmadd_ps(gv, xc, acc[i][2]);
        }
      }
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i)
#pragma GCC unroll 3
        for (int k = 0; k < 3; ++k) {
          float* s = sums + ((o0 + i) * taps + t0 + k) * 8;
          _mm256_storeu_ps(s, _mm256_add_ps(_mm256_loadu_ps(s), acc[i][k]));
        }
    }
  }
}

// Fills the band's gyr (Og planes of jv) and xr (C planes of xplane) for sample n's output
// rows [oh0, oh1); false when a value it copies is not finite.
bool gw_fill(const float* gy, const Strides4& gs, const float* x, const Strides4& xs, const Conv2dParams& p,
             const GwGeo& g, int64_t oh0, int64_t oh1, float* gyr, float* xr) {
  const int64_t nr = oh1 - oh0;
  bool finite = true;
  for (int64_t o = 0; o < g.Og; ++o) {
    float* d = gyr + o * g.jv;
    if (o >= p.O) {
      std::fill(d, d + g.jv, 0.f);
      continue;
    }
    for (int64_t r = 0; r < nr; ++r) {
      float* dr = d + r * g.Wp;
      const float* s = gy + o * gs.c + (oh0 + r) * gs.h;
      if (gs.w == 1) {
        std::copy(s, s + p.OW, dr);
      } else {
        for (int64_t j = 0; j < p.OW; ++j) dr[j] = s[j * gs.w];
      }
      finite &= all_finite(dr, p.OW);
      std::fill(dr + p.OW, dr + g.Wp, 0.f);
    }
    std::fill(d + nr * g.Wp, d + g.jv, 0.f);
  }
  const int64_t xrows = nr + p.KH - 1;
  for (int64_t c = 0; c < p.C; ++c) {
    float* d = xr + c * g.xplane;
    for (int64_t r = 0; r < xrows; ++r) {
      float* dr = d + r * g.Wp;
      const int64_t h = oh0 + r - p.PH;
      if (h < 0 || h >= p.H) {
        std::fill(dr, dr + g.Wp, 0.f);
        continue;
      }
      const float* s = x + c * xs.c + h * xs.h;
      std::fill(dr, dr + p.PW, 0.f);
      if (xs.w == 1) {
        std::copy(s, s + p.W, dr + p.PW);
      } else {
        for (int64_t j = 0; j < p.W; ++j) dr[p.PW + j] = s[j * xs.w];
      }
      finite &= all_finite(dr + p.PW, p.W);
      std::fill(dr + p.PW + p.W, dr + g.Wp, 0.f);
    }
    std::fill(d + xrows * g.Wp, d + g.xplane, 0.f);
  }
  return finite;
}
#endif  // CNNEXT_TINYC_GRAD

}  // namespace

bool grad_applies(const Conv2dParams& p) {
#ifdef CNNEXT_TINYC_GRAD
  if (sgemm::available() || !cpu_features().avx2_fma()) return false;
  return p.G == 1 && p.SH == 1 && p.SW == 1 && p.DH == 1 && p.DW == 1 && p.C >= 1 && p.C <= kMaxC &&
         p.O >= kMinO && p.O <= kMaxO && p.KH * p.KW >= 25 && p.C * p.KH * p.KW <= kMaxTaps && p.PH >= 0 &&
         p.PW >= 0 && p.PH < p.KH && p.PW < p.KW && p.N > 0 && p.OH > 0 && p.OW > 0 && p.H > 0 && p.W > 0;
#else
  (void)p;
  return false;
#endif
}

bool input_backward(const float* gy, const Strides4& gs, const float* w, float* gx, const Strides4& xs,
                    const Conv2dParams& p) {
#ifdef CNNEXT_TINYC_GRAD
  if (!grad_applies(p)) return false;
  const int64_t wn = p.O * p.C * p.KH * p.KW;
  if (!all_finite(w, wn)) {
    kNonFinite.hit();
    return false;
  }
  kInputGrad.hit();
  // The weight as [o][kh][kw][c]: a tap's channels side by side for the broadcasts.
  std::vector<float> wr(wn);
  for (int64_t o = 0; o < p.O; ++o)
    for (int64_t c = 0; c < p.C; ++c)
      for (int64_t k = 0; k < p.KH * p.KW; ++k) wr[(o * p.KH * p.KW + k) * p.C + c] = w[(o * p.C + c) * p.KH * p.KW + k];
  GxGeo g;
  g.Wg = round_up(p.W, 8) + p.KW - 1;
  // Bands of gx rows sized by the buffer (a multiple of 8 rows; a function of the shape
  // only). A band's last row tile may run past it (tiles of 3 or 6 rows): those rows are
  // computed from the 8 extra rows of gyp and not stored.
  const int64_t per_row = p.O * g.Wg;
  g.rows = std::max<int64_t>(8, round_up(std::max<int64_t>(1, kBandFloats / per_row - (p.KH - 1)), 8));
  g.rows = std::min(g.rows, round_up(p.H, 8));
  g.Rg = g.rows + 8 + p.KH - 1;
  const int64_t bands = ceil_div(p.H, g.rows);
  run_items(p.N * bands, [&](int64_t item) {
    const int64_t n = item / bands, r0 = (item % bands) * g.rows, r1 = std::min(p.H, r0 + g.rows);
    float* gyp = scratch(2, p.O * g.Rg * g.Wg);
    gx_pad_rows(gy + n * gs.n, gs, p, g, r0, gyp);
    float* gxn = gx + n * xs.n;
    for (int64_t c0 = 0; c0 < p.C; c0 += 6) {
      switch (std::min<int64_t>(6, p.C - c0)) {
        case 6: gx_block<6>(gyp, g, wr.data(), p, c0, r0, r1, gxn, xs); break;
        case 5: gx_block<5>(gyp, g, wr.data(), p, c0, r0, r1, gxn, xs); break;
        case 4: gx_block<4>(gyp, g, wr.data(), p, c0, r0, r1, gxn, xs); break;
        case 3: gx_block<3>(gyp, g, wr.data(), p, c0, r0, r1, gxn, xs); break;
        case 2: gx_block<2>(gyp, g, wr.data(), p, c0, r0, r1, gxn, xs); break;
        default: gx_block<1>(gyp, g, wr.data(), p, c0, r0, r1, gxn, xs); break;
      }
    }
  });
  return true;
#else
  (void)gy, (void)gs, (void)w, (void)gx, (void)xs, (void)p;
  return false;
#endif
}

bool weight_backward(const float* gy, const Strides4& gs, const float* x, const Strides4& xs, float* gw,
                     const Conv2dParams& p) {
#ifdef CNNEXT_TINYC_GRAD
  if (!grad_applies(p)) return false;
  GwGeo g;
  g.Wp = p.W + 2 * p.PW;
  g.Og = round_up(p.O, 4);
  const int64_t T = p.C * p.KH * p.KW;
  g.taps = round_up(T, 3);
  // Output rows a band: its gyr and xr planes within the budget; a function of the shape only.
  const int64_t per_row = (g.Og + p.C) * g.Wp;
  g.rows = std::min(p.OH, std::max<int64_t>(1, kBandFloats / per_row - (p.KH - 1)));
  g.bands = ceil_div(p.OH, g.rows);
  g.jv = round_up(g.rows * g.Wp, 8);
  g.xplane = (g.rows + p.KH - 1) * g.Wp + p.KW + 8;
  std::vector<int64_t> toff(g.taps, 0);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t c = t / (p.KH * p.KW), kh = (t / p.KW) % p.KH, kw = t % p.KW;
    toff[t] = c * g.xplane + kh * g.Wp + kw;
  }
  const int64_t units = p.N * g.bands;
  const int64_t items = std::min(units, kMaxWgItems);
  std::vector<float> partial(items * p.O * T);
  std::vector<char> finite(items, 1);
  run_items(items, [&](int64_t item) {
    const int64_t u0 = units * item / items, u1 = units * (item + 1) / items;
    float* sums = scratch(4, g.Og * g.taps * 8);
    std::fill(sums, sums + g.Og * g.taps * 8, 0.f);
    float* gyr = scratch(3, g.Og * g.jv + p.C * g.xplane);
    float* xr = gyr + g.Og * g.jv;
    for (int64_t u = u0; u < u1 && finite[item]; ++u) {
      const int64_t n = u / g.bands, oh0 = (u % g.bands) * g.rows, oh1 = std::min(p.OH, oh0 + g.rows);
      if (!gw_fill(gy + n * gs.n, gs, x + n * xs.n, xs, p, g, oh0, oh1, gyr, xr)) {
        finite[item] = 0;
        break;
      }
      gw_band(gyr, xr, toff.data(), g, round_up((oh1 - oh0) * g.Wp, 8), sums);
    }
    float* part = partial.data() + item * p.O * T;
    for (int64_t o = 0; o < p.O; ++o)
      for (int64_t t = 0; t < T; ++t) {
        const float* s = sums + (o * g.taps + t) * 8;
        // Lanes added pairwise, in a fixed order.
        part[o * T + t] = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
      }
  });
  for (int64_t i = 0; i < items; ++i) {
    if (!finite[i]) {
      kNonFinite.hit();
      return false;
    }
  }
  kWeightGrad.hit();
  for (int64_t k = 0; k < p.O * T; ++k) {
    float s = partial[k];
    for (int64_t i = 1; i < items; ++i) s += partial[i * p.O * T + k];
    gw[k] = s;
  }
  return true;
#else
  (void)gy, (void)gs, (void)x, (void)xs, (void)gw, (void)p;
  return false;
#endif
}

}  // namespace conv_tinyc
}  // namespace cpu
}  // namespace cnnext
