// Entry points of the conv2d backends. csrc/ops/conv2d.cpp checks the arguments,
// fills Conv2dParams and calls one of these; they trust what they are given.
// Every tensor here is 4-D (the ops layer turns unbatched input into a batch of one).
#pragma once

#include <ATen/ATen.h>

#include "common/conv2d.h"

namespace cnnext {

#define CNNEXT_CONV2D_BACKEND_DECLS                                                           \
  at::Tensor conv2d_forward(const at::Tensor& input, const at::Tensor& weight,                \
                            const c10::optional<at::Tensor>& bias, const Conv2dParams& p,     \
                            at::MemoryFormat out_format);                                     \
  at::Tensor conv2d_input_backward(const at::Tensor& grad_output, const at::Tensor& weight,   \
                                   const Conv2dParams& p, at::MemoryFormat out_format);       \
  at::Tensor conv2d_weight_backward(const at::Tensor& grad_output, const at::Tensor& input,   \
                                    const Conv2dParams& p);                                   \
  at::Tensor channel_sum(const at::Tensor& t);                                                \
  /* out[n, c, h, w] += bias[c], in place, through out's strides; bias 1-D of size C. */      \
  void add_channel_bias_(at::Tensor& out, const at::Tensor& bias);

namespace cpu {
CNNEXT_CONV2D_BACKEND_DECLS
}

#ifdef CNNEXT_WITH_CUDA
namespace cuda {
CNNEXT_CONV2D_BACKEND_DECLS
}
#endif

#undef CNNEXT_CONV2D_BACKEND_DECLS

}  // namespace cnnext
