// float32 conv2d forward with channels innermost (channels_last) on both sides, through
// our sgemm (csrc/cpu/sgemm.h), for CPUs where sgemm::available().
//
// In channels_last a convolution is a GEMM with no unfolding at all: output position l
// (a row of y, its O channels contiguous) = the sum over the taps of x's pixel under the
// tap (C channels contiguous) times the weight's (C x O) slice of the tap. Each work item
// is a block of output positions (a band of rows of one sample, or several whole samples
// when maps are small); it copies the input rows its windows read, zero-padded, into a
// thread-local buffer, then accumulates GEMMs into its block of y that read their A rows
// in place in that buffer (sgemm::gemm_arows): one per kernel row (its taps are adjacent
// pixels, so a row of A is KW x C contiguous floats) or, with dilation across, one per
// tap. Where a kernel row holds few channels (the RGB stem) the block is unfolded
// instead and runs as one GEMM. The weight is packed once per call. The blocks and the
// order of every sum are a function of the shape, not of the thread count.
#pragma once

#include <cstdint>
#include <functional>

#include "common/conv2d.h"
#include "tensors.h"

namespace cnnext {
namespace cpu {
namespace conv_nhwc {

using RowsDoneFn = std::function<void(int64_t n, int64_t oh0, int64_t oh1)>;

// Whether forward() takes this call: groups 1, x's pixels dense (channel stride 1, pixel
// stride C), y dense channels_last (N, OH, OW, O).
bool applies(const Conv2dParams& p, const Strides4& xs, const Strides4& ys);

// y = conv(x, w) (+ bias) (then max(., 0) with relu). w is read through its strides ws
// (O, C, KH, KW). rows_done (may be empty) as conv2d_forward_rows's: called once per
// finished (sample, band of rows).
void forward(const float* x, const Strides4& xs, const float* w, const Strides4& ws, const float* bias,
             float* y, const Conv2dParams& p, bool relu, const RowsDoneFn& rows_done);

}  // namespace conv_nhwc
}  // namespace cpu
}  // namespace cnnext
