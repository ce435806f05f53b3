// conv_bn_relu2d: conv2d -> batch_norm -> relu as one op. Argument checks and
// device dispatch; the backends (csrc/cpu/conv_bn_relu2d.h, csrc/cpu/conv2d.h) trust
// what is checked here.
//
//   conv_bn_relu2d_train            training mode: batch statistics. Returns (out,
//                                   conv_out, mean, var): conv_out (the pre-BN output) and
//                                   the per-channel batch mean / biased variance are
//                                   what the backward pass needs.
//   conv_bn_relu2d_train_backward   the batch-norm + ReLU part of its backward pass; the
//                                   convolution's part is conv2d_input_backward and
//                                   conv2d_weight_backward (csrc/ops/autograd_conv2d.cpp).
//   batch_norm_update_stats_        running_mean / running_var updated in place with
//                                   momentum and the unbiased variance (split from the
//                                   differentiable op: autograd formulas cannot be
//                                   registered on an op that mutates its inputs).
//   conv_bn_relu2d_eval             inference: batch norm folded into the weight and
//                                   bias, then one conv2d pass with bias and ReLU
//                                   applied as the output is written.
#include <torch/library.h>

#include "ops/checks.h"
#include "ops/dispatch.h"
#include "ops/conv2d_common.h"
#include "tensors.h"

namespace cnnext {
namespace {

const at::Tensor* opt(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

// BatchNorm2d takes only batches (N, C, H, W).
void check_4d(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 4, op, ": expected ", name,
                    " to be 4-D (N, C, H, W) as BatchNorm2d requires (expected 4D input), got ",
                    t.dim(), "-D tensor of shape ", shape_str(t.sizes()));
}

// A per-channel vector: 1-D of size `channels`, on ref's device, of dtype `dtype` (or,
// for the batch-norm parameters and running statistics of float16 / bfloat16 input,
// stats_dtype(dtype) too: float32, as torch's batch_norm takes them, e.g. under autocast).
void check_channel_vector(const char* op, const char* name, const at::Tensor& t,
                          int64_t channels, const at::Tensor& ref, at::ScalarType dtype,
                          bool or_stats_dtype = false) {
  TORCH_CHECK(t.device() == ref.device(), op, ": expected ", name,
              " to be on the same device as input (", ref.device(), "), got ", t.device());
  const bool mixed = or_stats_dtype && stats_dtype(dtype) != dtype;
  TORCH_CHECK(t.scalar_type() == dtype || (mixed && t.scalar_type() == stats_dtype(dtype)),
              op, ": expected ", name, " to have dtype ", dtype,
              mixed ? " or float32" : "", ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, op, ": expected ", name,
              " to be 1-D of size out_channels = ", channels, ", got shape ",
              shape_str(t.sizes()));
}

// The checks both modes share; fills the conv params.
Conv2dParams check_conv(const char* op, const at::Tensor& input, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias,
                        const c10::optional<at::Tensor>& bn_weight,
                        const c10::optional<at::Tensor>& bn_bias, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_4d(op, "input", input);
  // A dtype mismatch first (RuntimeError, as torch), then a dtype without a kernel.
  check_same_dtype_device(op, "input", input, "weight", weight);
  check_dtype_supported(op, "input", input);
  const Conv2dParams p =
      make_params(op, input.sizes(), weight.sizes(), stride, padding, dilation, groups);
  const auto dt = input.scalar_type();
  if (auto b = opt(bias)) check_channel_vector(op, "bias", *b, p.O, input, dt);
  if (auto b = opt(bn_weight)) check_channel_vector(op, "bn_weight", *b, p.O, input, dt, true);
  if (auto b = opt(bn_bias)) check_channel_vector(op, "bn_bias", *b, p.O, input, dt, true);
  return p;
}

// The CUDA kernels read the batch-norm parameters in the input's dtype: float32 ones of
// float16 / bfloat16 input are converted there (the CPU kernels read either).
c10::optional<at::Tensor> for_backend(const c10::optional<at::Tensor>& t, const at::Tensor& input) {
  if (!input.is_cuda() || !opt(t) || t->scalar_type() == input.scalar_type()) return t;
  return t->to(input.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu2d_train(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
    double eps, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, bool relu) {
  constexpr const char* op = "conv_bn_relu2d";
  const Conv2dParams p =
      check_conv(op, input, weight, bias, bn_weight, bn_bias, stride, padding, dilation, groups);
  TORCH_CHECK_VALUE(p.N * p.OH * p.OW != 1, op,
                    ": Expected more than 1 value per channel when training, got input size "
                    "torch.Size(", shape_str({p.N, p.O, p.OH, p.OW}),
                    ") (the convolution's output, which the batch norm normalises)");
  const auto fmt = layout_of({input, weight});
  return CNNEXT_BACKEND(op, input, conv_bn_relu2d_train)(input, weight, bias,
                                                         for_backend(bn_weight, input),
                                                         for_backend(bn_bias, input), eps, p, fmt,
                                                         relu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu2d_train_backward(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& out, const at::Tensor& conv_out,
    const at::Tensor& mean, const at::Tensor& var, const c10::optional<at::Tensor>& bn_weight,
    double eps, bool relu) {
  constexpr const char* op = "conv_bn_relu2d_train_backward";
  check_4d(op, "conv_out", conv_out);
  check_dtype_supported(op, "conv_out", conv_out);
  check_same_dtype_device(op, "conv_out", conv_out, "grad_out", grad_out);
  TORCH_CHECK(grad_out.sizes() == conv_out.sizes(), op, ": expected grad_out of shape ",
              shape_str(conv_out.sizes()), ", got ", shape_str(grad_out.sizes()));
  const at::Tensor* o = opt(out);
  TORCH_CHECK(o != nullptr || !relu, op, ": expected out (the forward output) with relu=True");
  if (o) {
    check_same_dtype_device(op, "conv_out", conv_out, "out", *o);
    TORCH_CHECK(o->sizes() == conv_out.sizes(), op, ": expected out of shape ",
                shape_str(conv_out.sizes()), ", got ", shape_str(o->sizes()));
  }
  const int64_t C = conv_out.size(1);
  const auto sdt = stats_dtype(conv_out.scalar_type());
  check_channel_vector(op, "mean", mean, C, conv_out, sdt);
  check_channel_vector(op, "var", var, C, conv_out, sdt);
  if (auto w = opt(bn_weight))
    check_channel_vector(op, "bn_weight", *w, C, conv_out, conv_out.scalar_type(), true);
  // The kernels read every output-shaped tensor in one dense layout: conv_out's.
  const auto fmt = layout_of({conv_out});
  const at::Tensor y = conv_out.contiguous(fmt);
  const at::Tensor g = grad_out.contiguous(fmt);
  const c10::optional<at::Tensor> od =
      (o && relu) ? c10::optional<at::Tensor>(o->contiguous(fmt)) : c10::nullopt;
  return CNNEXT_BACKEND(op, y, conv_bn_relu2d_train_backward)(g, od, y, mean, var,
                                                              for_backend(bn_weight, y), eps,
                                                              relu);
}

void batch_norm_update_stats_(at::Tensor& running_mean, at::Tensor& running_var,
                              const at::Tensor& mean, const at::Tensor& var, double momentum,
                              int64_t count) {
  constexpr const char* op = "batch_norm_update_stats_";
  TORCH_CHECK(mean.dim() == 1, op, ": expected mean to be 1-D, got shape ", shape_str(mean.sizes()));
  const int64_t C = mean.size(0);
  TORCH_CHECK(var.dim() == 1 && var.size(0) == C, op, ": expected var to be 1-D of size ", C,
              ", got shape ", shape_str(var.sizes()));
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"running_mean", &running_mean},
                                {"running_var", &running_var}}) {
    TORCH_CHECK(t->device() == mean.device(), op, ": expected ", name,
                " to be on the same device as mean (", mean.device(), "), got ", t->device());
    TORCH_CHECK(t->dim() == 1 && t->size(0) == C, op, ": expected ", name,
                " to be 1-D of size out_channels = ", C, ", got shape ", shape_str(t->sizes()));
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), op, ": expected ", name,
                " to be a floating tensor, got ", t->scalar_type());
  }
  TORCH_CHECK(count >= 0 && count != 1, op,
              ": expected count (values per channel) to be 0 or more than 1, got ", count);
  if (count == 0) return;  // an empty batch leaves the running statistics as they are
  // Per-channel: computed in double, then stored in the buffers' dtype.
  if (mean.is_cpu()) {
    TORCH_CHECK(at::isFloatingType(mean.scalar_type()) && at::isFloatingType(var.scalar_type()), op,
                ": expected floating mean and var");
    cpu::batch_norm_update_stats_(running_mean, running_var, mean, var, momentum, count);
    return;
  }
  const double unbias = double(count) / double(count - 1);
  const auto dd = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor m = mean.to(dd), v = var.to(dd) * unbias;
  running_mean.copy_(running_mean.to(dd) * (1.0 - momentum) + m * momentum);
  running_var.copy_(running_var.to(dd) * (1.0 - momentum) + v * momentum);
}

at::Tensor conv_bn_relu2d_eval(const at::Tensor& input, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias,
                               const c10::optional<at::Tensor>& bn_weight,
                               const c10::optional<at::Tensor>& bn_bias,
                               const at::Tensor& running_mean, const at::Tensor& running_var,
                               double eps, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups, bool relu) {
  constexpr const char* op = "conv_bn_relu2d_eval";
  const Conv2dParams p =
      check_conv(op, input, weight, bias, bn_weight, bn_bias, stride, padding, dilation, groups);
  const auto dt = input.scalar_type();
  check_channel_vector(op, "running_mean", running_mean, p.O, input, dt, true);
  check_channel_vector(op, "running_var", running_var, p.O, input, dt, true);
  const auto fmt = layout_of({input, weight});
  // Fold (per output channel, in float for half types): scale = bn_weight / sqrt(var + eps),
  // w' = w * scale, b' = (bias - running_mean) * scale + bn_bias.
  const auto sdt = stats_dtype(dt);
  if (input.is_cpu()) {
    const auto [w, shift] =
        cpu::bn_fold(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, p);
    return cpu::conv2d_forward(input, w, c10::optional<at::Tensor>(shift), p, fmt, relu);
  }
  at::Tensor scale = (running_var.to(sdt) + eps).rsqrt();
  if (auto g = opt(bn_weight)) scale = scale * g->to(sdt);
  const at::Tensor w = (weight.to(sdt) * scale.view({-1, 1, 1, 1})).to(dt).contiguous();
  at::Tensor shift = -running_mean.to(sdt);
  if (auto b = opt(bias)) shift = shift + b->to(sdt);
  shift = shift * scale;
  if (auto b = opt(bn_bias)) shift = shift + b->to(sdt);
  const c10::optional<at::Tensor> b = shift.to(dt).contiguous();
  return CNNEXT_BACKEND(op, input, conv2d_forward)(input, w, b, p, fmt, relu);
}

}  // namespace

// The same checked entry points serve both dispatch keys: they pick the backend
// from the input's device (CNNEXT_BACKEND).
static void impls(torch::Library& m) {
  m.impl("conv_bn_relu2d_train", &conv_bn_relu2d_train);
  m.impl("conv_bn_relu2d_train_backward", &conv_bn_relu2d_train_backward);
  m.impl("batch_norm_update_stats_", &batch_norm_update_stats_);
  m.impl("conv_bn_relu2d_eval", &conv_bn_relu2d_eval);
}
CNNEXT_IMPL_CPU_AND_CUDA(impls)

}  // namespace cnnext
