// float32 conv2d through our sgemm (csrc/cpu/sgemm.h), for CPUs where sgemm::available().
// Raw pointers and strides; conv2d.cpp chooses these paths and owns the tensors.
//
// Output positions are counted over the whole batch: global output row r = n * OH + oh,
// position l = r * OW + ow. The GEMMs run over chunks of global rows, so one GEMM spans
// several samples when their maps are small (a 6x6 map has 36 positions, a GEMM panel 32),
// and each chooses its orientation by shape: output positions on the GEMM's N side (panels
// of 32) with channels on M (panels of 8), or transposed, whichever wastes less padding.
#pragma once

#include <cstdint>
#include <functional>

#include "common/conv2d.h"

namespace cnnext {
namespace cpu {
namespace conv_sgemm {

using RowsDoneFn = std::function<void(int64_t n, int64_t oh0, int64_t oh1)>;

// y = conv(x, w) (+ bias) (then max(., 0) with relu); y's (h, w) planes must flatten
// (y.stride(2) == OW * y.stride(3)). rows_done (may be empty) as in conv2d_forward_rows:
// its row bands depend on the shape only.
void forward(const float* x, const Strides4& xs, const float* w, const float* bias, float* y,
             const Strides4& ys, const Conv2dParams& p, bool relu, const RowsDoneFn& rows_done);

// gx = conv2d input gradient of gy. gx must be zero on entry unless
// input_backward_overwrites(p, xs) (xs: gx's strides; stride 1: computed as a forward
// convolution of gy, or by rows of few input channels; strided kernels at least their
// stride: by stride phases).
bool input_backward_overwrites(const Conv2dParams& p, const Strides4& xs);
void input_backward(const float* gy, const Strides4& gs, const float* w, float* gx,
                    const Strides4& xs, const Conv2dParams& p);

// gw (O, C / G, KH, KW contiguous) = conv2d weight gradient.
void weight_backward(const float* gy, const Strides4& gs, const float* x, const Strides4& xs,
                     float* gw, const Conv2dParams& p);

// Which orientation a GEMM of `positions` output positions by `channels` channels takes:
// true = positions on the M side (transposed). Exposed for the tests' shape choice.
bool positions_on_m(int64_t positions, int64_t channels);

// Whether the forward takes its small-map path (every output position of the batch in one
// GEMM column panel set, the weight read in place: "conv2d.sgemm.small_n").
bool small_n_applies(const Conv2dParams& p);

// Whether the forward takes its few-channels path (12 to 16 output channels per group in
// the lanes of one vector, maps narrower than 16 columns, unit step along the source's
// rows: "conv2d.sgemm.channel_lanes"). xs: the input's strides.
bool channel_lanes_applies(const Conv2dParams& p, const Strides4& xs);

}  // namespace conv_sgemm
}  // namespace cpu
}  // namespace cnnext
