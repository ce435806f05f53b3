// avg_pool2d and adaptive_avg_pool2d: argument checks and device dispatch (schemas:
// csrc/ops/op_table.h).
//
// Four ops, closed under differentiation (autograd: csrc/ops/autograd_pool2d.cpp; the
// algebra: cnnext/_avg_pool.py). Each forward is a linear map A of the input, and its
// backward the adjoint A^T of grad_output:
//   avg_pool2d                      y  = A x      (windows of kernel/stride/padding)
//   avg_pool2d_backward             dx = A^T dy
//   adaptive_avg_pool2d             y  = B x      (windows of output_size)
//   adaptive_avg_pool2d_backward    dx = B^T dy
// The backward ops take the forward's input only for its shape and layout (as torch's
// aten::avg_pool2d_backward does); it has no gradient.
#include <torch/library.h>

#include "ops/checks.h"
#include "ops/dispatch.h"
#include "ops/pool2d_common.h"

namespace cnnext {
namespace {

AvgPool2dParams avg_params(const char* op, at::IntArrayRef in, at::IntArrayRef kernel_size,
                           at::IntArrayRef stride, at::IntArrayRef padding, bool ceil_mode,
                           bool count_include_pad, c10::optional<int64_t> divisor_override) {
  // stride=None reaches the op as []: the kernel size, as in torch.
  const at::IntArrayRef s = stride.empty() ? kernel_size : stride;
  if (divisor_override.has_value()) {
    TORCH_CHECK(*divisor_override != 0, op,
                ": expected divisor_override to be non-zero (or None), got 0");
  }
  AvgPool2dParams a{};
  const int64_t dilation[2] = {1, 1};
  a.p = make_pool_params(op, in, kernel_size, s, padding, dilation, ceil_mode);
  a.adaptive = false;
  a.count_include_pad = count_include_pad;
  a.divisor = divisor_override.value_or(0);
  return a;
}

AvgPool2dParams adaptive_params(const char* op, at::IntArrayRef in, at::IntArrayRef output_size) {
  TORCH_CHECK(output_size.size() == 2, op,
              ": expected output_size to be a single integer or a pair, got ",
              output_size.size(), " values ", shape_str(output_size));
  TORCH_CHECK(output_size[0] >= 0 && output_size[1] >= 0, op,
              ": expected output_size to be non-negative, got ", shape_str(output_size));
  TORCH_CHECK(in[2] >= 1 && in[3] >= 1, op,
              ": expected input with non-zero height and width, got input of shape ",
              shape_str(in));
  AvgPool2dParams a{};
  a.p.N = in[0]; a.p.C = in[1]; a.p.H = in[2]; a.p.W = in[3];
  a.p.OH = output_size[0]; a.p.OW = output_size[1];
  a.p.DH = a.p.DW = 1;
  a.adaptive = true;
  a.count_include_pad = false;
  a.divisor = 0;
  return a;
}

// Output layout: the input's (channels_last when it is channels_last-contiguous and not
// also plain contiguous); unbatched input gives a contiguous output.
at::MemoryFormat out_format(const at::Tensor& x, bool batched) {
  return batched ? layout_of({x}) : at::MemoryFormat::Contiguous;
}

at::Tensor forward(const char* op, const at::Tensor& x, bool batched, const AvgPool2dParams& a) {
  const auto fmt = out_format(x, batched);
  return unbatch(CNNEXT_BACKEND(op, x, avg_pool2d_forward)(x, a, fmt), batched);
}

// The checks the backward ops share: grad_output and input both batched or both not,
// same dtype and device, grad_output of the forward's output shape.
std::pair<at::Tensor, at::Tensor> backward_operands(const char* op, const at::Tensor& grad_output,
                                                    const at::Tensor& input, bool* batched) {
  auto [g, g_batched] = as_batch(op, "grad_output", grad_output);
  auto [x, x_batched] = as_batch(op, "input", input);
  TORCH_CHECK(g_batched == x_batched, op, ": expected grad_output (", grad_output.dim(),
              "-D) and input (", input.dim(), "-D) to be both batched or both unbatched");
  check_dtype_supported(op, "grad_output", grad_output);
  check_same_dtype_device(op, "grad_output", grad_output, "input", input);
  *batched = x_batched;
  return {g, x};
}

void check_grad_output(const char* op, const AvgPool2dParams& a, const at::Tensor& g) {
  const std::vector<int64_t> want{a.p.N, a.p.C, a.p.OH, a.p.OW};
  TORCH_CHECK(g.sizes() == at::IntArrayRef(want), op, ": expected grad_output of shape ",
              shape_str(want), " (the output's), got ", shape_str(g.sizes()));
}

at::Tensor backward(const char* op, const at::Tensor& g, const at::Tensor& x, bool batched,
                    const AvgPool2dParams& a) {
  check_grad_output(op, a, g);
  const auto fmt = out_format(x, batched);
  return unbatch(CNNEXT_BACKEND(op, g, avg_pool2d_backward)(g, a, fmt), batched);
}

at::Tensor avg_pool2d(const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                      at::IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                      c10::optional<int64_t> divisor_override) {
  constexpr const char* op = "avg_pool2d";
  auto [x, batched] = as_batch(op, "input", input);
  check_dtype_supported(op, "input", input);
  const AvgPool2dParams a = avg_params(op, x.sizes(), kernel_size, stride, padding, ceil_mode,
                                       count_include_pad, divisor_override);
  return forward(op, x, batched, a);
}

at::Tensor avg_pool2d_backward(const at::Tensor& grad_output, const at::Tensor& input,
                               at::IntArrayRef kernel_size, at::IntArrayRef stride,
                               at::IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                               c10::optional<int64_t> divisor_override) {
  constexpr const char* op = "avg_pool2d_backward";
  bool batched = true;
  auto [g, x] = backward_operands(op, grad_output, input, &batched);
  const AvgPool2dParams a = avg_params(op, x.sizes(), kernel_size, stride, padding, ceil_mode,
                                       count_include_pad, divisor_override);
  return backward(op, g, x, batched, a);
}

at::Tensor adaptive_avg_pool2d(const at::Tensor& input, at::IntArrayRef output_size) {
  constexpr const char* op = "adaptive_avg_pool2d";
  auto [x, batched] = as_batch(op, "input", input);
  check_dtype_supported(op, "input", input);
  return forward(op, x, batched, adaptive_params(op, x.sizes(), output_size));
}

at::Tensor adaptive_avg_pool2d_backward(const at::Tensor& grad_output, const at::Tensor& input) {
  constexpr const char* op = "adaptive_avg_pool2d_backward";
  bool batched = true;
  auto [g, x] = backward_operands(op, grad_output, input, &batched);
  const int64_t out[2] = {g.size(2), g.size(3)};
  const AvgPool2dParams a = adaptive_params(op, x.sizes(), out);
  if (out[0] == 1 && out[1] == 1) {
    // A 1 x 1 output is torch's mean over H and W, whose gradient (an expanded grad_output
    // divided by H * W) comes back contiguous whatever the input's layout.
    check_grad_output(op, a, g);
    return unbatch(CNNEXT_BACKEND(op, g, avg_pool2d_backward)(g, a, at::MemoryFormat::Contiguous),
                   batched);
  }
  return backward(op, g, x, batched, a);
}

}  // namespace

// The same checked entry points serve both dispatch keys: they pick the backend
// from the input's device (CNNEXT_BACKEND).
static void impls(torch::Library& m) {
  m.impl("avg_pool2d", &avg_pool2d);
  m.impl("avg_pool2d_backward", &avg_pool2d_backward);
  m.impl("adaptive_avg_pool2d", &adaptive_avg_pool2d);
  m.impl("adaptive_avg_pool2d_backward", &adaptive_avg_pool2d_backward);
}
CNNEXT_IMPL_CPU_AND_CUDA(impls)

}  // namespace cnnext
