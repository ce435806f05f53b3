// Small torch-side helpers shared by the backends.
#pragma once

#include <ATen/ATen.h>

#include "common/conv2d.h"

namespace cnnext {

// Element strides of a 4-D tensor, for kernels that index through them.
inline Strides4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

}  // namespace cnnext
