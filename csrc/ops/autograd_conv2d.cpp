// Autograd of the convolution ops and of the fused conv_bn_relu2d ops, in C++ (the
// Autograd dispatch key).
//
// The formulas are those cnnext/_autograd.py and cnnext/_conv_bn_relu.py describe (see
// there for the algebra): conv2d, conv2d_input_backward, conv2d_weight_backward,
// channel_sum and conv_transpose2d are closed under differentiation; each backward
// calls the ops through the dispatcher, so double backward runs on cnnext kernels and
// torch.compile / opcheck trace real ops. Each formula saves only the tensors its
// backward reads. A call that needs no gradient goes straight to the kernel.
//
// Why C++: the Python autograd.Function that torch.library.register_autograd builds
// cost ~10 us per forward and more per backward (argument flattening, defaults,
// redispatch), more than the kernels of small layers; the fused training op paid
// ~70 us per call on a tiny input.
#include <torch/autograd.h>
#include <torch/library.h>

#include <ATen/ATen.h>

#include "ops/autograd_common.h"
#include "ops/checks.h"
#include "tensors.h"

namespace cnnext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using IntList = at::IntArrayRef;
using SymList = c10::SymIntArrayRef;
using OptTensor = c10::optional<at::Tensor>;

#define CNNEXT_OP(NAME, ...)                                                                    \
  static const auto& NAME##_op() {                                                              \
    static const auto h =                                                                       \
        c10::Dispatcher::singleton().findSchemaOrThrow("cnnext::" #NAME, "").typed<__VA_ARGS__>(); \
    return h;                                                                                   \
  }

CNNEXT_OP(conv2d, at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, IntList, IntList,
                             IntList, int64_t))
CNNEXT_OP(conv2d_input_backward,
          at::Tensor(const at::Tensor&, const at::Tensor&, SymList, IntList, IntList, IntList, int64_t))
CNNEXT_OP(conv2d_weight_backward,
          at::Tensor(const at::Tensor&, const at::Tensor&, SymList, IntList, IntList, IntList, int64_t))
CNNEXT_OP(channel_sum, at::Tensor(const at::Tensor&))
CNNEXT_OP(conv_transpose2d, at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, IntList,
                                       IntList, IntList, int64_t, IntList))
CNNEXT_OP(conv_bn_relu2d_train,
          std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
              double, IntList, IntList, IntList, int64_t, bool))
CNNEXT_OP(conv_bn_relu2d_train_backward,
          std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const OptTensor&, double, bool))
CNNEXT_OP(conv_bn_relu2d_eval,
          at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                     const at::Tensor&, const at::Tensor&, double, IntList, IntList, IntList, int64_t, bool))
#undef CNNEXT_OP

// The convolution's (stride, padding, dilation, groups), kept for the backward pass.
struct Conf {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;
};
void save_conf(AutogradContext* ctx, IntList stride, IntList padding, IntList dilation, int64_t groups) {
  ctx->saved_data["stride"] = stride.vec();
  ctx->saved_data["padding"] = padding.vec();
  ctx->saved_data["dilation"] = dilation.vec();
  ctx->saved_data["groups"] = groups;
}
Conf load_conf(AutogradContext* ctx) {
  return {ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
          ctx->saved_data["dilation"].toIntVector(), ctx->saved_data["groups"].toInt()};
}

at::Tensor input_backward(const at::Tensor& g, const at::Tensor& w, SymList size, const Conf& c) {
  return conv2d_input_backward_op().call(g, w, size, c.stride, c.padding, c.dilation, c.groups);
}
at::Tensor weight_backward(const at::Tensor& g, const at::Tensor& x, SymList size, const Conf& c) {
  return conv2d_weight_backward_op().call(g, x, size, c.stride, c.padding, c.dilation, c.groups);
}
at::Tensor conv(const at::Tensor& x, const at::Tensor& w, const Conf& c) {
  return conv2d_op().call(x, w, c10::nullopt, c.stride, c.padding, c.dilation, c.groups);
}

// Whether forward argument `pos` (counting tensor arguments only, optional ones
// included) needs a gradient. An autograd node has edges only for the tensors that
// were given, so absent optional tensors shift the edge index; `present` says which
// of the tensor arguments were given.
bool needs(AutogradContext* ctx, const std::vector<int64_t>& present, size_t pos) {
  if (!present[pos]) return false;
  size_t edge = 0;
  for (size_t i = 0; i < pos; ++i) edge += present[i] ? 1 : 0;
  return ctx->needs_input_grad(edge);
}

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// Forward-mode AD through a recorded node: the node is given the primals (the C++
// Function API raises on inputs carrying tangents), so its backward would read its saved
// tensors without their tangents, and a forward-over-reverse product would miss the terms
// of their tangents. The node keeps the two tensor inputs as given, with their tangents,
// and its backward reads those instead (dual(): the saved tensor i or its dual).
template <class F>
void keep_duals(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (auto* node = dynamic_cast<torch::autograd::CppNode<F>*>(out.grad_fn().get())) {
    node->ctx_.saved_data["dual0"] = a;
    node->ctx_.saved_data["dual1"] = b;
  }
}

at::Tensor dual(AutogradContext* ctx, const variable_list& saved, size_t i) {
  if (!saved[i].defined()) return saved[i];
  const auto it = ctx->saved_data.find(i == 0 ? "dual0" : "dual1");
  return it == ctx->saved_data.end() ? saved[i] : it->second.toTensor();
}

// grad_output in the layout of the forward's output (channels_last or not), as torch
// makes it before its convolution backward: the gradients then take the forward's
// layout, not the incoming gradient's. A copy only where the two layouts differ.
at::Tensor in_forward_layout(const at::Tensor& g, bool channels_last) {
  if (!g.defined() || g.dim() != 4 || (layout_of({g}) == at::MemoryFormat::ChannelsLast) == channels_last)
    return g;
  return g.contiguous(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

// --- conv2d ------------------------------------------------------------------------------

// conv2d(input, weight, bias, stride, padding, dilation, groups)
struct cnnext_conv2d : torch::autograd::Function<cnnext_conv2d> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const OptTensor& bias, IntList stride, IntList padding, IntList dilation,
                            int64_t groups) {
    ctx->save_for_backward({weight.requires_grad() ? input : at::Tensor(),
                            input.requires_grad() ? weight : at::Tensor()});
    ctx->saved_data["input_size"] = sym_vector(input.sym_sizes());
    ctx->saved_data["weight_size"] = sym_vector(weight.sym_sizes());
    ctx->saved_data["present"] = std::vector<int64_t>{1, 1, given(bias)};
    save_conf(ctx, stride, padding, dilation, groups);
    at::Tensor out = conv2d_op().call(input, weight, bias, stride, padding, dilation, groups);
    ctx->saved_data["cl"] = layout_of({out}) == at::MemoryFormat::ChannelsLast;
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto present = ctx->saved_data["present"].toIntVector();
    const Conf c = load_conf(ctx);
    const at::Tensor g = in_forward_layout(grads[0], ctx->saved_data["cl"].toBool());
    at::Tensor gx, gw, gb;
    if (needs(ctx, present, 0)) gx = input_backward(g, dual(ctx, saved, 1), ctx->saved_data["input_size"].toSymIntVector(), c);
    if (needs(ctx, present, 1)) gw = weight_backward(g, dual(ctx, saved, 0), ctx->saved_data["weight_size"].toSymIntVector(), c);
    if (needs(ctx, present, 2)) gb = channel_sum_op().call(g);
    return {gx, gw, gb, {}, {}, {}, {}};
  }
};

// conv2d_input_backward(grad_output, weight, input_size, ...) = A_w^T g:
// d/dg = conv2d(dz, w), d/dw = weight_backward(g, dz).
struct cnnext_conv2d_input_backward : torch::autograd::Function<cnnext_conv2d_input_backward> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& g, const at::Tensor& weight,
                            SymList input_size, IntList stride, IntList padding, IntList dilation,
                            int64_t groups) {
    ctx->save_for_backward({weight.requires_grad() ? g : at::Tensor(), g.requires_grad() ? weight : at::Tensor()});
    ctx->saved_data["weight_size"] = sym_vector(weight.sym_sizes());
    save_conf(ctx, stride, padding, dilation, groups);
    return conv2d_input_backward_op().call(g, weight, input_size, stride, padding, dilation, groups);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Conf c = load_conf(ctx);
    at::Tensor dg, dw;
    if (ctx->needs_input_grad(0)) dg = conv(grads[0], dual(ctx, saved, 1), c);
    if (ctx->needs_input_grad(1))
      dw = weight_backward(dual(ctx, saved, 0), grads[0], ctx->saved_data["weight_size"].toSymIntVector(), c);
    return {dg, dw, {}, {}, {}, {}, {}};
  }
};

// conv2d_weight_backward(grad_output, input, weight_size, ...):
// d/dg = conv2d(x, dW), d/dx = input_backward(g, dW).
struct cnnext_conv2d_weight_backward : torch::autograd::Function<cnnext_conv2d_weight_backward> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& g, const at::Tensor& input,
                            SymList weight_size, IntList stride, IntList padding, IntList dilation,
                            int64_t groups) {
    ctx->save_for_backward({input.requires_grad() ? g : at::Tensor(), g.requires_grad() ? input : at::Tensor()});
    ctx->saved_data["input_size"] = sym_vector(input.sym_sizes());
    save_conf(ctx, stride, padding, dilation, groups);
    return conv2d_weight_backward_op().call(g, input, weight_size, stride, padding, dilation, groups);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Conf c = load_conf(ctx);
    at::Tensor dg, dx;
    if (ctx->needs_input_grad(0)) dg = conv(dual(ctx, saved, 1), grads[0], c);
    if (ctx->needs_input_grad(1))
      dx = input_backward(dual(ctx, saved, 0), grads[0], ctx->saved_data["input_size"].toSymIntVector(), c);
    return {dg, dx, {}, {}, {}, {}, {}};
  }
};

// channel_sum(input): the sum over every dim but the channel dim.
struct cnnext_channel_sum : torch::autograd::Function<cnnext_channel_sum> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input) {
    ctx->saved_data["input_size"] = sym_vector(input.sym_sizes());
    return channel_sum_op().call(input);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto shape = ctx->saved_data["input_size"].toSymIntVector();
    std::vector<c10::SymInt> view = shape.size() == 4 ? std::vector<c10::SymInt>{1, -1, 1, 1}
                                                      : std::vector<c10::SymInt>{-1, 1, 1};
    return {grads[0].reshape_symint(view).expand_symint(shape)};
  }
};

// conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups, dilation)
// = conv2d_input_backward(input, weight, output size) + bias. With output_padding >=
// stride the adjoint conv2d over the output has more rows (columns) than the input:
// grad_input drops them and the weight gradient sees the input padded with zeros.
struct cnnext_conv_transpose2d : torch::autograd::Function<cnnext_conv_transpose2d> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const OptTensor& bias, IntList stride, IntList padding, IntList output_padding,
                            int64_t groups, IntList dilation) {
    ctx->save_for_backward({weight.requires_grad() ? input : at::Tensor(),
                            input.requires_grad() ? weight : at::Tensor()});
    ctx->saved_data["input_hw"] = std::vector<c10::SymInt>{input.sym_size(-2), input.sym_size(-1)};
    ctx->saved_data["weight_size"] = sym_vector(weight.sym_sizes());
    ctx->saved_data["present"] = std::vector<int64_t>{1, 1, given(bias)};
    save_conf(ctx, stride, padding, dilation, groups);
    at::Tensor out = conv_transpose2d_op().call(input, weight, bias, stride, padding, output_padding, groups, dilation);
    ctx->saved_data["cl"] = layout_of({out}) == at::MemoryFormat::ChannelsLast;
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto present = ctx->saved_data["present"].toIntVector();
    const Conf c = load_conf(ctx);
    const at::Tensor g = in_forward_layout(grads[0], ctx->saved_data["cl"].toBool());
    const bool nx = needs(ctx, present, 0), nw = needs(ctx, present, 1);
    at::Tensor gx, gw, gb;
    if (nx || nw) {
      const auto hw = ctx->saved_data["input_hw"].toSymIntVector();
      const auto wsize = ctx->saved_data["weight_size"].toSymIntVector();
      int64_t extra[2];
      for (int d = 0; d < 2; ++d) {
        const c10::SymInt out = (g.sym_size(-2 + d) + 2 * c.padding[d] - c.dilation[d] * (wsize[2 + d] - 1) - 1) /
                                    c.stride[d] + 1;
        extra[d] = (out - hw[d]).guard_int(__FILE__, __LINE__);
      }
      const bool padded = extra[0] != 0 || extra[1] != 0;
      if (nx) {
        gx = conv(g, dual(ctx, saved, 1), c);
        if (padded)  // dense, in the layout it had, as torch's (not a strided view)
          gx = gx.slice_symint(-2, 0, hw[0]).slice_symint(-1, 0, hw[1]).contiguous(layout_of({gx}));
      }
      if (nw) {
        at::Tensor x = dual(ctx, saved, 0);
        if (padded) x = at::constant_pad_nd(x, {0, extra[1], 0, extra[0]}, 0);
        gw = weight_backward(x, g, wsize, c);
      }
    }
    if (needs(ctx, present, 2)) gb = channel_sum_op().call(g);
    return {gx, gw, gb, {}, {}, {}, {}, {}};
  }
};

// --- conv_bn_relu2d ------------------------------------------------------------------------

constexpr const char* kNoDoubleBackward =
    "conv_bn_relu2d: double backward (a gradient of a gradient) through training mode is not "
    "supported; use torch.nn.Conv2d + BatchNorm2d + ReLU for higher-order gradients";

// conv_bn_relu2d_train(x, w, b, gamma, beta, eps, stride, padding, dilation, groups, relu)
// -> (out, conv_out, mean, var). conv_out, mean and var are non-differentiable and their
// gradients are not materialised.
struct cnnext_conv_bn_relu2d_train : torch::autograd::Function<cnnext_conv_bn_relu2d_train> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                               const OptTensor& bias, const OptTensor& bn_weight, const OptTensor& bn_bias,
                               double eps, IntList stride, IntList padding, IntList dilation, int64_t groups,
                               bool relu) {
    auto [out, conv_out, mean, var] = conv_bn_relu2d_train_op().call(
        input, weight, bias, bn_weight, bn_bias, eps, stride, padding, dilation, groups, relu);
    ctx->mark_non_differentiable({conv_out, mean, var});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({weight.requires_grad() ? input : at::Tensor(),
                            input.requires_grad() ? weight : at::Tensor(), relu ? out : at::Tensor(), conv_out,
                            mean, var, given(bn_weight) ? *bn_weight : at::Tensor()});
    ctx->saved_data["input_size"] = sym_vector(input.sym_sizes());
    ctx->saved_data["weight_size"] = sym_vector(weight.sym_sizes());
    ctx->saved_data["present"] = std::vector<int64_t>{1, 1, given(bias), given(bn_weight), given(bn_bias)};
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["relu"] = relu;
    save_conf(ctx, stride, padding, dilation, groups);
    return {out, conv_out, mean, var};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(11);
    const at::Tensor& grad_out = grads[0];
    const auto present = ctx->saved_data["present"].toIntVector();
    bool need[5];
    bool any = false;
    for (size_t i = 0; i < 5; ++i) any |= (need[i] = needs(ctx, present, i));
    if (!grad_out.defined() || !any) return result;
    const auto s = ctx->get_saved_variables();
    const bool relu = ctx->saved_data["relu"].toBool();
    auto [g_conv, g_gamma, g_beta, g_bias] = conv_bn_relu2d_train_backward_op().call(
        grad_out, relu ? OptTensor(s[2]) : OptTensor(), s[3], s[4], s[5],
        s[6].defined() ? OptTensor(s[6]) : OptTensor(), ctx->saved_data["eps"].toDouble(), relu);
    const Conf c = load_conf(ctx);
    if (need[0]) result[0] = input_backward(g_conv, s[1], ctx->saved_data["input_size"].toSymIntVector(), c);
    if (need[1]) result[1] = weight_backward(g_conv, s[0], ctx->saved_data["weight_size"].toSymIntVector(), c);
    if (need[2]) result[2] = g_bias;
    if (need[3]) result[3] = g_gamma;
    if (need[4]) result[4] = g_beta;
    return result;
  }
};

// The batch-norm + ReLU part of the training backward: its derivative is not
// implemented, so a gradient through it raises.
struct cnnext_conv_bn_relu2d_train_backward
    : torch::autograd::Function<cnnext_conv_bn_relu2d_train_backward> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_out, const OptTensor& out,
                               const at::Tensor& conv_out, const at::Tensor& mean, const at::Tensor& var,
                               const OptTensor& bn_weight, double eps, bool relu) {
    auto [a, b, c, d] =
        conv_bn_relu2d_train_backward_op().call(grad_out, out, conv_out, mean, var, bn_weight, eps, relu);
    return {a, b, c, d};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(false, kNoDoubleBackward);
    return {};
  }
};

// Inference: w' = w * scale, b' = (b - running_mean) * scale + beta with
// scale = gamma * invstd (see cnnext/_conv_bn_relu.py for the derivatives).
struct cnnext_conv_bn_relu2d_eval : torch::autograd::Function<cnnext_conv_bn_relu2d_eval> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const OptTensor& bias, const OptTensor& bn_weight, const OptTensor& bn_bias,
                            const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
                            IntList stride, IntList padding, IntList dilation, int64_t groups, bool relu) {
    at::Tensor out = conv_bn_relu2d_eval_op().call(input, weight, bias, bn_weight, bn_bias, running_mean,
                                                   running_var, eps, stride, padding, dilation, groups, relu);
    ctx->save_for_backward({input, weight, given(bias) ? *bias : at::Tensor(),
                            given(bn_weight) ? *bn_weight : at::Tensor(), running_mean, running_var,
                            relu ? out : at::Tensor()});
    ctx->saved_data["present"] =
        std::vector<int64_t>{1, 1, given(bias), given(bn_weight), given(bn_bias), 1, 1};
    ctx->saved_data["eps"] = eps;
    save_conf(ctx, stride, padding, dilation, groups);
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const at::Tensor &input = s[0], &weight = s[1], &bias = s[2], &bn_weight = s[3], &running_mean = s[4],
                     &running_var = s[5], &out = s[6];
    const auto present = ctx->saved_data["present"].toIntVector();
    bool need[7];
    for (size_t i = 0; i < 7; ++i) need[i] = needs(ctx, present, i);
    const Conf c = load_conf(ctx);
    const double eps = ctx->saved_data["eps"].toDouble();
    const at::ScalarType dt = weight.scalar_type(), sdt = stats_dtype(dt);
    const at::Tensor& grad = grads[0];
    // Zero where out <= 0: a NaN output passes the gradient, as torch's ReLU does.
    const at::Tensor gm = out.defined() ? at::where(out <= 0, at::zeros_like(grad), grad) : grad;
    // The fold, as the op computes it (in the stats dtype).
    const at::Tensor invstd = (running_var.to(sdt) + eps).rsqrt();
    const at::Tensor scale = bn_weight.defined() ? invstd * bn_weight.to(sdt) : invstd;
    variable_list r(13);
    if (need[0]) {
      const at::Tensor w_folded = (weight.to(sdt) * scale.view({-1, 1, 1, 1})).to(dt);
      r[0] = input_backward(gm, w_folded, input.sym_sizes(), c);
    }
    const bool need_scale = need[1] || need[3] || need[6];
    at::Tensor gw_folded;
    if (need_scale) gw_folded = weight_backward(gm, input, weight.sym_sizes(), c).to(sdt);
    const at::Tensor gs = channel_sum_op().call(gm).to(sdt);
    if (need[1]) r[1] = (gw_folded * scale.view({-1, 1, 1, 1})).to(dt);
    if (need[2]) r[2] = (gs * scale).to(dt);
    if (need[3] || need[6]) {
      const at::Tensor shift = bias.defined() ? bias.to(sdt) - running_mean.to(sdt) : -running_mean.to(sdt);
      const at::Tensor g_scale = (gw_folded * weight.to(sdt)).sum({1, 2, 3}) + gs * shift;
      if (need[3]) r[3] = (g_scale * invstd).to(dt);
      if (need[6]) {
        const at::Tensor gamma = bn_weight.defined() ? bn_weight.to(sdt) : at::ones_like(invstd);
        r[6] = (g_scale * gamma * invstd.pow(3) * -0.5).to(dt);
      }
    }
    if (need[4]) r[4] = gs.to(dt);
    if (need[5]) r[5] = (-gs * scale).to(dt);
    return r;
  }
};

// --- the Autograd kernels -----------------------------------------------------------------

#define CNNEXT_BELOW_AUTOGRAD(CALL)              \
  {                                              \
    at::AutoDispatchBelowADInplaceOrView guard;  \
    return CALL;                                 \
  }

at::Tensor conv2d_ad(const at::Tensor& x, const at::Tensor& w, const OptTensor& b, IntList s, IntList p,
                     IntList d, int64_t g) {
  if (has_tangent(x, w) || has_tangent_opt(b)) {  // bilinear in (x, w), plus the bias
    const at::Tensor xp = primal(x), wp = primal(w);
    at::Tensor out = conv2d_ad(xp, wp, primal_opt(b), s, p, d, g);
    keep_duals<cnnext_conv2d>(out, x, w);
    const at::Tensor tx = tangent(x), tw = tangent(w), tb = tangent_opt(b);
    at::Tensor t;
    if (tx.defined()) t = conv2d_op().call(tx, wp, c10::nullopt, s, p, d, g);
    if (tw.defined()) t = add_defined(t, conv2d_op().call(xp, tw, c10::nullopt, s, p, d, g));
    if (tb.defined()) t = add_defined(t, tb.reshape(out.dim() == 4 ? at::IntArrayRef{1, -1, 1, 1} : at::IntArrayRef{-1, 1, 1}).expand_as(out));
    set_tangent(out, t);
    return out;
  }
  if (!(wants_grad(x, w) || (c10::GradMode::is_enabled() && wants_grad_opt(b))))
    CNNEXT_BELOW_AUTOGRAD(conv2d_op().call(x, w, b, s, p, d, g))
  return cnnext_conv2d::apply(x, w, b, s, p, d, g);
}

at::Tensor conv2d_input_backward_ad(const at::Tensor& go, const at::Tensor& w, SymList size, IntList s,
                                    IntList p, IntList d, int64_t g) {
  if (has_tangent(go, w)) {
    const at::Tensor gp = primal(go), wp = primal(w);
    at::Tensor out = conv2d_input_backward_ad(gp, wp, size, s, p, d, g);
    keep_duals<cnnext_conv2d_input_backward>(out, go, w);
    at::Tensor t;
    if (has_tangent(go)) t = conv2d_input_backward_op().call(tangent(go), wp, size, s, p, d, g);
    if (has_tangent(w)) t = add_defined(t, conv2d_input_backward_op().call(gp, tangent(w), size, s, p, d, g));
    set_tangent(out, t);
    return out;
  }
  if (!wants_grad(go, w)) CNNEXT_BELOW_AUTOGRAD(conv2d_input_backward_op().call(go, w, size, s, p, d, g))
  return cnnext_conv2d_input_backward::apply(go, w, size, s, p, d, g);
}

at::Tensor conv2d_weight_backward_ad(const at::Tensor& go, const at::Tensor& x, SymList size, IntList s,
                                     IntList p, IntList d, int64_t g) {
  if (has_tangent(go, x)) {
    const at::Tensor gp = primal(go), xp = primal(x);
    at::Tensor out = conv2d_weight_backward_ad(gp, xp, size, s, p, d, g);
    keep_duals<cnnext_conv2d_weight_backward>(out, go, x);
    at::Tensor t;
    if (has_tangent(go)) t = conv2d_weight_backward_op().call(tangent(go), xp, size, s, p, d, g);
    if (has_tangent(x)) t = add_defined(t, conv2d_weight_backward_op().call(gp, tangent(x), size, s, p, d, g));
    set_tangent(out, t);
    return out;
  }
  if (!wants_grad(go, x)) CNNEXT_BELOW_AUTOGRAD(conv2d_weight_backward_op().call(go, x, size, s, p, d, g))
  return cnnext_conv2d_weight_backward::apply(go, x, size, s, p, d, g);
}

at::Tensor channel_sum_ad(const at::Tensor& x) {
  if (has_tangent(x)) {
    at::Tensor out = channel_sum_ad(primal(x));
    set_tangent(out, channel_sum_op().call(tangent(x)));
    return out;
  }
  if (!wants_grad(x)) CNNEXT_BELOW_AUTOGRAD(channel_sum_op().call(x))
  return cnnext_channel_sum::apply(x);
}

at::Tensor conv_transpose2d_ad(const at::Tensor& x, const at::Tensor& w, const OptTensor& b, IntList s,
                               IntList p, IntList op, int64_t g, IntList d) {
  if (has_tangent(x, w) || has_tangent_opt(b)) {  // bilinear in (x, w), plus the bias
    const at::Tensor xp = primal(x), wp = primal(w);
    at::Tensor out = conv_transpose2d_ad(xp, wp, primal_opt(b), s, p, op, g, d);
    keep_duals<cnnext_conv_transpose2d>(out, x, w);
    const at::Tensor tx = tangent(x), tw = tangent(w), tb = tangent_opt(b);
    at::Tensor t;
    if (tx.defined()) t = conv_transpose2d_op().call(tx, wp, c10::nullopt, s, p, op, g, d);
    if (tw.defined()) t = add_defined(t, conv_transpose2d_op().call(xp, tw, c10::nullopt, s, p, op, g, d));
    if (tb.defined()) t = add_defined(t, tb.reshape(out.dim() == 4 ? at::IntArrayRef{1, -1, 1, 1} : at::IntArrayRef{-1, 1, 1}).expand_as(out));
    set_tangent(out, t);
    return out;
  }
  if (!(wants_grad(x, w) || (c10::GradMode::is_enabled() && wants_grad_opt(b))))
    CNNEXT_BELOW_AUTOGRAD(conv_transpose2d_op().call(x, w, b, s, p, op, g, d))
  return cnnext_conv_transpose2d::apply(x, w, b, s, p, op, g, d);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu2d_train_ad(
    const at::Tensor& x, const at::Tensor& w, const OptTensor& b, const OptTensor& gamma,
    const OptTensor& beta, double eps, IntList s, IntList p, IntList d, int64_t g, bool relu) {
  if (has_tangent(x, w) || has_tangent_opt(b) || has_tangent_opt(gamma) || has_tangent_opt(beta)) no_forward_ad("conv_bn_relu2d_train");
  const bool grad = wants_grad(x, w) ||
                    (c10::GradMode::is_enabled() && (wants_grad_opt(b) || wants_grad_opt(gamma) || wants_grad_opt(beta)));
  if (!grad) CNNEXT_BELOW_AUTOGRAD(conv_bn_relu2d_train_op().call(x, w, b, gamma, beta, eps, s, p, d, g, relu))
  auto r = cnnext_conv_bn_relu2d_train::apply(x, w, b, gamma, beta, eps, s, p, d, g, relu);
  return {r[0], r[1], r[2], r[3]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu2d_train_backward_ad(
    const at::Tensor& go, const OptTensor& out, const at::Tensor& conv_out, const at::Tensor& mean,
    const at::Tensor& var, const OptTensor& gamma, double eps, bool relu) {
  if (has_tangent(go, conv_out, mean, var) || has_tangent_opt(out) || has_tangent_opt(gamma)) no_forward_ad("conv_bn_relu2d_train_backward");
  const bool grad = wants_grad(go, conv_out, mean, var) ||
                    (c10::GradMode::is_enabled() && (wants_grad_opt(out) || wants_grad_opt(gamma)));
  if (!grad) CNNEXT_BELOW_AUTOGRAD(conv_bn_relu2d_train_backward_op().call(go, out, conv_out, mean, var, gamma, eps, relu))
  auto r = cnnext_conv_bn_relu2d_train_backward::apply(go, out, conv_out, mean, var, gamma, eps, relu);
  return {r[0], r[1], r[2], r[3]};
}

at::Tensor conv_bn_relu2d_eval_ad(const at::Tensor& x, const at::Tensor& w, const OptTensor& b,
                                  const OptTensor& gamma, const OptTensor& beta, const at::Tensor& rm,
                                  const at::Tensor& rv, double eps, IntList s, IntList p, IntList d, int64_t g,
                                  bool relu) {
  if (has_tangent(x, w, rm, rv) || has_tangent_opt(b) || has_tangent_opt(gamma) || has_tangent_opt(beta)) no_forward_ad("conv_bn_relu2d_eval");
  const bool grad = wants_grad(x, w, rm, rv) ||
                    (c10::GradMode::is_enabled() && (wants_grad_opt(b) || wants_grad_opt(gamma) || wants_grad_opt(beta)));
  if (!grad) CNNEXT_BELOW_AUTOGRAD(conv_bn_relu2d_eval_op().call(x, w, b, gamma, beta, rm, rv, eps, s, p, d, g, relu))
  return cnnext_conv_bn_relu2d_eval::apply(x, w, b, gamma, beta, rm, rv, eps, s, p, d, g, relu);
}

#undef CNNEXT_BELOW_AUTOGRAD

}  // namespace

TORCH_LIBRARY_IMPL(cnnext, Autograd, m) {
  m.impl("conv2d", &conv2d_ad);
  m.impl("conv2d_input_backward", &conv2d_input_backward_ad);
  m.impl("conv2d_weight_backward", &conv2d_weight_backward_ad);
  m.impl("channel_sum", &channel_sum_ad);
  m.impl("conv_transpose2d", &conv_transpose2d_ad);
  m.impl("conv_bn_relu2d_train", &conv_bn_relu2d_train_ad);
  m.impl("conv_bn_relu2d_train_backward", &conv_bn_relu2d_train_backward_ad);
  m.impl("conv_bn_relu2d_eval", &conv_bn_relu2d_eval_ad);
}

}  // namespace cnnext
