// The checks that fill Conv2dParams, shared by the op files of the conv2d family
// (csrc/ops/conv2d.cpp, conv_transpose2d.cpp, conv_bn_relu2d.cpp).
#pragma once

#include <ATen/ATen.h>


#include "common/conv2d.h"
#include "ops/checks.h"

namespace cnnext {

// Checks every size and hyper-parameter and fills the kernel parameters.
// in: (N, C, H, W); w: (O, C / groups, KH, KW).
inline Conv2dParams make_params(const char* op, at::IntArrayRef in, at::IntArrayRef w,
                         at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(w.size() == 4, op,
              ": expected weight to be 4-D (out_channels, in_channels / groups, kH, kW), got ",
              w.size(), "-D tensor of shape ", shape_str(w));
  check_pair(op, "stride", stride, 1);
  check_pair(op, "padding", padding, 0);
  check_pair(op, "dilation", dilation, 1);
  TORCH_CHECK(groups >= 1, op, ": expected groups to be at least 1, got ", groups);
  for (int64_t s : in) TORCH_CHECK(s >= 0, op, ": negative input size ", shape_str(in));

  Conv2dParams p{};
  p.N = in[0]; p.C = in[1]; p.H = in[2]; p.W = in[3];
  p.O = w[0]; p.KH = w[2]; p.KW = w[3];
  p.SH = stride[0]; p.SW = stride[1];
  p.PH = padding[0]; p.PW = padding[1];
  p.DH = dilation[0]; p.DW = dilation[1];
  p.G = groups;

  TORCH_CHECK(p.O >= 1 && p.KH >= 1 && p.KW >= 1, op,
              ": expected weight to have at least one output channel and a non-empty kernel, "
              "got weight of shape ", shape_str(w));
  TORCH_CHECK(p.O % groups == 0, op, ": expected out_channels (weight.size(0) = ", p.O,
              ") to be divisible by groups = ", groups);
  TORCH_CHECK(p.C % groups == 0, op, ": expected in_channels (input.size(1) = ", p.C,
              ") to be divisible by groups = ", groups);
  TORCH_CHECK(w[1] * groups == p.C, op, ": expected weight to have ", p.C / groups,
              " input channels per group (input has ", p.C, " channels, groups=", groups,
              "), got ", w[1], " (weight of shape ", shape_str(w), "): expected input", shape_str(in),
              " to have ", w[1] * groups, " channels, but got ", p.C, " channels instead");
  TORCH_CHECK(p.H > 0 && p.W > 0, op, ": expected input to have non-zero height and width, got ",
              "input of shape ", shape_str(in));
  TORCH_CHECK(conv_kernel_fits(p.H, p.KH, p.PH, p.DH) && conv_kernel_fits(p.W, p.KW, p.PW, p.DW),
              op, ": expected the dilated kernel (", conv_dilated_kernel(p.KH, p.DH), " x ",
              conv_dilated_kernel(p.KW, p.DW), ", kernel ", p.KH, " x ", p.KW, ", dilation ",
              shape_str(dilation), ") to fit in the padded input (", p.H + 2 * p.PH, " x ",
              p.W + 2 * p.PW, ", input ", p.H, " x ", p.W, ", padding ", shape_str(padding), ")");
  p.OH = conv_out_size(p.H, p.KH, p.SH, p.PH, p.DH);
  p.OW = conv_out_size(p.W, p.KW, p.SW, p.PW, p.DW);
  return p;
}

// conv2d(input, weight) into out and conv2d_weight_backward(other, input, weight's size)
// into grad_weight at once, sharing one unfolding of input (conv_transpose2d's backward,
// csrc/ops/autograd_conv2d.cpp). Only for plain, dense, batched CPU tensors reached with
// grad mode off, no forward-mode tangent and no dispatch mode or functorch layer in effect
// (the kernel is called directly, around the dispatcher), and where the CPU backend has the
// shared path (cpu::conv2d_and_weight_backward); false otherwise, out and grad_weight left
// alone: the caller calls the two ops. Defined in csrc/ops/conv2d.cpp.
bool conv2d_and_weight_backward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& other,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups, at::Tensor& out, at::Tensor& grad_weight);

}  // namespace cnnext
