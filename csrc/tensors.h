// Small torch-side helpers shared by the op layer (csrc/ops) and the backends (csrc/cpu,
// the torch side of csrc/cuda). Not in csrc/common, which stays torch-free for the .cu files.
#pragma once

#include <ATen/ATen.h>

#include "common/conv2d.h"

namespace cnnext {

// Element strides of a 4-D tensor, for kernels that index through them.
inline Strides4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// conv_bn_relu2d's statistics dtype: float for float16 / bfloat16 input, the input's
// dtype otherwise.
inline at::ScalarType stats_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

}  // namespace cnnext
