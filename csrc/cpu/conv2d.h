// Entry points of the CPU conv2d backend (csrc/cpu/conv2d.cpp, conv2d_sgemm.cpp): those of
// csrc/backend_api/conv2d.h (types and contract), and the row-band forward the CPU
// conv_bn_relu2d builds on.
#pragma once

#include <ATen/ATen.h>

#include <functional>

#include "backend_api/conv2d.h"

namespace cnnext {
namespace cpu {

backend_api::conv2d_forward conv2d_forward;
backend_api::conv2d_input_backward conv2d_input_backward;
backend_api::conv2d_weight_backward conv2d_weight_backward;
backend_api::channel_sum channel_sum;
backend_api::add_channel_bias_ add_channel_bias_;

// conv2d_forward(input, weight, no bias, NCHW) into out and conv2d_weight_backward(other,
// input) into grad_weight at once, where both would unfold input the same way: one unfolding
// then serves both GEMMs, each result bitwise its own op's. conv_transpose2d's backward
// (grad_input and grad_weight both unfold grad_output) calls it with grad mode off. Returns
// false, leaving out and grad_weight alone, where the shared path does not apply (the caller
// then calls the two ops).
bool conv2d_and_weight_backward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& other,
                                const Conv2dParams& p, at::Tensor& out, at::Tensor& grad_weight);

// The bfloat16 forward where the float path on float copies would unfold the input for
// at::mm (conv2d.fwd.mm), on AVX2 without the AVX-512 GEMM: the same float columns, GEMMs
// and one rounding a value, read from and written to the bfloat16 tensors directly (bitwise
// the float path's result rounded). False, out untouched, where it does not apply.
bool conv2d_forward_bf16_unfolded(const at::Tensor& input, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias, const Conv2dParams& p, at::Tensor& out,
                                  bool relu);

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
