// Index math of the stride phases of a convolution's input gradient (conv_transpose2d's
// forward): written once for every kernel that splits a strided input gradient into
// stride-1 GEMMs (csrc/cpu/conv2d_sgemm.cpp; the same decomposition as the bfloat16
// path's in csrc/cpu/conv2d_bf16.cpp).
#pragma once

#include "macros.h"

namespace cnnext {

// One stride phase of the input gradient along one dimension, dilation 1: the input
// coordinates i = a + s * j (j in [0, count)) receive only the taps t = first - s * u
// (u in [0, taps), descending), from the output positions j - pad + u. So the phase is
// a stride-1 cross-correlation of grad_output, padded by `pad` before (negative: a crop),
// with those taps flipped; taps = 0 where no tap reaches the phase (its gradient is 0).
struct ConvGradPhase {
  int64_t count, first, taps, pad;
};
CNNEXT_HD ConvGradPhase conv_input_grad_phase(int64_t in, int64_t k, int64_t s, int64_t p,
                                              int64_t a) {
  ConvGradPhase r;
  r.count = a < in ? (in - a + s - 1) / s : 0;
  // Taps t with (a + p - t) % s == 0: t = res (mod s), below k.
  const int64_t res = (a + p) % s;
  if (res >= k) {
    r.first = res;
    r.taps = 0;
    r.pad = 0;
    return r;
  }
  r.first = res + (k - 1 - res) / s * s;
  r.taps = (r.first - res) / s + 1;
  r.pad = (r.first - a - p) / s;  // exact: a + p - first is a multiple of s
  return r;
}

}  // namespace cnnext
