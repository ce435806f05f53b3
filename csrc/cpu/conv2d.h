// Entry points of the CPU conv2d backend (csrc/cpu/conv2d.cpp). csrc/ops/conv2d.cpp
// checks the arguments, fills Conv2dParams and calls these; they trust what they are
// given. Every tensor here is 4-D (the op layer turns unbatched input into a batch of one).
#pragma once

#include <ATen/ATen.h>

#include <functional>

#include "common/conv2d.h"

namespace cnnext {
namespace cpu {

// With `relu`, each output value is max(value + bias, 0), applied as it is written (no
// separate pass; conv_bn_relu2d's inference path).
at::Tensor conv2d_forward(const at::Tensor& input, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias, const Conv2dParams& p,
                          at::MemoryFormat out_format, bool relu = false);
at::Tensor conv2d_input_backward(const at::Tensor& grad_output, const at::Tensor& weight,
                                 const Conv2dParams& p, at::MemoryFormat out_format);
at::Tensor conv2d_weight_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                  const Conv2dParams& p);
at::Tensor channel_sum(const at::Tensor& t);
// out[n, c, h, w] += bias[c], in place, through out's strides; bias 1-D of size C.
void add_channel_bias_(at::Tensor& out, const at::Tensor& bias);

// Called by conv2d_forward_rows once output rows [oh0, oh1) of sample n are final in
// every channel (bias and ReLU applied), on the thread that wrote them while they are
// still in its cache where the path allows. The calls cover every (n, row) exactly once;
// the row bands are a fixed function of the arguments (not of the thread count), and
// calls may run concurrently on different bands.
using RowsDone = std::function<void(int64_t n, int64_t oh0, int64_t oh1)>;

// conv2d_forward into `out` (allocated by the caller, N, O, OH, OW), calling rows_done
// (when set) as each band of rows is finished: conv_bn_relu2d gathers its batch
// statistics there while the band is hot.
void conv2d_forward_rows(const at::Tensor& input, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, const Conv2dParams& p,
                         at::Tensor& out, bool relu, const RowsDone& rows_done);

}  // namespace cpu
}  // namespace cnnext
