// float32 conv2d forward for inputs of very few channels (1 to 4: an RGB stem, AlexNet's
// one-channel first layer) with large kernels, for CPUs where sgemm::available().
//
// Such a layer has few taps per output (C x KH x KW: 121, 147) against many output
// channels, so as a GEMM its B side is the input unfolded (or read by stride phases, whose
// rows carry a few extra columns). Here instead the output channels fill the vector lanes
// (blocks of 32, two vectors; a last block of 16) and each of up to 12 output positions
// of a row has its own accumulators: per tap, one load of each weight vector (the weight
// prepacked per call as [block][c][kh][kw][32]) and one broadcast of the input value under
// the tap per position, read from a zero-padded copy of the item's input rows (planar
// [C][rows][cols] whatever x's layout). No column matrix, no wasted columns. Results are
// stored channels-contiguous when y is channels_last, else through y's strides (NCHW:
// per channel, a run of positions). The sum over the taps is in the order (c, kh, kw),
// float32, a function of the shape only; bias is added after it, then ReLU.
#pragma once

#include <cstdint>
#include <functional>

#include "common/conv2d.h"
#include "tensors.h"

namespace cnnext {
namespace cpu {
namespace conv_tinyc {

using RowsDoneFn = std::function<void(int64_t n, int64_t oh0, int64_t oh1)>;

// Whether forward() takes this call: AVX-512F, one group, 1 to 4 input channels, a kernel
// of at least 25 taps, a stride of at most 4 across, at least 16 output channels.
bool applies(const Conv2dParams& p);

// y = conv(x, w) (+ bias) (then max(., 0) with relu); w contiguous (O, C, KH, KW); x and y
// through their strides. rows_done (may be empty): called once per finished (sample, band
// of rows).
void forward(const float* x, const Strides4& xs, const float* w, const float* bias, float* y,
             const Strides4& ys, const Conv2dParams& p, bool relu, const RowsDoneFn& rows_done);

}  // namespace conv_tinyc
}  // namespace cpu
}  // namespace cnnext
