// float32 conv2d forward for inputs of very few channels (1 to 4: an RGB stem, AlexNet's
// one-channel first layer) with large kernels, for CPUs where sgemm::available(); on CPUs
// with AVX2 + FMA but no AVX-512F an 8-lane version of the same kernel (blocks of 16
// channels, tiles of 2 vectors x 6 positions or 1 x 12, 8 x 8 transposes for NCHW stores),
// which also takes up to 8 input channels and as few as 4 output channels (LeNet's layers).
//
// Such a layer has few taps per output (C x KH x KW: 121, 147) against many output
// channels, so as a GEMM its B side is the input unfolded (or read by stride phases, whose
// rows carry a few extra columns). Here instead the output channels fill the vector lanes
// (blocks of 64; a last block of whole vectors) and each position of a register tile (4
// vectors x 6 positions, 3 x 8, 2 x 12, 1 x 16) has its own accumulators: per tap, one load
// of each weight vector (the weight packed per call as [block][c][kh][kw][64]) and one
// broadcast of the input value under the tap per position, read from a zero-padded copy of
// the item's input rows (planar [C][rows][cols], or a channels_last input's pixel rows
// whole). No column matrix, no wasted columns. Tiles fill segments of 48 positions of a
// row, stored channels-contiguous when y is channels_last, else by 16 x 16 register
// transposes as runs of 16 positions per channel (NCHW). The sum over the taps is in the
// order (c, kh, kw), float32, a function of the shape only; bias is added after it, then
// ReLU. See docs/DESIGN.md, "Few input channels, large kernels".
#pragma once

#include <cstdint>
#include <functional>

#include "common/conv2d.h"
#include "tensors.h"

namespace cnnext {
namespace cpu {
namespace conv_tinyc {

using RowsDoneFn = std::function<void(int64_t n, int64_t oh0, int64_t oh1)>;

// Whether forward() takes this call: one group, a kernel of at least 25 taps, a stride of
// at most 4 across; with AVX-512F 1 to 4 input channels and at least 16 output channels,
// else with AVX2 + FMA 1 to 8 input channels, at least 4 output channels, at most 1024
// taps and a row buffer under 2^31 floats.
bool applies(const Conv2dParams& p);

// y = conv(x, w) (+ bias) (then max(., 0) with relu); w contiguous (O, C, KH, KW); x and y
// through their strides. rows_done (may be empty): called once per finished (sample, band
// of rows).
void forward(const float* x, const Strides4& xs, const float* w, const float* bias, float* y,
             const Strides4& ys, const Conv2dParams& p, bool relu, const RowsDoneFn& rows_done);

// The gradients of such layers on CPUs with AVX2 + FMA and no AVX-512F
// (csrc/cpu/conv2d_tinyc_grad.cpp), where the at::mm paths run GEMMs with 16 or fewer rows or
// a K of 16 or less (LeNet's second layer: 1.5x stock's time for each gradient). grad_applies:
// float32, one group, stride 1, dilation 1, 1 to 8 input channels, 4 to 16 output channels,
// at least 25 and at most 1024 taps, padding below the kernel.
bool grad_applies(const Conv2dParams& p);

// gx (every element written) = the input gradient for gy and w (contiguous O x C x KH x KW),
// through the strides of gy and gx, as a direct convolution of gy zero-padded with the
// weight: 8 positions of a gx row a vector, the taps of every output channel summed in the
// order (o, kh, kw) (float32; a function of the shape only). Returns false, having written
// nothing, where grad_applies is false or a weight value is not finite (it would meet the
// zero padding: path conv2d.tiny_c_grad.nonfinite_fallback).
bool input_backward(const float* gy, const Strides4& gs, const float* w, float* gx, const Strides4& xs,
                    const Conv2dParams& p);

// gw (contiguous O x C x KH x KW, every element written) = the weight gradient for gy and x
// (through their strides): per band of output rows, each (output channel, tap) a dot product
// over the band's positions in rows padded to the input's padded width, 8 positions a vector;
// the vector sums of a fixed set of bands (at most 16 sets, by the shape) added horizontally,
// then the sets in order (results do not depend on the thread count). Returns false where
// grad_applies is false or a value of x or gy is not finite (it would meet zeros that pad
// the rows; the caller's other paths run, and a non-finite result of a padded convolution
// is recomputed by the direct loops: cpu::conv2d_weight_backward).
bool weight_backward(const float* gy, const Strides4& gs, const float* x, const Strides4& xs, float* gw,
                     const Conv2dParams& p);

}  // namespace conv_tinyc
}  // namespace cpu
}  // namespace cnnext
