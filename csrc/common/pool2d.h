// Shape arithmetic and window math of 2-D pooling (max, average, adaptive average),
// written once for the checks (csrc/ops), the CPU kernels (csrc/cpu) and the CUDA
// kernels (csrc/cuda). Follows torch's rules exactly (aten/src/ATen/native/Pool.h).
#pragma once

#include "macros.h"

namespace cnnext {

// Everything a kernel needs to know about one 2-D pooling window grid. Filled by
// make_pool_params (csrc/ops/pool2d_common.h) after every argument has been checked.
// Average pooling has no dilation (DH = DW = 1).
struct Pool2dParams {
  int64_t N, C, H, W;  // input
  int64_t OH, OW;      // output
  int64_t KH, KW;      // kernel
  int64_t SH, SW;      // stride
  int64_t PH, PW;      // implicit padding on each side (-inf for max, zeros for average)
  int64_t DH, DW;      // dilation
};

// floor(a / b) for b > 0, also for negative a (C++ division truncates toward zero).
CNNEXT_HD int64_t floor_div(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

// Output length of pooling along one dimension, torch's rule: with ceil_mode the
// division rounds up, but the last window must start inside the input or the left
// padding (start < in + p), else it is dropped. May be < 1 for arguments the checks
// reject (a window larger than the padded input).
CNNEXT_HD int64_t pool_out_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d,
                                bool ceil_mode) {
  const int64_t span = in + 2 * p - d * (k - 1) - 1;
  int64_t out = floor_div(span + (ceil_mode ? s - 1 : 0), s) + 1;
  if (ceil_mode && (out - 1) * s >= in + p) --out;
  return out;
}

// Average-pooling window of output position o along one dimension: [*lo, *hi) is
// the part inside the input; the return value is the window's length clipped to the
// padded input [-p, in + p), which count_include_pad=True divides by.
CNNEXT_HD int64_t avg_window(int64_t o, int64_t in, int64_t k, int64_t s, int64_t p,
                             int64_t* lo, int64_t* hi) {
  int64_t start = o * s - p;
  int64_t end = start + k;
  if (end > in + p) end = in + p;
  const int64_t padded_len = end - start;
  *lo = start < 0 ? 0 : start;
  *hi = end > in ? in : end;
  return padded_len;
}

// Adaptive pooling window of output position o of out along an input of length in:
// [floor(o * in / out), ceil((o + 1) * in / out)). out >= 1.
CNNEXT_HD int64_t adaptive_start(int64_t o, int64_t in, int64_t out) { return (o * in) / out; }
CNNEXT_HD int64_t adaptive_end(int64_t o, int64_t in, int64_t out) {
  return ((o + 1) * in + out - 1) / out;
}

// The output positions [*lo, *hi) along one dimension whose average-pooling window
// (avg_window: start o * s - p, length k) contains input position i, 0 <= i < in.
// The gather form of average pooling's backward sums over exactly these. A window
// clipped at in + p (ceil_mode) still contains every i < in it contained unclipped.
CNNEXT_HD void avg_windows_containing(int64_t i, int64_t k, int64_t s, int64_t p, int64_t out,
                                      int64_t* lo, int64_t* hi) {
  // o * s - p <= i  <=>  o <= floor((i + p) / s);  i < o * s - p + k  <=>  o > (i + p - k) / s.
  const int64_t first = floor_div(i + p - k, s) + 1;
  const int64_t last = floor_div(i + p, s);
  *lo = first < 0 ? 0 : first;
  *hi = last + 1 > out ? out : last + 1;
}

// The output positions [*lo, *hi) whose adaptive window [adaptive_start(o),
// adaptive_end(o)) contains input position i, 0 <= i < in; in, out >= 1:
// [floor(i * out / in), ceil((i + 1) * out / in)).
CNNEXT_HD void adaptive_windows_containing(int64_t i, int64_t in, int64_t out, int64_t* lo,
                                           int64_t* hi) {
  *lo = (i * out) / in;
  *hi = ((i + 1) * out + in - 1) / in;
}

// ---- Max pooling (csrc/ops/max_pool2d.cpp, csrc/cpu/max_pool2d.cpp, csrc/cuda/max_pool2d.cu) ----

// Taps of the max-pooling window of output position o along one dimension that lie
// inside the input: lo, lo + d, ... while < hi. torch's rule: the window starts at
// o * s - p, is stepped up by the dilation until it is inside the input, and ends at
// min(start + (k - 1) * d + 1, in). lo >= hi means no tap is inside the input (possible
// only with dilation): torch then outputs -inf with the index lo_h * W + lo_w, which may
// lie outside the window or the plane; such windows pass no gradient here.
CNNEXT_HD void max_window(int64_t o, int64_t in, int64_t k, int64_t s, int64_t p, int64_t d,
                          int64_t* lo, int64_t* hi) {
  int64_t start = o * s - p;
  int64_t end = start + (k - 1) * d + 1;
  if (end > in) end = in;
  if (start < 0) start += ((-start + d - 1) / d) * d;
  *lo = start;
  *hi = end;
}

// Windows that do not overlap (dilation 1, stride s >= kernel): the input coordinates
// [segment_start(o), segment_start(o + 1)) along one dimension are output o's: its window's
// taps inside the input (max_window's [lo, hi), which starts the segment) and the
// coordinates after them that no window covers. segment_start(0) = 0 and
// segment_start(out) = in, so the segments partition the input.
CNNEXT_HD int64_t tiled_segment_start(int64_t o, int64_t out, int64_t in, int64_t s, int64_t p) {
  if (o <= 0) return 0;
  if (o >= out) return in;
  const int64_t start = o * s - p;
  return start > 0 ? start : 0;
}

// Whether the window of output position o (one dimension) has a tap inside the input.
CNNEXT_HD bool max_window_nonempty(int64_t o, int64_t in, int64_t k, int64_t s, int64_t p,
                                   int64_t d) {
  int64_t lo, hi;
  max_window(o, in, k, s, p, d, &lo, &hi);
  return lo < hi;
}

// torch's update rule of the running maximum, scanning the window row by row: a value
// replaces the maximum when it is greater or NaN. So the first of equal maxima wins,
// and with NaN in the window the last NaN does.
template <typename A>
CNNEXT_HD bool max_pool_takes(A val, A cur) {
  return val > cur || val != val;
}

// The same choice between two candidates in any order, by flat index: a NaN beats a
// number and, between NaNs, the larger index wins; between numbers the greater wins
// and, when equal, the smaller index. Scanning in row-major order with max_pool_takes
// gives this result, so a kernel may split a window (rows first, then columns).
template <typename A, typename I>
CNNEXT_HD bool max_pool_prefers(A val, I idx, A cur, I cur_idx) {
  const bool vn = val != val, cn = cur != cur;
  if (vn || cn) return vn && (!cn || idx > cur_idx);
  return val > cur || (val == cur && idx < cur_idx);
}

}  // namespace cnnext
