// The CPU kernels of csrc/cpu/avg_pool2d.cpp. No include guard and no includes: that
// file includes this one twice, into namespaces compiled for different instruction sets
// (AVX2 + FMA, and the baseline), each defining kIsa (Isa::kAvx2, Isa::kScalar) before
// the include, and picks one at run time. The explicit vectors are csrc/cpu/vec.h's
// Vec<T, kIsa>; the plain loops the compiler vectorises for the target.

// Elements of work below which a parallel region costs more than it saves.
constexpr int64_t kGrainElems = 32768;

int64_t grain_for(int64_t elems_per_item) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, elems_per_item));
}

// 32 bytes of T (8 float / 4 double lanes) as Vec<T, kIsa>s: one AVX2 vector, or 8 / 4
// scalar ones in the baseline build (which the compiler packs into SSE registers). The
// lanes, and so the order of every sum across them (contiguous_sum_chunk), are the same
// in both builds.
template <typename T>
struct Vec32 {
  using V = vec::Vec<T, kIsa>;
  static constexpr int64_t size = 32 / sizeof(T);
  static constexpr int parts = size / V::size;
  V part[parts];
  CNNEXT_VEC_INLINE static Vec32 load(const T* p) {
    Vec32 r;
    for (int k = 0; k < parts; ++k) r.part[k] = V::load(p + k * V::size);
    return r;
  }
  CNNEXT_VEC_INLINE static Vec32 zero() {
    Vec32 r;
    for (int k = 0; k < parts; ++k) r.part[k] = V::zero();
    return r;
  }
  CNNEXT_VEC_INLINE void store(T* p) const {
    for (int k = 0; k < parts; ++k) part[k].store(p + k * V::size);
  }
  // Always inlined, as the vector-extension code they replace was (the inliner then
  // weighs the kernels as before). Members, not friends: GCC compiles a class template's friends without the
  // `#pragma GCC target` around them, and then neither inlines Vec's AVX2 code into them
  // nor returns its vectors intact (a vzeroupper clears their upper lanes).
  CNNEXT_VEC_INLINE Vec32 operator+(const Vec32& b) const {
    Vec32 r;
    for (int k = 0; k < parts; ++k) r.part[k] = part[k] + b.part[k];
    return r;
  }
  CNNEXT_VEC_INLINE Vec32 operator*(T s) const {
    const V sv = V::set1(s);
    Vec32 r;
    for (int k = 0; k < parts; ++k) r.part[k] = part[k] * sv;
    return r;
  }
};
template <typename T>
constexpr int64_t kVecLen = Vec32<T>::size;

// Windows and divisors of one call (see csrc/common/avg_pool2d.h).
template <typename T>
struct Windows {
  std::vector<int64_t> hlo, hhi, wlo, whi;  // input range of each output row / column
  std::vector<T> inv;                       // 1 / divisor of each output, OH x OW
  bool global = false;                      // a single window covering the whole plane
  bool w_regular = false;                   // every column window is [ow * SW, ow * SW + KW)
  int64_t max_area = 0;                     // input elements of the largest window

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
    int64_t max_h = 0, max_w = 0;
    for (int64_t oh = 0; oh < p.OH; ++oh) max_h = std::max(max_h, hhi[oh] - hlo[oh]);
    for (int64_t ow = 0; ow < p.OW; ++ow) max_w = std::max(max_w, whi[ow] - wlo[ow]);
    max_area = max_h * max_w;
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

// dst[0, n) = src[0, n) in vector registers, inlined: GCC turns a plain copy loop into
// a call to memcpy, which showed at 6% of the channels_last 2x2 pool's profile for its
// 1 KiB pixel copies.
template <typename T>
inline void copy_channels(T* __restrict__ dst, const T* __restrict__ src, int64_t n) {
  constexpr int64_t L = kVecLen<T>;
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    Vec32<T>::load(src + i).store(dst + i);
    __asm__ volatile("" ::: "memory");  // keeps GCC from turning the loop into memcpy
  }
  for (; i < n; ++i) dst[i] = src[i];
}

// Terms summed in T before their partial sum is added in double: float32's rounding
// then stays that of a kSumChunk-term sum whatever the plane's size (a 4096 x 4096
// plane summed in float alone lost 10%), at one double add per chunk.
constexpr int64_t kSumChunk = 1024;

template <typename T>
inline T contiguous_sum_chunk(const T* __restrict__ x, int64_t n);

// Sum of n contiguous elements, by chunks of kSumChunk (see there).
template <typename T>
inline __attribute__((always_inline)) T contiguous_sum(const T* __restrict__ x, int64_t n) {
  if (n <= kSumChunk) return contiguous_sum_chunk(x, n);
  double s = 0;
  for (int64_t i = 0; i < n; i += kSumChunk) s += contiguous_sum_chunk(x + i, std::min(kSumChunk, n - i));
  return static_cast<T>(s);
}

// Sum of n contiguous elements: two vectors of partial sums, then a fixed tree over
// their lanes, then the tail (vectorised, deterministic).
template <typename T>
inline __attribute__((always_inline)) T contiguous_sum_chunk(const T* __restrict__ x, int64_t n) {
  constexpr int64_t L = kVecLen<T>;
  if (n < L) {
    T s0 = 0, s1 = 0;
    int64_t i = 0;
    for (; i + 2 <= n; i += 2) {
      s0 += x[i];
      s1 += x[i + 1];
    }
    if (i < n) s0 += x[i];
    return s0 + s1;
  }
  Vec32<T> a0 = Vec32<T>::zero(), a1 = Vec32<T>::zero();
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    a0 = a0 + Vec32<T>::load(x + i);
    a1 = a1 + Vec32<T>::load(x + i + L);
  }
  if (i + L <= n) {
    a0 = a0 + Vec32<T>::load(x + i);
    i += L;
  }
  a0 = a0 + a1;
  T lane[L];
  a0.store(lane);
  for (int64_t w = L / 2; w >= 1; w /= 2)
    for (int64_t l = 0; l < w; ++l) lane[l] += lane[l + w];
  T s = lane[0];
  for (; i < n; ++i) s += x[i];
  return s;
}

// Sum of a (rows x cols) block read through strides (rs, cs); the partial sums of rows
// are added in double (see kSumChunk), and so are the elements of strided rows (a
// scalar loop either way).
template <typename T>
inline T block_sum(const T* x, int64_t rows, int64_t cols, int64_t rs, int64_t cs) {
  if (cs != 1 && rs == 1) {  // a transposed plane: read along its contiguous columns
    std::swap(rows, cols);
    std::swap(rs, cs);
  }
  if (cs == 1 && rs == cols) return contiguous_sum(x, rows * cols);
  double s = 0;
  for (int64_t r = 0; r < rows; ++r) {
    if (cs == 1) {
      s += contiguous_sum(x + r * rs, cols);
    } else {
      for (int64_t c = 0; c < cols; ++c) s += static_cast<double>(x[r * rs + c * cs]);
    }
  }
  return static_cast<T>(s);
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
  if (win.max_area > kSumChunk) {
    // Windows of more than kSumChunk elements (a few adaptive outputs of a large plane):
    // each summed on its own as global pooling sums, rows in chunks added in double; the
    // column sums of whole window heights in T below lost 1e-6 and more in float32.
    for (int64_t oh = 0; oh < p.OH; ++oh) {
      const int64_t h0 = win.hlo[oh], h1 = win.hhi[oh];
      for (int64_t ow = 0; ow < p.OW; ++ow) {
        const int64_t w0 = win.wlo[ow], w1 = win.whi[ow];
        y[oh * p.OW + ow] =
            block_sum(x + h0 * xh + w0 * xw, h1 - h0, w1 - w0, xh, xw) * win.inv[oh * p.OW + ow];
      }
    }
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
  if (win.global) {
    // Global pooling: one sum per plane; (n, c) stepped, not divided out, per plane.
    const T inv = win.inv[0];
    const bool dense = xs.w == 1 && xs.h == p.W;
    at::parallel_for(0, p.N * p.C, grain_for(per_item), [&](int64_t b, int64_t e) {
      int64_t n = b / p.C, c = b % p.C;
      for (int64_t item = b; item < e; ++item) {
        const T* xp = x + n * xs.n + c * xs.c;
        y[item] = (dense ? contiguous_sum(xp, p.H * p.W) : block_sum(xp, p.H, p.W, xs.h, xs.w)) * inv;
        if (++c == p.C) {
          c = 0;
          ++n;
        }
      }
    });
    return;
  }
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
// Dense channels: windows of up to 4 pixels sum one pixel per pass into out, windows
// of 5 to 16 pixels sum blocks of 4 vectors of channels in registers, larger ones four
// pixels per pass into acc; each channel's sum runs over the pixels in row-major order
// whatever the path.
template <typename T>
inline int window_channels(const T* x, const Strides4& xs, int64_t h0, int64_t h1, int64_t w0,
                            int64_t w1, int64_t C, T scale, T* __restrict__ acc,
                            T* __restrict__ out, int64_t os) {
  const int64_t pixels = (h1 - h0) * (w1 - w0);
  if (xs.c == 1 && os == 1 && pixels <= 4) {
    // Small windows (DenseNet's 2x2 transitions, whose input comes from L3 or memory):
    // one pixel per pass, summed into out itself (in L1): a copy of the first pixel, an
    // add per middle pixel, and the last add fused with the scaling. Each pass reads a
    // single contiguous run of C elements; passes that read two or four pixels at once
    // (interleaved streams) measured 1.3-1.6x slower here, and so did summing blocks
    // of channels in registers.
    const T* __restrict__ first = x + h0 * xs.h + w0 * xs.w;
    if (pixels == 1) {
      for (int64_t c = 0; c < C; ++c) out[c] = first[c] * scale;
      return kClSmall;
    }
    int64_t k = 0;
    for (int64_t ih = h0; ih < h1; ++ih) {
      for (int64_t iw = w0; iw < w1; ++iw, ++k) {
        const T* __restrict__ px = x + ih * xs.h + iw * xs.w;
        if (k == 0) {
          copy_channels(out, px, C);
        } else if (k + 1 < pixels) {
          row_add(out, px, 1, C);
        } else {
          for (int64_t c = 0; c < C; ++c) out[c] = (out[c] + px[c]) * scale;
        }
      }
    }
    return kClSmall;
  }
  if (xs.c == 1 && os == 1 && pixels > kSumChunk) {
    // Huge windows (global pooling of a large plane): chunks of kSumChunk pixels summed
    // in T into acc, each added per channel into a double total (see kSumChunk).
    const int64_t cols = w1 - w0;
    std::vector<double> total(C, 0.0);
    for (int64_t k0 = 0; k0 < pixels; k0 += kSumChunk) {
      const int64_t k1 = std::min(pixels, k0 + kSumChunk);
      for (int64_t k = k0; k < k1; ++k) {
        const T* px = x + (h0 + k / cols) * xs.h + (w0 + k % cols) * xs.w;
        if (k == k0) {
          copy_channels(acc, px, C);
        } else {
          row_add(acc, px, 1, C);
        }
      }
      for (int64_t c = 0; c < C; ++c) total[c] += static_cast<double>(acc[c]);
    }
    for (int64_t c = 0; c < C; ++c) out[c] = static_cast<T>(total[c]) * scale;
    return kClLarge;
  }
  if (xs.c == 1 && os == 1 && pixels > 16) {
    // Large windows (global pooling of cached maps): the first two pixels summed into
    // acc (in L1), then four pixels per pass over it (fewer loads and stores of acc
    // than one per pass: up to 2x faster on (32, 1024, 7, 7)), the last one or two added
    // while storing, all in the pixels' row-major order. The register blocks below
    // would read these pixels at a stride of C elements (for C * sizeof(T) a multiple
    // of 4 KiB all in one L1 set: 2.4x slower on (32, 1024, 7, 7)).
    const int64_t cols = w1 - w0;
    auto pixel = [&](int64_t k) { return x + (h0 + k / cols) * xs.h + (w0 + k % cols) * xs.w; };
    const T* __restrict__ p0 = pixel(0);
    const T* __restrict__ p1 = pixel(1);
    for (int64_t c = 0; c < C; ++c) acc[c] = p0[c] + p1[c];
    int64_t k = 2;
    for (; k + 4 < pixels; k += 4) {
      const T* __restrict__ q0 = pixel(k);
      const T* __restrict__ q1 = pixel(k + 1);
      const T* __restrict__ q2 = pixel(k + 2);
      const T* __restrict__ q3 = pixel(k + 3);
      for (int64_t c = 0; c < C; ++c) acc[c] = acc[c] + q0[c] + q1[c] + q2[c] + q3[c];
    }
    for (; k + 2 < pixels; ++k) row_add(acc, pixel(k), 1, C);
    const T* __restrict__ a = pixel(k);
    if (k + 2 == pixels) {
      const T* __restrict__ b = pixel(k + 1);
      for (int64_t c = 0; c < C; ++c) out[c] = (acc[c] + a[c] + b[c]) * scale;
    } else {
      for (int64_t c = 0; c < C; ++c) out[c] = (acc[c] + a[c]) * scale;
    }
    return kClLarge;
  }
  if (xs.c == 1 && os == 1) {
    constexpr int64_t L = kVecLen<T>;
    int64_t c = 0;
    for (; c + 4 * L <= C; c += 4 * L) {
      Vec32<T> a0 = Vec32<T>::zero(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t ih = h0; ih < h1; ++ih) {
        for (int64_t iw = w0; iw < w1; ++iw) {
          const T* px = x + ih * xs.h + iw * xs.w + c;
          a0 = a0 + Vec32<T>::load(px);
          a1 = a1 + Vec32<T>::load(px + L);
          a2 = a2 + Vec32<T>::load(px + 2 * L);
          a3 = a3 + Vec32<T>::load(px + 3 * L);
        }
      }
      (a0 * scale).store(out + c);
      (a1 * scale).store(out + c + L);
      (a2 * scale).store(out + c + 2 * L);
      (a3 * scale).store(out + c + 3 * L);
    }
    for (; c + L <= C; c += L) {
      Vec32<T> a0 = Vec32<T>::zero();
      for (int64_t ih = h0; ih < h1; ++ih)
        for (int64_t iw = w0; iw < w1; ++iw) a0 = a0 + Vec32<T>::load(x + ih * xs.h + iw * xs.w + c);
      (a0 * scale).store(out + c);
    }
    for (; c < C; ++c) {
      T a = 0;
      for (int64_t ih = h0; ih < h1; ++ih)
        for (int64_t iw = w0; iw < w1; ++iw) a += x[ih * xs.h + iw * xs.w + c];
      out[c] = a * scale;
    }
    return kClBlocks;
  }
  std::fill(acc, acc + C, T(0));
  for (int64_t ih = h0; ih < h1; ++ih)
    for (int64_t iw = w0; iw < w1; ++iw) row_add(acc, x + ih * xs.h + iw * xs.w, xs.c, C);
  for (int64_t c = 0; c < C; ++c) out[c * os] = acc[c] * scale;
  return kClStrided;
}

// Channels-last output: one (n, output row, channel block) per item.
// Returns the window loops that ran, a bit (1 << path) per path.
template <typename T>
unsigned forward_channels_last(const AvgPool2dParams& a, const Windows<T>& win,
                               const at::Tensor& input, at::Tensor& out) {
  const Pool2dParams& p = a.p;
  const Strides4 xs = strides_of(input), ys = strides_of(out);
  const T* x = input.const_data_ptr<T>();
  T* y = out.mutable_data_ptr<T>();
  constexpr int64_t CB = 1024;  // channels per item: the accumulators stay in L1
  const int64_t cblocks = (p.C + CB - 1) / CB;
  const int64_t window_elems = p.OW * std::max<int64_t>(1, (p.H * p.W) / std::max<int64_t>(1, p.OH * p.OW));
  const int64_t per_item = std::min(p.C, CB) * (window_elems + p.OW);
  std::atomic<unsigned> ran{0};
  at::parallel_for(0, p.N * p.OH * cblocks, grain_for(per_item), [&](int64_t b, int64_t e) {
    std::vector<T> acc(std::min(p.C, CB));
    unsigned used = 0;
    for (int64_t item = b; item < e; ++item) {
      const int64_t cb = item % cblocks, row = item / cblocks;
      const int64_t n = row / p.OH, oh = row % p.OH;
      const int64_t c0 = cb * CB, nc = std::min(CB, p.C - c0);
      const T* xn = x + n * xs.n + c0 * xs.c;
      for (int64_t ow = 0; ow < p.OW; ++ow) {
        used |= 1u << window_channels(xn, xs, win.hlo[oh], win.hhi[oh], win.wlo[ow], win.whi[ow],
                                      nc, win.inv[oh * p.OW + ow], acc.data(),
                                      y + n * ys.n + c0 * ys.c + oh * ys.h + ow * ys.w, ys.c);
      }
    }
    ran.fetch_or(used, std::memory_order_relaxed);
  });
  return ran.load(std::memory_order_relaxed);
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

// out[c] = sum over the outputs (oh, ow) in [oh0, oh1) x [ow0, ow1) of
// g[oh, ow, c] * inv[oh * OW + ow], for dense channels; g points at channel 0 of
// output (0, 0) of one sample. Blocks of 4 vectors of channels stay in registers.
template <typename T>
inline void gather_channels(const T* g, const Strides4& gs, int64_t oh0, int64_t oh1, int64_t ow0,
                            int64_t ow1, const T* inv, int64_t OW, int64_t C, T* __restrict__ out) {
  constexpr int64_t L = kVecLen<T>;
  int64_t c = 0;
  for (; c + 4 * L <= C; c += 4 * L) {
    Vec32<T> a0 = Vec32<T>::zero(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t oh = oh0; oh < oh1; ++oh) {
      for (int64_t ow = ow0; ow < ow1; ++ow) {
        const T* gp = g + oh * gs.h + ow * gs.w + c;
        const T s = inv[oh * OW + ow];
        a0 = a0 + Vec32<T>::load(gp) * s;
        a1 = a1 + Vec32<T>::load(gp + L) * s;
        a2 = a2 + Vec32<T>::load(gp + 2 * L) * s;
        a3 = a3 + Vec32<T>::load(gp + 3 * L) * s;
      }
    }
    a0.store(out + c);
    a1.store(out + c + L);
    a2.store(out + c + 2 * L);
    a3.store(out + c + 3 * L);
  }
  for (; c + L <= C; c += L) {
    Vec32<T> a0 = Vec32<T>::zero();
    for (int64_t oh = oh0; oh < oh1; ++oh)
      for (int64_t ow = ow0; ow < ow1; ++ow)
        a0 = a0 + Vec32<T>::load(g + oh * gs.h + ow * gs.w + c) * inv[oh * OW + ow];
    a0.store(out + c);
  }
  for (; c < C; ++c) {
    T a = 0;
    for (int64_t oh = oh0; oh < oh1; ++oh)
      for (int64_t ow = ow0; ow < ow1; ++ow) a += g[oh * gs.h + ow * gs.w + c] * inv[oh * OW + ow];
    out[c] = a;
  }
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
        if (gs.c == 1 && xs.c == 1) {
          gather_channels(gn, gs, olo[ih], ohi[ih], wlo[iw], whi[iw], win.inv.data(), p.OW, nc,
                          xr + iw * xs.w);
          continue;
        }
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

// Returns forward_channels_last's window loops (0 for NCHW).
template <typename T>
unsigned forward(const AvgPool2dParams& a, const at::Tensor& input, at::Tensor& out,
                 bool channels_last) {
  const Windows<T> win(a);
  if (channels_last) return forward_channels_last(a, win, input, out);
  forward_nchw(a, win, input, out);
  return 0;
}

template <typename T>
void backward(const AvgPool2dParams& a, const at::Tensor& grad_output, at::Tensor& gx,
              bool channels_last) {
  const Windows<T> win(a);
  if (channels_last) {
    backward_channels_last(a, win, grad_output, gx);
  } else {
    backward_nchw(a, win, grad_output, gx);
  }
}

