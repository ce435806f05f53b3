// Average pooling (avg_pool2d) and adaptive average pooling (adaptive_avg_pool2d),
// host+device: which input rows / columns each output averages and what it divides
// by. Used by the CPU kernels (csrc/cpu/avg_pool2d.cpp) and the CUDA kernels
// (csrc/cuda/avg_pool2d.cu); the window math itself is csrc/common/pool2d.h's.
#pragma once

#include "macros.h"
#include "pool2d.h"

namespace cnnext {

// Both ops as one: Pool2dParams (N, C, H, W, OH, OW, and for avg_pool2d the kernel,
// stride and padding; dilation 1) plus what sets the windows and the divisor.
struct AvgPool2dParams {
  Pool2dParams p;
  bool adaptive;           // adaptive windows (KH..PW unused), divisor = window size
  bool count_include_pad;  // avg_pool2d: the divisor counts the padding inside the window
  int64_t divisor;         // avg_pool2d: divisor_override, or 0 for none
};

// Window of output o along one dimension (input length in, output length out, kernel
// k, stride s, padding p): the input range [*lo, *hi) it sums, and its factor in the
// divisor. The divisor of output (oh, ow) is factor_h * factor_w unless a divisor
// override replaces it. *lo < *hi always: with torch's ceil_mode rule
// (pool_out_size) every average window holds at least one input element, so the
// divisor of count_include_pad=False is never 0; adaptive windows are never empty.
CNNEXT_HD int64_t avg_pool_window(const AvgPool2dParams& a, int64_t o, int64_t in, int64_t out,
                                  int64_t k, int64_t s, int64_t p, int64_t* lo, int64_t* hi) {
  if (a.adaptive) {
    *lo = adaptive_start(o, in, out);
    *hi = adaptive_end(o, in, out);
    return *hi - *lo;
  }
  const int64_t padded = avg_window(o, in, k, s, p, lo, hi);
  return a.count_include_pad ? padded : *hi - *lo;
}

CNNEXT_HD int64_t avg_pool_window_h(const AvgPool2dParams& a, int64_t oh, int64_t* lo,
                                    int64_t* hi) {
  return avg_pool_window(a, oh, a.p.H, a.p.OH, a.p.KH, a.p.SH, a.p.PH, lo, hi);
}

CNNEXT_HD int64_t avg_pool_window_w(const AvgPool2dParams& a, int64_t ow, int64_t* lo,
                                    int64_t* hi) {
  return avg_pool_window(a, ow, a.p.W, a.p.OW, a.p.KW, a.p.SW, a.p.PW, lo, hi);
}

// The outputs [*lo, *hi) along one dimension whose window contains input position i.
CNNEXT_HD void avg_pool_windows_containing(const AvgPool2dParams& a, int64_t i, int64_t in,
                                           int64_t out, int64_t k, int64_t s, int64_t p,
                                           int64_t* lo, int64_t* hi) {
  if (a.adaptive) {
    adaptive_windows_containing(i, in, out, lo, hi);
  } else {
    avg_windows_containing(i, k, s, p, out, lo, hi);
  }
}

// The divisor of an output whose window factors are fh and fw, in double: a product of
// two factors of 2^32 or more (huge kernels and padding) overflows int64.
CNNEXT_HD double avg_pool_divisor(const AvgPool2dParams& a, int64_t fh, int64_t fw) {
  return a.divisor != 0 ? static_cast<double>(a.divisor) : static_cast<double>(fh) * static_cast<double>(fw);
}

}  // namespace cnnext
