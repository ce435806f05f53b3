// conv_transpose2d: argument checks and device dispatch (schema: csrc/ops/op_table.h).
//
// The transposed convolution is the adjoint of conv2d: with A_w the map
// x -> conv2d(x, w, stride, padding, dilation, groups) from (N, C_out, H_out, W_out) to
// (N, C_in, H, W), conv_transpose2d(x, w) = A_w^T x + bias, which is what the backends'
// conv2d_input_backward computes. Its autograd (csrc/ops/autograd_conv2d.cpp) is written
// with the conv2d ops. output_padding only lengthens H_out / W_out:
//   H_out = (H - 1) * stride - 2 * padding + dilation * (kH - 1) + output_padding + 1.
// When output_padding >= stride (torch allows it while output_padding < dilation), the
// conv2d over H_out has more output rows than the input has; the input is then padded
// with zero rows (columns) at the end, which is what torch computes too.
#include <torch/library.h>

#include "ops/checks.h"
#include "ops/dispatch.h"
#include "ops/conv2d_common.h"

namespace cnnext {
namespace {

at::Tensor conv_transpose2d(const at::Tensor& input, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef output_padding,
                            int64_t groups, at::IntArrayRef dilation) {
  constexpr const char* op = "conv_transpose2d";
  auto [x, batched] = as_batch(op, "input", input);
  // A dtype mismatch first (RuntimeError, as torch; bias below), then a dtype without a kernel.
  check_same_dtype_device(op, "input", input, "weight", weight);
  TORCH_CHECK(weight.dim() == 4, op,
              ": expected weight to be 4-D (in_channels, out_channels / groups, kH, kW), got ",
              weight.dim(), "-D tensor of shape ", shape_str(weight.sizes()));
  check_pair(op, "stride", stride, 1);
  check_pair(op, "padding", padding, 0);
  check_pair(op, "output_padding", output_padding, 0);
  check_pair(op, "dilation", dilation, 1);
  TORCH_CHECK(groups >= 1, op, ": expected groups to be at least 1, got ", groups);

  const int64_t N = x.size(0), C_in = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t KH = weight.size(2), KW = weight.size(3);
  TORCH_CHECK(weight.size(0) == C_in, op, ": expected weight.size(0) to be in_channels = ", C_in,
              " (the input's channels), got ", weight.size(0), " (weight of shape ",
              shape_str(weight.sizes()), ")");
  TORCH_CHECK(C_in % groups == 0, op, ": expected in_channels (weight.size(0) = ", C_in,
              ") to be divisible by groups = ", groups);
  TORCH_CHECK(C_in >= 1 && weight.size(1) >= 1 && KH >= 1 && KW >= 1, op,
              ": expected weight to have at least one input and one output channel and a "
              "non-empty kernel, got weight of shape ", shape_str(weight.sizes()));
  TORCH_CHECK(H > 0 && W > 0, op, ": expected input to have non-zero height and width, got ",
              "input of shape ", shape_str(x.sizes()));
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK(output_padding[d] < stride[d] || output_padding[d] < dilation[d], op,
                ": expected output_padding to be smaller than either stride or dilation in "
                "each dim, got output_padding ", shape_str(output_padding), ", stride ",
                shape_str(stride), ", dilation ", shape_str(dilation));
  }
  const int64_t C_out = weight.size(1) * groups;
  const int64_t HO = conv_transpose_out_size(H, KH, stride[0], padding[0], dilation[0],
                                             output_padding[0]);
  const int64_t WO = conv_transpose_out_size(W, KW, stride[1], padding[1], dilation[1],
                                             output_padding[1]);
  TORCH_CHECK(HO >= 1 && WO >= 1, op, ": expected a non-empty output, got output size ", HO,
              " x ", WO, " (input ", H, " x ", W, ", kernel ", KH, " x ", KW, ", stride ",
              shape_str(stride), ", padding ", shape_str(padding), ", output_padding ",
              shape_str(output_padding), ", dilation ", shape_str(dilation), ")");
  if (bias.has_value() && bias->defined()) {
    check_same_dtype_device(op, "input", input, "bias", *bias);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C_out, op,
                ": expected bias to be 1-D of size out_channels = ", C_out, " (weight.size(1) * groups), "
                "got shape ", shape_str(bias->sizes()));
  }
  check_dtype_supported(op, "input", input);

  // The adjoint conv2d: from the output (N, C_out, HO, WO) back to the input's shape.
  const std::vector<int64_t> out_size{N, C_out, HO, WO};
  const Conv2dParams p =
      make_params(op, out_size, weight.sizes(), stride, padding, dilation, groups);
  TORCH_INTERNAL_ASSERT(p.O == C_in && p.OH >= H && p.OW >= W && p.OH - H < stride[0] + dilation[0] &&
                            p.OW - W < stride[1] + dilation[1],
                        op, ": the adjoint conv2d of output ", shape_str(out_size),
                        " has output ", p.OH, " x ", p.OW, ", not the input's ", H, " x ", W);
  // output_padding >= stride: the adjoint has more rows (columns) than the input; the
  // missing ones are zeros.
  const at::Tensor g =
      p.OH == H && p.OW == W ? x : at::constant_pad_nd(x, {0, p.OW - W, 0, p.OH - H}, 0);
  const auto fmt = batched ? layout_of({x, weight}) : layout_of({weight});
  at::Tensor out = CNNEXT_BACKEND(op, x, conv2d_input_backward)(g, weight, p, fmt);
  if (bias.has_value() && bias->defined()) CNNEXT_BACKEND(op, x, add_channel_bias_)(out, *bias);
  return unbatch(out, batched);
}

}  // namespace

static void impls(torch::Library& m) { m.impl("conv_transpose2d", &conv_transpose2d); }
CNNEXT_IMPL_CPU_AND_CUDA(impls)

}  // namespace cnnext
