// Entry points of the average-pooling backends (avg_pool2d and adaptive_avg_pool2d
// share them). csrc/ops/avg_pool2d.cpp checks the arguments, fills AvgPool2dParams and
// calls one of these; they trust what they are given. Every tensor here is 4-D (the ops
// layer turns unbatched input into a batch of one).
#pragma once

#include <ATen/ATen.h>

#include "common/avg_pool2d.h"

namespace cnnext {

#define CNNEXT_AVG_POOL2D_BACKEND_DECLS                                                        \
  /* out (N, C, OH, OW) in out_format: each output the average of its window of input. */     \
  at::Tensor avg_pool2d_forward(const at::Tensor& input, const AvgPool2dParams& a,             \
                                at::MemoryFormat out_format);                                  \
  /* grad_input (N, C, H, W) in out_format: each input element the sum, over the windows  */   \
  /* that contain it, of grad_output / divisor. Deterministic.                            */   \
  at::Tensor avg_pool2d_backward(const at::Tensor& grad_output, const AvgPool2dParams& a,      \
                                 at::MemoryFormat out_format);

namespace cpu {
CNNEXT_AVG_POOL2D_BACKEND_DECLS
}

#ifdef CNNEXT_WITH_CUDA
namespace cuda {
CNNEXT_AVG_POOL2D_BACKEND_DECLS
}
#endif

#undef CNNEXT_AVG_POOL2D_BACKEND_DECLS

}  // namespace cnnext
