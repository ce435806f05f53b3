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

}  // namespace conv_tinyc
}  // namespace cpu
}  // namespace cnnext
