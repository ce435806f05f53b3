// conv_bn_relu2d (training mode) on the CPU.
//
// Forward: the convolution (csrc/cpu/conv2d.cpp) writes conv_out band by band; as each
// band of rows is finished, and still in cache, its per-channel moments (count, mean,
// sum of squared deviations) are taken in two sweeps over the band and kept per band.
// The bands' moments are merged in a fixed order (Chan et al.'s pairwise formula: no
// cancellation of large sums, and the same result whatever the thread count), giving
// the batch mean and biased variance. One more pass writes
// out = [relu]((conv_out - mean) * gamma * invstd + beta).
//
// Backward: one sweep of reductions (sum gm, sum gm * (conv_out - mean)) with partial
// sums per plane (or per pixel row for channels_last) added up in order, then one
// elementwise sweep writing grad_conv_out and its channel sums (the conv bias gradient).
//
// Every tensor with the output's shape is dense, contiguous or channels_last (see
// csrc/cpu/conv_bn_relu2d.h); statistics are accumulated in double. bfloat16 planes
// (contiguous) take the AVX-512 sweeps of csrc/cpu/bn_bf16.cpp where the CPU has
// AVX512_BF16: float partial sums of 256 values added in double, as the loops here.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/bn_bf16.h"
#include "cpu/conv2d.h"
#include "cpu/conv_bn_relu2d.h"
#include "cpu/derived_cache.h"
#include "cpu/output_alloc.h"
#include "paths.h"
#include "tensors.h"

namespace cnnext {
namespace cpu {
namespace {

CNNEXT_PATH_NEEDS(kTrainBf16Sweeps, "conv_bn_relu2d.train.bf16_sweeps", kAvx512Bf16);
CNNEXT_PATH_NEEDS(kBackwardBf16Sweeps, "conv_bn_relu2d.backward.bf16_sweeps", kAvx512Bf16);
CNNEXT_PATH(kFoldCacheHit, "conv_bn_relu2d.fold_cache_hit");
CNNEXT_PATH(kFoldCacheMiss, "conv_bn_relu2d.fold_cache_miss");

// bfloat16 planes take the AVX-512 sweeps of csrc/cpu/bn_bf16.cpp where the CPU has them.
template <typename T>
bool bf16_sweeps() {
  if constexpr (std::is_same_v<T, c10::BFloat16>) return bn_bf16::available();
  return false;
}
template <typename T>
const uint16_t* bits(const T* p) { return reinterpret_cast<const uint16_t*>(p); }
template <typename T>
uint16_t* bits(T* p) { return reinterpret_cast<uint16_t*>(p); }

// Moments of `count` values: their mean and the sum of squared deviations from it.
struct Moments {
  double count = 0, mean = 0, m2 = 0;
};

// a := moments of the union of a's and b's values (Chan, Golub, LeVeque).
void merge(Moments& a, const Moments& b) {
  if (b.count == 0) return;
  if (a.count == 0) {
    a = b;
    return;
  }
  const double n = a.count + b.count, d = b.mean - a.mean;
  a.mean += d * (b.count / n);
  a.m2 += b.m2 + d * d * (a.count / n * b.count);
  a.count = n;
}

// Grain of a parallel loop whose items each touch `per_item` elements: at least ~32K
// elements per thread, so that a small tensor runs inline on the calling thread (an
// OpenMP region costs a few us, and much more when the cores are oversubscribed) and
// a large one still spreads over every core. The results do not depend on it: every
// reduction is per item, added up in item order.
int64_t grain_for(int64_t per_item) {
  constexpr int64_t kElementsPerTask = 32768;
  return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, per_item));
}

// Dense 4-D shape and layout of the output-shaped tensors.
struct Dense {
  int64_t N, C, H, W;
  bool cl;  // channels_last (channels innermost), else contiguous (planes)
  int64_t plane() const { return H * W; }
};

Dense dense_of(const at::Tensor& t) {
  const bool cl = !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
  return {t.size(0), t.size(1), t.size(2), t.size(3), cl};
}

// Moments of every channel of rows [oh0, oh1) of sample n, into m[0, C).
template <typename T>
void band_moments(const T* y, const Dense& d, int64_t n, int64_t oh0, int64_t oh1, Moments* m) {
  const int64_t L = (oh1 - oh0) * d.W;
  if (L == 0) return;
  if (!d.cl) {
    const bool fast = bf16_sweeps<T>();
    for (int64_t c = 0; c < d.C; ++c) {
      const T* v = y + (n * d.C + c) * d.plane() + oh0 * d.W;
      if (fast) {
        double mean, m2;
        bn_bf16::moments(bits(v), L, &mean, &m2);
        m[c] = {double(L), mean, m2};
        continue;
      }
      double s = 0;
      _Pragma("omp simd reduction(+ : s)")
      for (int64_t i = 0; i < L; ++i) s += static_cast<double>(v[i]);
      const double mean = s / double(L);
      double m2 = 0;
      _Pragma("omp simd reduction(+ : m2)")
      for (int64_t i = 0; i < L; ++i) {
        const double dv = static_cast<double>(v[i]) - mean;
        m2 += dv * dv;
      }
      m[c] = {double(L), mean, m2};
    }
    return;
  }
  std::vector<double> s(d.C, 0.0), m2(d.C, 0.0);
  const T* base = y + (n * d.H + oh0) * d.W * d.C;
  for (int64_t i = 0; i < L; ++i) {
    const T* px = base + i * d.C;
    _Pragma("omp simd")
    for (int64_t c = 0; c < d.C; ++c) s[c] += static_cast<double>(px[c]);
  }
  for (int64_t c = 0; c < d.C; ++c) s[c] /= double(L);
  for (int64_t i = 0; i < L; ++i) {
    const T* px = base + i * d.C;
    _Pragma("omp simd")
    for (int64_t c = 0; c < d.C; ++c) {
      const double dv = static_cast<double>(px[c]) - s[c];
      m2[c] += dv * dv;
    }
  }
  for (int64_t c = 0; c < d.C; ++c) m[c] = {double(L), s[c], m2[c]};
}

// out = [relu]((y - mean[c]) * a[c] + beta[c]).
// In A (float for float16 / bfloat16), each output rounded to T once.
template <typename T, typename A>
void normalize(const T* y, T* out, const Dense& d, const A* mean, const A* a, const A* beta,
               bool relu) {
  if (!d.cl) {
    const int64_t P = d.plane();
    at::parallel_for(0, d.N * d.C, grain_for(P), [&](int64_t b, int64_t e) {
      for (int64_t item = b; item < e; ++item) {
        const int64_t c = item % d.C;
        const A m = mean[c], s = a[c], t = beta[c];
        const T* v = y + item * P;
        T* o = out + item * P;
        if (bf16_sweeps<T>()) {
          bn_bf16::normalize(bits(v), bits(o), P, static_cast<float>(m), static_cast<float>(s),
                             static_cast<float>(t), relu);
        } else if (relu) {
          _Pragma("omp simd")
          for (int64_t i = 0; i < P; ++i) {
            const A r = (static_cast<A>(v[i]) - m) * s + t;
            o[i] = static_cast<T>(r < A(0) ? A(0) : r);
          }
        } else {
          _Pragma("omp simd")
          for (int64_t i = 0; i < P; ++i) o[i] = static_cast<T>((static_cast<A>(v[i]) - m) * s + t);
        }
      }
    });
    return;
  }
  const int64_t row = d.W * d.C;
  at::parallel_for(0, d.N * d.H, grain_for(row), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      for (int64_t w = 0; w < d.W; ++w) {
        const T* v = y + r * row + w * d.C;
        T* o = out + r * row + w * d.C;
        _Pragma("omp simd")
        for (int64_t c = 0; c < d.C; ++c) {
          const A x = (static_cast<A>(v[c]) - mean[c]) * a[c] + beta[c];
          o[c] = static_cast<T>((relu && x < A(0)) ? A(0) : x);
        }
      }
    }
  });
}

// gm: grad, zero where out <= 0 when kMask (the ReLU's gradient, read from its output;
// a NaN output passes the gradient, as torch's threshold_backward does).
template <typename T, bool kMask>
inline T masked(const T* __restrict__ g, const T* __restrict__ out, int64_t i) {
  if constexpr (kMask) {
    // Both loads first: a select between two values vectorises; a load inside it does
    // not (GCC keeps the branch, which mispredicts on a ReLU's mask).
    const T gv = g[i], ov = out[i];
    return ov <= T(0) ? T(0) : gv;
  } else {
    return g[i];
  }
}

// Elements summed in T (vectorised) before the partial sum is added in double: short
// enough that float32's rounding stays far below its tolerance, long enough for speed.
constexpr int64_t kChunk = 256;

// One contiguous run of n elements of one channel (mean m): *s0 = sum gm,
// *s1 = sum gm * (y - m).
template <typename T, typename A, bool kMask>
void run_sums(const T* __restrict__ g, const T* __restrict__ o, const T* __restrict__ y,
              int64_t n, A m, double* s0, double* s1) {
  if (bf16_sweeps<T>()) return bn_bf16::sums(bits(g), kMask ? bits(o) : nullptr, bits(y), n, static_cast<float>(m), s0, s1);
  double a0 = 0, a1 = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t i1 = std::min(n, i0 + kChunk);
    A c0 = 0, c1 = 0;
    _Pragma("omp simd reduction(+ : c0, c1)")
    for (int64_t i = i0; i < i1; ++i) {
      const A gm = static_cast<A>(masked<T, kMask>(g, o, i));
      c0 += gm;
      c1 += gm * (static_cast<A>(y[i]) - m);
    }
    a0 += static_cast<double>(c0);
    a1 += static_cast<double>(c1);
  }
  *s0 = a0;
  *s1 = a1;
}

// dy = k * gm + shift - coef * (y - m) over one contiguous run; returns the sum of dy.
template <typename T, typename A, bool kMask>
double run_apply(const T* __restrict__ g, const T* __restrict__ o, const T* __restrict__ y,
                 int64_t n, A m, A k, A shift, A coef, T* __restrict__ dy) {
  if (bf16_sweeps<T>())
    return bn_bf16::apply(bits(g), kMask ? bits(o) : nullptr, bits(y), n, static_cast<float>(m),
                          static_cast<float>(k), static_cast<float>(shift), static_cast<float>(coef), bits(dy));
  double a0 = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t i1 = std::min(n, i0 + kChunk);
    A c0 = 0;
    _Pragma("omp simd reduction(+ : c0)")
    for (int64_t i = i0; i < i1; ++i) {
      const T v = static_cast<T>(k * static_cast<A>(masked<T, kMask>(g, o, i)) + shift -
                                 coef * (static_cast<A>(y[i]) - m));
      dy[i] = v;
      c0 += static_cast<A>(v);
    }
    a0 += static_cast<double>(c0);
  }
  return a0;
}

// The same over one pixel row of channels_last data (W pixels of C channels): each row's
// sums are taken in T (scratch r0, r1 of C), then added into the per-channel doubles.
template <typename T, typename A, bool kMask>
void row_sums(const T* __restrict__ g, const T* __restrict__ o, const T* __restrict__ y,
              int64_t W, int64_t C, const A* __restrict__ mean, A* __restrict__ r0,
              A* __restrict__ r1, double* __restrict__ s0, double* __restrict__ s1) {
  std::fill(r0, r0 + C, A(0));
  std::fill(r1, r1 + C, A(0));
  for (int64_t w = 0; w < W; ++w) {
    const int64_t base = w * C;
    _Pragma("omp simd")
    for (int64_t c = 0; c < C; ++c) {
      const A gm = static_cast<A>(masked<T, kMask>(g, o, base + c));
      r0[c] += gm;
      r1[c] += gm * (static_cast<A>(y[base + c]) - mean[c]);
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    s0[c] += static_cast<double>(r0[c]);
    s1[c] += static_cast<double>(r1[c]);
  }
}

template <typename T, typename A, bool kMask>
void row_apply(const T* __restrict__ g, const T* __restrict__ o, const T* __restrict__ y,
               int64_t W, int64_t C, const A* __restrict__ mean, const A* __restrict__ k,
               const A* __restrict__ shift, const A* __restrict__ coef, T* __restrict__ dy,
               A* __restrict__ r0, double* __restrict__ s0) {
  std::fill(r0, r0 + C, A(0));
  for (int64_t w = 0; w < W; ++w) {
    const int64_t base = w * C;
    _Pragma("omp simd")
    for (int64_t c = 0; c < C; ++c) {
      const T v = static_cast<T>(k[c] * static_cast<A>(masked<T, kMask>(g, o, base + c)) + shift[c] -
                                 coef[c] * (static_cast<A>(y[base + c]) - mean[c]));
      dy[base + c] = v;
      r0[c] += static_cast<A>(v);
    }
  }
  for (int64_t c = 0; c < C; ++c) s0[c] += static_cast<double>(r0[c]);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu2d_train(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
    double eps, const Conv2dParams& p, at::MemoryFormat out_format, bool relu) {
  at::Tensor conv_out =
      empty_output({p.N, p.O, p.OH, p.OW}, input.options().memory_format(out_format));
  at::Tensor out = empty_output(conv_out.sizes(), conv_out.options().memory_format(out_format));
  const Dense d = dense_of(conv_out);
  const int64_t M = p.N * p.OH * p.OW;
  // Statistics in stats_dtype: float for float16 / bfloat16 input.
  const auto sopt = input.options().dtype(stats_dtype(input.scalar_type()));
  at::Tensor mean = at::zeros({p.O}, sopt);
  at::Tensor var = at::zeros({p.O}, sopt);
  if (conv_out.numel() == 0) return {out, conv_out, mean, var};

  // Moments per (sample, first row of a band) slot; only band starts are filled.
  std::vector<Moments> slots(size_t(p.N * p.OH * p.O));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cnnext_conv_bn_relu2d_train", [&] {
    using A = at::opmath_type<scalar_t>;  // == stats_dtype
    if (bf16_sweeps<scalar_t>() && !d.cl) kTrainBf16Sweeps.hit();
    const scalar_t* y = conv_out.const_data_ptr<scalar_t>();
    conv2d_forward_rows(input, weight, bias, p, conv_out, false,
                        [&](int64_t n, int64_t oh0, int64_t oh1) {
                          band_moments(y, d, n, oh0, oh1, slots.data() + (n * p.OH + oh0) * p.O);
                        });
    // Merge the bands in (n, row) order, channel by channel.
    std::vector<A> mean_v(p.O), a_v(p.O), beta_v(p.O);
    // bn_weight / bn_bias: the input's dtype or (float16 / bfloat16 input, as under
    // autocast) float32; read in A.
    const auto adt = c10::CppTypeToScalarType<A>::value;
    const at::Tensor gamma_t = bn_weight.has_value() && bn_weight->defined()
                                   ? bn_weight->to(adt).contiguous() : at::Tensor();
    const at::Tensor beta_t = bn_bias.has_value() && bn_bias->defined()
                                  ? bn_bias->to(adt).contiguous() : at::Tensor();
    const A* gp = gamma_t.defined() ? gamma_t.const_data_ptr<A>() : nullptr;
    const A* bp = beta_t.defined() ? beta_t.const_data_ptr<A>() : nullptr;
    A* mp = mean.mutable_data_ptr<A>();
    A* vp = var.mutable_data_ptr<A>();
    at::parallel_for(0, p.O, grain_for(p.N * p.OH), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        Moments total;
        for (int64_t s = 0; s < p.N * p.OH; ++s) merge(total, slots[s * p.O + c]);
        const double v = total.m2 / double(M);
        mp[c] = static_cast<A>(total.mean);
        vp[c] = static_cast<A>(v);
        const double invstd = 1.0 / std::sqrt(v + eps);
        mean_v[c] = static_cast<A>(total.mean);
        a_v[c] = static_cast<A>(gp ? double(gp[c]) * invstd : invstd);
        beta_v[c] = bp ? bp[c] : A(0);
      }
    });
    normalize(y, out.mutable_data_ptr<scalar_t>(), d, mean_v.data(), a_v.data(), beta_v.data(),
              relu);
  });
  return {out, conv_out, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu2d_train_backward(
    const at::Tensor& grad, const c10::optional<at::Tensor>& out, const at::Tensor& conv_out,
    const at::Tensor& mean, const at::Tensor& var, const c10::optional<at::Tensor>& bn_weight,
    double eps, bool relu) {
  const Dense d = dense_of(conv_out);
  const int64_t M = d.N * d.H * d.W;
  at::Tensor grad_conv = at::empty_like(conv_out);
  // grad_bn_weight / grad_bn_bias in stats_dtype (float for float16 / bfloat16).
  const auto sopt = conv_out.options().dtype(stats_dtype(conv_out.scalar_type()));
  at::Tensor g_gamma = at::zeros({d.C}, sopt);
  at::Tensor g_beta = at::zeros({d.C}, sopt);
  at::Tensor g_bias = at::zeros({d.C}, conv_out.options());
  if (conv_out.numel() == 0) return {grad_conv, g_gamma, g_beta, g_bias};
  const bool use_out = relu && out.has_value() && out->defined();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, conv_out.scalar_type(), "cnnext_conv_bn_relu2d_backward", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;  // == stats_dtype
    if (bf16_sweeps<T>() && !d.cl) kBackwardBf16Sweeps.hit();
    const auto adt = c10::CppTypeToScalarType<A>::value;
    const T* g = grad.const_data_ptr<T>();
    const T* o = use_out ? out->const_data_ptr<T>() : nullptr;
    const T* y = conv_out.const_data_ptr<T>();
    const at::Tensor mean_c = mean.contiguous(), var_c = var.contiguous();
    const A* mp = mean_c.const_data_ptr<A>();
    const A* vp = var_c.const_data_ptr<A>();
    const at::Tensor gamma_t = bn_weight.has_value() && bn_weight->defined()
                                   ? bn_weight->to(adt).contiguous() : at::Tensor();
    const A* gp = gamma_t.defined() ? gamma_t.const_data_ptr<A>() : nullptr;
    T* dy = grad_conv.mutable_data_ptr<T>();
    const int64_t C = d.C;
    // Items: planes (n, c) or pixel rows (n, h); partial sums per item and channel.
    const int64_t items = d.cl ? d.N * d.H : d.N * d.C;
    const int64_t per_item = d.cl ? C : 1;
    std::vector<double> s_gm(items * per_item, 0.0), s_gmx(items * per_item, 0.0);
    const int64_t P = d.plane(), row = d.W * C;

    // Sweep 1: sum gm and sum gm * (y - mean).
    at::parallel_for(0, items, grain_for(d.cl ? row : P), [&](int64_t b, int64_t e) {
      std::vector<A> r0(d.cl ? C : 0), r1(d.cl ? C : 0);
      for (int64_t item = b; item < e; ++item) {
        if (!d.cl) {
          const int64_t c = item % C, base = item * P;
          const T* ob = o ? o + base : nullptr;
          if (o) run_sums<T, A, true>(g + base, ob, y + base, P, mp[c], &s_gm[item], &s_gmx[item]);
          else run_sums<T, A, false>(g + base, ob, y + base, P, mp[c], &s_gm[item], &s_gmx[item]);
        } else {
          const int64_t base = item * row;
          const T* ob = o ? o + base : nullptr;
          double* a0 = s_gm.data() + item * C;
          double* a1 = s_gmx.data() + item * C;
          if (o) row_sums<T, A, true>(g + base, ob, y + base, d.W, C, mp, r0.data(), r1.data(), a0, a1);
          else row_sums<T, A, false>(g + base, ob, y + base, d.W, C, mp, r0.data(), r1.data(), a0, a1);
        }
      }
    });
    // Per-channel totals, added in item order; then the coefficients of sweep 2:
    // dy = k * gm + shift - coef * (y - mean).
    std::vector<A> k(C), shift(C), coef(C);
    A* ggp = g_gamma.mutable_data_ptr<A>();
    A* gbp = g_beta.mutable_data_ptr<A>();
    for (int64_t c = 0; c < C; ++c) {
      double sg = 0, sgx = 0;
      if (!d.cl) {
        for (int64_t n = 0; n < d.N; ++n) {
          sg += s_gm[n * C + c];
          sgx += s_gmx[n * C + c];
        }
      } else {
        for (int64_t it = 0; it < items; ++it) {
          sg += s_gm[it * C + c];
          sgx += s_gmx[it * C + c];
        }
      }
      const double invstd = 1.0 / std::sqrt(static_cast<double>(vp[c]) + eps);
      const double dgamma = sgx * invstd;
      ggp[c] = static_cast<A>(dgamma);
      gbp[c] = static_cast<A>(sg);
      const double kk = (gp ? static_cast<double>(gp[c]) : 1.0) * invstd;
      k[c] = static_cast<A>(kk);
      shift[c] = static_cast<A>(-kk * sg / double(M));
      coef[c] = static_cast<A>(kk * invstd * dgamma / double(M));
    }
    // Sweep 2: grad_conv_out and its channel sums.
    at::parallel_for(0, items, grain_for(d.cl ? row : P), [&](int64_t b, int64_t e) {
      std::vector<A> r0(d.cl ? C : 0);
      for (int64_t item = b; item < e; ++item) {
        if (!d.cl) {
          const int64_t c = item % C, base = item * P;
          const T* ob = o ? o + base : nullptr;
          s_gm[item] = o ? run_apply<T, A, true>(g + base, ob, y + base, P, mp[c], k[c], shift[c], coef[c], dy + base)
                         : run_apply<T, A, false>(g + base, ob, y + base, P, mp[c], k[c], shift[c], coef[c], dy + base);
        } else {
          const int64_t base = item * row;
          const T* ob = o ? o + base : nullptr;
          double* a0 = s_gm.data() + item * C;
          std::fill(a0, a0 + C, 0.0);
          if (o) row_apply<T, A, true>(g + base, ob, y + base, d.W, C, mp, k.data(), shift.data(), coef.data(), dy + base, r0.data(), a0);
          else row_apply<T, A, false>(g + base, ob, y + base, d.W, C, mp, k.data(), shift.data(), coef.data(), dy + base, r0.data(), a0);
        }
      }
    });
    T* gbi = g_bias.mutable_data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) {
      double s = 0;
      if (!d.cl) {
        for (int64_t n = 0; n < d.N; ++n) s += s_gm[n * C + c];
      } else {
        for (int64_t it = 0; it < items; ++it) s += s_gm[it * C + c];
      }
      gbi[c] = static_cast<T>(s);
    }
  });
  return {grad_conv, g_gamma, g_beta, g_bias};
}

namespace {

// The fold into w (O, C / groups, KH, KW contiguous) and shift (O), of the weight's dtype.
void fold_into(at::Tensor& w, at::Tensor& shift, const at::Tensor& weight,
               const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& bn_weight,
               const c10::optional<at::Tensor>& bn_bias, const at::Tensor& running_mean,
               const at::Tensor& running_var, double eps, const Conv2dParams& p) {
  // One loop over the weight (the at:: formulation is ~10 small ops, ~10 us per call);
  // the same arithmetic in the same order, in the input's dtype.
  auto opt = [](const c10::optional<at::Tensor>& t) -> const at::Tensor* {
    return t.has_value() && t->defined() ? &*t : nullptr;
  };
  const at::Tensor wc = weight.contiguous();
  const at::Tensor* b = opt(bias);
  const at::Tensor* g = opt(bn_weight);
  const at::Tensor* be = opt(bn_bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "cnnext_conv_bn_relu2d_fold", [&] {
    using T = scalar_t;
    // The fold in A (float for float16 / bfloat16, whose running statistics and bn
    // parameters may be float32, as under autocast); w' and b' rounded to T once.
    using A = at::opmath_type<T>;
    const auto adt = c10::CppTypeToScalarType<A>::value;
    const at::Tensor rm_t = running_mean.to(adt), rv_t = running_var.to(adt);
    const at::Tensor b_t = b ? b->to(adt) : at::Tensor(), g_t = g ? g->to(adt) : at::Tensor(),
                     be_t = be ? be->to(adt) : at::Tensor();
    const auto rm = rm_t.accessor<A, 1>(), rv = rv_t.accessor<A, 1>();
    const int64_t K = wc.numel() / std::max<int64_t>(p.O, 1);
    const T* src = wc.const_data_ptr<T>();
    T* dst = w.mutable_data_ptr<T>();
    T* sh = shift.mutable_data_ptr<T>();
    // Parallel over output channels once the weight is large (ResNet's 512 x 512 x 3 x 3:
    // 2.4M elements, about 1 ms on one thread); small weights stay on the calling thread.
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(K, 1));
    at::parallel_for(0, p.O, grain, [&](int64_t begin, int64_t end) {
      for (int64_t o = begin; o < end; ++o) {
        A scale = A(1) / std::sqrt(rv[o] + static_cast<A>(eps));
        if (g) scale = scale * g_t.accessor<A, 1>()[o];
        for (int64_t k = 0; k < K; ++k) dst[o * K + k] = static_cast<T>(static_cast<A>(src[o * K + k]) * scale);
        A t = -rm[o];
        if (b) t = t + b_t.accessor<A, 1>()[o];
        t = t * scale;
        if (be) t = t + be_t.accessor<A, 1>()[o];
        sh[o] = static_cast<T>(t);
      }
    });
  });
}

}  // namespace

std::pair<at::Tensor, at::Tensor> bn_fold(const at::Tensor& weight,
                                          const c10::optional<at::Tensor>& bias,
                                          const c10::optional<at::Tensor>& bn_weight,
                                          const c10::optional<at::Tensor>& bn_bias,
                                          const at::Tensor& running_mean,
                                          const at::Tensor& running_var, double eps,
                                          const Conv2dParams& p) {
  auto opt = [](const c10::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); };
  int64_t eps_bits;
  static_assert(sizeof(eps_bits) == sizeof(eps), "double is 64-bit");
  std::memcpy(&eps_bits, &eps, sizeof(eps));
  bool hit = false;
  const std::vector<at::Tensor> folded = weight_cache().get(
      {weight, opt(bias), opt(bn_weight), opt(bn_bias), running_mean, running_var}, {kBnFoldTag, eps_bits},
      [&](const std::vector<at::Tensor>& reuse) {
        at::Tensor w = reuse.empty() ? DerivedCache::empty({p.O, weight.size(1), p.KH, p.KW}, weight.options())
                                     : reuse[0];
        at::Tensor shift = reuse.empty() ? DerivedCache::empty({p.O}, weight.options()) : reuse[1];
        fold_into(w, shift, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, p);
        return std::vector<at::Tensor>{w, shift};
      },
      &hit);
  (hit ? kFoldCacheHit : kFoldCacheMiss).hit();
  return {folded[0], folded[1]};
}

void batch_norm_update_stats_(at::Tensor& running_mean, at::Tensor& running_var,
                              const at::Tensor& mean, const at::Tensor& var, double momentum,
                              int64_t count) {
  // One loop (the at:: formulation is ~10 small ops, ~20 us per call).
  const int64_t C = mean.size(0);
  const double unbias = double(count) / double(count - 1);
  const at::Tensor m = mean.to(at::kDouble).contiguous(), v = var.to(at::kDouble).contiguous();
  const double* mp = m.const_data_ptr<double>();
  const double* vp = v.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(), "cnnext_bn_stats_mean", [&] {
    scalar_t* r = running_mean.mutable_data_ptr<scalar_t>();
    const int64_t st = running_mean.stride(0);
    for (int64_t c = 0; c < C; ++c)
      r[c * st] = static_cast<scalar_t>(static_cast<double>(r[c * st]) * (1.0 - momentum) + mp[c] * momentum);
  });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_var.scalar_type(), "cnnext_bn_stats_var", [&] {
    scalar_t* r = running_var.mutable_data_ptr<scalar_t>();
    const int64_t st = running_var.stride(0);
    for (int64_t c = 0; c < C; ++c)
      r[c * st] = static_cast<scalar_t>(static_cast<double>(r[c * st]) * (1.0 - momentum) +
                                        (vp[c] * unbias) * momentum);
  });
}

}  // namespace cpu
}  // namespace cnnext
