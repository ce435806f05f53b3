// conv2d: argument checks and device dispatch (schemas: csrc/ops/op_table.h). The only
// place that checks what a user passed; the backends trust the Conv2dParams filled here.
//
// Four ops, closed under differentiation (autograd: csrc/ops/autograd_conv2d.cpp; the
// algebra: cnnext/_autograd.py):
//   conv2d                  y  = x (*) w + b
//   conv2d_input_backward   dx = dy (*)^T w      (also transposed convolution)
//   conv2d_weight_backward  dw = x (*)^T dy
//   channel_sum             db = sum of dy over every dim but the channel dim
#include <torch/library.h>

#include "ops/checks.h"
#include "ops/dispatch.h"
#include "ops/conv2d_common.h"

namespace cnnext {
namespace {

void check_grad_output(const char* op, const Conv2dParams& p, const at::Tensor& g) {
  const std::vector<int64_t> want{p.N, p.O, p.OH, p.OW};
  TORCH_CHECK(g.sizes() == at::IntArrayRef(want), op, ": expected grad_output of shape ",
              shape_str(want), ", got ", shape_str(g.sizes()));
}

at::Tensor conv2d(const at::Tensor& input, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  constexpr const char* op = "conv2d";
  auto [x, batched] = as_batch(op, "input", input);
  // A dtype mismatch first (RuntimeError, as torch; bias below), then a dtype without a kernel.
  check_same_dtype_device(op, "input", input, "weight", weight);
  const Conv2dParams p = make_params(op, x.sizes(), weight.sizes(), stride, padding, dilation, groups);
  if (bias.has_value() && bias->defined()) {
    check_same_dtype_device(op, "input", input, "bias", *bias);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == p.O, op,
                ": expected bias to be 1-D of size out_channels = ", p.O, ", got shape ",
                shape_str(bias->sizes()));
  }
  check_dtype_supported(op, "input", input);
  const auto fmt = batched ? layout_of({x, weight}) : layout_of({weight});
  return unbatch(CNNEXT_BACKEND(op, x, conv2d_forward)(x, weight, bias, p, fmt, false), batched);
}

at::Tensor conv2d_input_backward(const at::Tensor& grad_output, const at::Tensor& weight,
                                 at::IntArrayRef input_size, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups) {
  constexpr const char* op = "conv2d_input_backward";
  auto [g, batched] = as_batch(op, "grad_output", grad_output);
  TORCH_CHECK(input_size.size() == (batched ? 4u : 3u), op, ": expected input_size of ",
              batched ? 4 : 3, " entries to match grad_output's ", grad_output.dim(),
              " dims, got ", shape_str(input_size));
  std::vector<int64_t> in(input_size.begin(), input_size.end());
  if (!batched) in.insert(in.begin(), 1);
  check_dtype_supported(op, "grad_output", grad_output);
  check_same_dtype_device(op, "grad_output", grad_output, "weight", weight);
  const Conv2dParams p = make_params(op, in, weight.sizes(), stride, padding, dilation, groups);
  check_grad_output(op, p, g);
  const auto fmt = batched ? layout_of({g, weight}) : layout_of({weight});
  return unbatch(CNNEXT_BACKEND(op, g, conv2d_input_backward)(g, weight, p, fmt), batched);
}

at::Tensor conv2d_weight_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                  at::IntArrayRef weight_size, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups) {
  constexpr const char* op = "conv2d_weight_backward";
  auto [g, g_batched] = as_batch(op, "grad_output", grad_output);
  auto [x, x_batched] = as_batch(op, "input", input);
  TORCH_CHECK(g_batched == x_batched, op, ": expected grad_output (", grad_output.dim(),
              "-D) and input (", input.dim(), "-D) to be both batched or both unbatched");
  check_dtype_supported(op, "grad_output", grad_output);
  check_same_dtype_device(op, "grad_output", grad_output, "input", input);
  const Conv2dParams p = make_params(op, x.sizes(), weight_size, stride, padding, dilation, groups);
  check_grad_output(op, p, g);
  const at::Tensor gw = CNNEXT_BACKEND(op, g, conv2d_weight_backward)(g, x, p);
  // The weight gradient takes the layout the input and output had (as torch's does).
  const auto fmt = g_batched ? layout_of({g, x}) : at::MemoryFormat::Contiguous;
  return fmt == at::MemoryFormat::ChannelsLast ? gw.contiguous(fmt) : gw;
}

at::Tensor channel_sum(const at::Tensor& t) {
  constexpr const char* op = "channel_sum";
  auto [x, batched] = as_batch(op, "input", t);
  check_dtype_supported(op, "input", t);
  return CNNEXT_BACKEND(op, x, channel_sum)(x);
}

}  // namespace

namespace {

// A tensor the dispatcher would hand straight to the CPU kernel: dense and strided, no
// Python subclass, functorch wrapper, functionalization or lazy conjugate / negative bit.
bool plain_cpu(const at::Tensor& t) {
  constexpr c10::DispatchKeySet wrapped = c10::DispatchKeySet(c10::DispatchKey::Python) |
                                          c10::DispatchKeySet(c10::DispatchKey::PythonTLSSnapshot) |
                                          c10::DispatchKeySet(c10::DispatchKey::FuncTorchBatched) |
                                          c10::DispatchKeySet(c10::DispatchKey::FuncTorchGradWrapper) |
                                          c10::DispatchKeySet(c10::DispatchKey::Functionalize) |
                                          c10::DispatchKeySet(c10::DispatchKey::Conjugate) |
                                          c10::DispatchKeySet(c10::DispatchKey::Negative) |
                                          c10::DispatchKeySet(c10::DispatchKey::ZeroTensor);
  return t.defined() && t.device().is_cpu() && t.layout() == at::kStrided && t.dim() == 4 &&
         !t.key_set().has_any(wrapped) && !t._fw_grad(/*level=*/0).defined();
}

}  // namespace

bool conv2d_and_weight_backward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& other,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups, at::Tensor& out, at::Tensor& grad_weight) {
  if (at::GradMode::is_enabled() || !plain_cpu(input) || !plain_cpu(weight) || !plain_cpu(other)) return false;
  // A dispatch mode (TorchDispatchMode, torch.func's layers) includes keys in the thread's
  // dispatch state: it must see the two ops.
  constexpr c10::DispatchKeySet modes = c10::DispatchKeySet(c10::DispatchKey::Python) |
                                       c10::DispatchKeySet(c10::DispatchKey::PythonTLSSnapshot) |
                                       c10::DispatchKeySet(c10::DispatchKey::PreDispatch) |
                                       c10::DispatchKeySet(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) |
                                       c10::DispatchKeySet(c10::DispatchKey::FuncTorchDynamicLayerBackMode) |
                                       c10::DispatchKeySet(c10::DispatchKey::Functionalize);
  if (c10::impl::tls_local_dispatch_key_set().included_.has_any(modes)) return false;
  if (input.scalar_type() != weight.scalar_type() || input.scalar_type() != other.scalar_type()) return false;
  // NCHW results, as the two ops give for NCHW operands.
  if (layout_of({input, weight}) != at::MemoryFormat::Contiguous ||
      layout_of({other, input}) != at::MemoryFormat::Contiguous)
    return false;
  const Conv2dParams p =
      make_params("conv_transpose2d", input.sizes(), weight.sizes(), stride, padding, dilation, groups);
  if (other.sizes() != at::IntArrayRef({p.N, p.O, p.OH, p.OW})) return false;
  // The kernels run below autograd, as the ops' CPU kernels do.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return cpu::conv2d_and_weight_backward(input, weight, other, p, out, grad_weight);
}

// The same checked entry points serve both dispatch keys: they pick the backend
// from the input's device (CNNEXT_BACKEND).
static void impls(torch::Library& m) {
  m.impl("conv2d", &conv2d);
  m.impl("conv2d_input_backward", &conv2d_input_backward);
  m.impl("conv2d_weight_backward", &conv2d_weight_backward);
  m.impl("channel_sum", &channel_sum);
}
CNNEXT_IMPL_CPU_AND_CUDA(impls)

}  // namespace cnnext
