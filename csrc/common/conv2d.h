// Shape arithmetic and index math of 2-D cross-correlation, written once for the
// checks (csrc/ops), the CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda).
#pragma once

#include "macros.h"

namespace cnnext {

// Element strides of a 4-D tensor (N, C, H, W) in whatever memory layout it has.
struct Strides4 {
  int64_t n, c, h, w;
};

// Everything a kernel needs to know about one 2-D convolution. Filled by
// csrc/ops/conv2d.cpp after every argument has been checked.
struct Conv2dParams {
  int64_t N, C, H, W;   // input
  int64_t O, KH, KW;    // weight: (O, C / groups, KH, KW)
  int64_t OH, OW;       // output
  int64_t SH, SW;       // stride
  int64_t PH, PW;       // zero padding on each side
  int64_t DH, DW;       // dilation
  int64_t G;            // groups

  CNNEXT_HD int64_t in_per_group() const { return C / G; }
  CNNEXT_HD int64_t out_per_group() const { return O / G; }
};

// Extent of a kernel of k taps spaced d apart.
CNNEXT_HD int64_t conv_dilated_kernel(int64_t k, int64_t d) { return d * (k - 1) + 1; }

// Output length of a cross-correlation along one dimension; only meaningful when
// the dilated kernel fits in the padded input (conv_kernel_fits), which the checks
// establish before any kernel runs.
CNNEXT_HD int64_t conv_out_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d) {
  return (in + 2 * p - conv_dilated_kernel(k, d)) / s + 1;
}

// Output length of a transposed convolution along one dimension (the input length
// of the conv2d it is the adjoint of, lengthened by output_padding). May be < 1 for
// arguments the checks reject.
CNNEXT_HD int64_t conv_transpose_out_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d,
                                          int64_t output_padding) {
  return (in - 1) * s - 2 * p + conv_dilated_kernel(k, d) + output_padding;
}

CNNEXT_HD bool conv_kernel_fits(int64_t in, int64_t k, int64_t p, int64_t d) {
  return in + 2 * p >= conv_dilated_kernel(k, d);
}

// The stride-1 input gradient of p as a forward convolution of grad_output (with the weight
// flipped in space and transposed in channels): input and output channels and sizes
// swapped, padding d (k - 1) - p per side (negative: a crop).
CNNEXT_HD Conv2dParams conv_input_grad_as_forward(const Conv2dParams& p) {
  Conv2dParams q = p;
  q.C = p.O;
  q.H = p.OH;
  q.W = p.OW;
  q.O = p.C;
  q.OH = p.H;
  q.OW = p.W;
  q.PH = conv_dilated_kernel(p.KH, p.DH) - 1 - p.PH;
  q.PW = conv_dilated_kernel(p.KW, p.DW) - 1 - p.PW;
  return q;
}

// Input coordinate read by output position o through kernel tap t (may lie in the padding).
CNNEXT_HD int64_t conv_in_coord(int64_t o, int64_t t, int64_t s, int64_t p, int64_t d) {
  return o * s - p + t * d;
}

// The inverse: which output position reads input coordinate i through tap t.
// Returns false when none does (i falls between strides or outside the output).
CNNEXT_HD bool conv_out_coord(int64_t i, int64_t t, int64_t s, int64_t p, int64_t d,
                              int64_t out_size, int64_t* o) {
  const int64_t num = i + p - t * d;
  if (num < 0 || num % s != 0) return false;
  *o = num / s;
  return *o < out_size;
}

// Range [*lo, *hi) of output positions whose taps land inside [0, in) for tap t:
// the positions of a column of the im2col matrix that read real input, not padding.
CNNEXT_HD void conv_valid_out_range(int64_t t, int64_t in, int64_t s, int64_t p, int64_t d,
                                    int64_t out_size, int64_t* lo, int64_t* hi) {
  // o * s - p + t * d >= 0  <=>  o >= ceil((p - t*d) / s)
  const int64_t a = p - t * d;
  int64_t l = a <= 0 ? 0 : (a + s - 1) / s;
  // o * s - p + t * d <= in - 1  <=>  o <= floor((in - 1 + p - t*d) / s)
  const int64_t b = in - 1 + p - t * d;
  int64_t h = b < 0 ? 0 : b / s + 1;
  if (h > out_size) h = out_size;
  if (l > h) l = h;
  *lo = l;
  *hi = h;
}

// The first output position whose window lies inside [0, in) for every tap, or -1 when
// none does (every window meets the padding).
CNNEXT_HD int64_t conv_first_inside_out(int64_t out_size, int64_t in, int64_t k, int64_t s, int64_t p, int64_t d) {
  const int64_t o = (p + s - 1) / s;  // the first with o * s - p >= 0
  return o < out_size && o * s - p + (k - 1) * d < in ? o : -1;
}

}  // namespace cnnext
