// The checks that fill Pool2dParams, shared by the pooling op files
// (csrc/ops/max_pool2d.cpp, csrc/ops/avg_pool2d.cpp). Torch's rules and messages'
// content (aten/src/ATen/native/Pool.h pool2d_shape_check), each naming the argument.
#pragma once

#include <ATen/ATen.h>

#include "common/pool2d.h"
#include "ops/checks.h"

namespace cnnext {

// in: the 4-D input sizes (N, C, H, W); kernel, stride, padding, dilation: pairs
// (stride already defaulted to kernel by the caller when it was empty).
inline Pool2dParams make_pool_params(const char* op, at::IntArrayRef in, at::IntArrayRef kernel,
                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, bool ceil_mode) {
  check_pair(op, "kernel_size", kernel, 1);
  check_pair(op, "stride", stride, 1);
  check_pair(op, "padding", padding, 0);
  check_pair(op, "dilation", dilation, 1);
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK(padding[d] <= kernel[d] / 2, op,
                ": expected padding to be at most half of kernel_size, got padding ",
                shape_str(padding), " with kernel_size ", shape_str(kernel));
  }
  TORCH_CHECK(in[1] >= 1 && in[2] >= 1 && in[3] >= 1, op,
              ": expected input with non-zero channels, height and width, got input of shape ",
              shape_str(in));
  Pool2dParams p{};
  p.N = in[0]; p.C = in[1]; p.H = in[2]; p.W = in[3];
  p.KH = kernel[0]; p.KW = kernel[1];
  p.SH = stride[0]; p.SW = stride[1];
  p.PH = padding[0]; p.PW = padding[1];
  p.DH = dilation[0]; p.DW = dilation[1];
  p.OH = pool_out_size(p.H, p.KH, p.SH, p.PH, p.DH, ceil_mode);
  p.OW = pool_out_size(p.W, p.KW, p.SW, p.PW, p.DW, ceil_mode);
  TORCH_CHECK(p.OH >= 1 && p.OW >= 1, op, ": expected the window (kernel_size ",
              shape_str(kernel), ", dilation ", shape_str(dilation),
              ") to fit in the padded input (", p.H + 2 * p.PH, " x ", p.W + 2 * p.PW,
              ", input ", p.H, " x ", p.W, ", padding ", shape_str(padding),
              "); the output would be ", p.OH, " x ", p.OW);
  return p;
}

}  // namespace cnnext
