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
#include <torch/library.h>

#include <ATen/ATen.h>

#include "ops/autograd_common.h"
#include "ops/autograd_node.h"
#include "ops/handles.h"
#include "ops/checks.h"
#include "ops/conv2d_common.h"
#include "tensors.h"

namespace cnnext {
namespace {

using IntList = at::IntArrayRef;
using SymList = c10::SymIntArrayRef;
using OptTensor = c10::optional<at::Tensor>;


// The convolution's (stride, padding, dilation, groups), kept for the backward pass.
struct Conf {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups = 1;
  void set(IntList s, IntList p, IntList d, int64_t g) { stride = s.vec(), padding = p.vec(), dilation = d.vec(), groups = g; }
};

at::Tensor input_backward(const at::Tensor& g, const at::Tensor& w, SymList size, const Conf& c) {
  return op::conv2d_input_backward().call(g, w, size, c.stride, c.padding, c.dilation, c.groups);
}
at::Tensor weight_backward(const at::Tensor& g, const at::Tensor& x, SymList size, const Conf& c) {
  return op::conv2d_weight_backward().call(g, x, size, c.stride, c.padding, c.dilation, c.groups);
}
at::Tensor conv(const at::Tensor& x, const at::Tensor& w, const Conf& c) {
  return op::conv2d().call(x, w, c10::nullopt, c.stride, c.padding, c.dilation, c.groups);
}

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }
at::Tensor value(const OptTensor& t) { return given(t) ? *t : at::Tensor(); }

// grad_output in the layout of the forward's output (channels_last or not), as torch
// makes it before its convolution backward: the gradients then take the forward's
// layout, not the incoming gradient's. A copy only where the two layouts differ.
at::Tensor in_forward_layout(const at::Tensor& g, bool channels_last) {
  if (!g.defined() || g.dim() != 4 || (layout_of({g}) == at::MemoryFormat::ChannelsLast) == channels_last)
    return g;
  // clone, not contiguous(): a gradient that is both contiguous and channels_last (one
  // channel, or 1x1 maps) must take the exact strides of the wanted layout.
  return g.clone(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

// The bias's contribution to an output of out's rank: b as (1, C, 1, 1) or (C, 1, 1).
at::Tensor channel_broadcast(const at::Tensor& b, const at::Tensor& out) {
  return b.reshape(out.dim() == 4 ? at::IntArrayRef{1, -1, 1, 1} : at::IntArrayRef{-1, 1, 1}).expand_as(out);
}

// Saved tensors are kept as given: an input carrying a tangent (forward-mode AD) is saved
// with it, so a forward-over-reverse product sees the tangents of what the backward reads.
// Each node saves only what its backward reads, chosen by which inputs require grad.

// --- the Autograd kernels' shape --------------------------------------------------------
//   1. no gradient wanted and no tangent: the op below autograd, no node;
//   2. the op below autograd (it reads values only, so duals go in as they are), then a
//      node (csrc/ops/autograd_node.h) with one edge per tensor argument if a gradient
//      is wanted, then the output's tangent from the ops (so it is differentiable).
#define CNNEXT_BELOW(CALL)                       \
  [&] {                                          \
    at::AutoDispatchBelowADInplaceOrView guard;  \
    return CALL;                                 \
  }()

// --- conv2d ------------------------------------------------------------------------------

// conv2d(input, weight, bias, stride, padding, dilation, groups)
struct Conv2dNode : OpNode {
  Conv2dNode() : OpNode("cnnext_conv2d") {}
  Conf c;
  std::vector<c10::SymInt> input_size, weight_size;
  bool cl = false;
  size_t input = 0, weight = 0;
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list r(3);
    if (!grads[0].defined()) return r;
    const at::Tensor g = in_forward_layout(grads[0], cl);
    if (needs(0)) r[0] = input_backward(g, saved(weight), input_size, c);
    if (needs(1)) r[1] = weight_backward(g, saved(input), weight_size, c);
    if (needs(2)) r[2] = op::channel_sum().call(g);
    return r;
  }
};

// conv2d_input_backward(grad_output, weight, input_size, ...) = A_w^T g and
// conv2d_weight_backward(grad_output, input, weight_size, ...): each bilinear in
// (grad_output, other), the other the weight or the input. Their derivatives:
//   input backward:  d/dg = conv2d(dz, w), d/dw = weight_backward(g, dz)
//   weight backward: d/dg = conv2d(x, dz), d/dx = input_backward(g, dz)
// other_size is the size of the other operand: the weight's or the input's.
enum class ConvGrad { kInput, kWeight };

template <ConvGrad G>
struct Conv2dBackwardNode : OpNode {
  Conv2dBackwardNode()
      : OpNode(G == ConvGrad::kInput ? "cnnext_conv2d_input_backward" : "cnnext_conv2d_weight_backward") {}
  Conf c;
  std::vector<c10::SymInt> other_size;
  size_t grad_output = 0, other = 0;
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list r(2);
    const at::Tensor& dz = grads[0];
    if (!dz.defined()) return r;
    if constexpr (G == ConvGrad::kInput) {
      if (needs(0)) r[0] = conv(dz, saved(other), c);
      if (needs(1)) r[1] = weight_backward(saved(grad_output), dz, other_size, c);
    } else {
      if (needs(0)) r[0] = conv(saved(other), dz, c);
      if (needs(1)) r[1] = input_backward(saved(grad_output), dz, other_size, c);
    }
    return r;
  }
};

// channel_sum(input): the sum over every dim but the channel dim.
struct ChannelSumNode : OpNode {
  ChannelSumNode() : OpNode("cnnext_channel_sum") {}
  std::vector<c10::SymInt> input_size;
  variable_list apply(variable_list&& grads) override {
    variable_list r(1);
    if (!(needs(0) && grads[0].defined())) return r;
    std::vector<c10::SymInt> view = input_size.size() == 4 ? std::vector<c10::SymInt>{1, -1, 1, 1}
                                                           : std::vector<c10::SymInt>{-1, 1, 1};
    r[0] = grads[0].reshape_symint(view).expand_symint(input_size);
    return r;
  }
};

// conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups, dilation)
// = conv2d_input_backward(input, weight, output size) + bias. With output_padding >=
// stride the adjoint conv2d over the output has more rows (columns) than the input:
// grad_input drops them and the weight gradient sees the input padded with zeros.
struct ConvTranspose2dNode : OpNode {
  ConvTranspose2dNode() : OpNode("cnnext_conv_transpose2d") {}
  Conf c;
  std::vector<c10::SymInt> input_hw, weight_size;
  bool cl = false;
  size_t input = 0, weight = 0;
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list r(3);
    if (!grads[0].defined()) return r;
    const at::Tensor g = in_forward_layout(grads[0], cl);
    const bool nx = needs(0), nw = needs(1);
    if (nx || nw) {
      int64_t extra[2];
      for (int d = 0; d < 2; ++d) {
        const c10::SymInt out =
            (g.sym_size(-2 + d) + 2 * c.padding[d] - c.dilation[d] * (weight_size[2 + d] - 1) - 1) / c.stride[d] + 1;
        extra[d] = (out - input_hw[d]).guard_int(__FILE__, __LINE__);
      }
      const bool padded = extra[0] != 0 || extra[1] != 0;
      // Both gradients unfold g alike: in a first-order backward on the CPU one unfolding
      // serves the two GEMMs (the same values as the two ops below).
      const bool shared = nx && nw && !padded &&
                          conv2d_and_weight_backward(g, saved(weight), saved(input), c.stride, c.padding,
                                                     c.dilation, c.groups, r[0], r[1]);
      if (nx && !shared) {
        at::Tensor gx = conv(g, saved(weight), c);
        if (padded) {  // dense, in the layout it had, as torch's (not a strided view)
          // An unbatched (C, H, W) gradient is channels_last when its channels are innermost.
          const bool unbatched = gx.dim() == 3;
          const at::MemoryFormat fmt =
              unbatched ? (gx.size(0) > 1 && gx.stride(0) == 1 ? at::MemoryFormat::ChannelsLast
                                                              : at::MemoryFormat::Contiguous)
                        : layout_of({gx});
          gx = gx.slice_symint(-2, 0, input_hw[0]).slice_symint(-1, 0, input_hw[1]);
          gx = unbatched ? gx.unsqueeze(0).contiguous(fmt).squeeze(0) : gx.contiguous(fmt);
        }
        r[0] = gx;
      }
      if (nw && !shared) {
        at::Tensor x = saved(input);
        if (padded) x = at::constant_pad_nd(x, {0, extra[1], 0, extra[0]}, 0);
        r[1] = weight_backward(x, g, weight_size, c);
      }
    }
    if (needs(2)) r[2] = op::channel_sum().call(g);
    return r;
  }
};

// --- conv_bn_relu2d ------------------------------------------------------------------------

constexpr const char* kNoDoubleBackward =
    "conv_bn_relu2d: double backward (a gradient of a gradient) through training mode is not "
    "supported; use torch.nn.Conv2d + BatchNorm2d + ReLU for higher-order gradients";

// conv_bn_relu2d_train(x, w, b, gamma, beta, eps, stride, padding, dilation, groups, relu)
// -> (out, conv_out, mean, var). conv_out, mean and var are non-differentiable (no
// history): the node's one input is out's gradient.
struct ConvBnReluTrainNode : OpNode {
  ConvBnReluTrainNode() : OpNode("cnnext_conv_bn_relu2d_train") {}
  Conf c;
  std::vector<c10::SymInt> input_size, weight_size;
  double eps = 0;
  bool relu = false;
  size_t input = 0, weight = 0, out = 0, conv_out = 0, mean = 0, var = 0, gamma = 0;
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list r(5);
    bool need[5], any = false;
    for (size_t i = 0; i < 5; ++i) any |= (need[i] = needs(i));
    if (!grads[0].defined() || !any) return r;
    const at::Tensor gam = saved(gamma);
    auto [g_conv, g_gamma, g_beta, g_bias] = op::conv_bn_relu2d_train_backward().call(
        grads[0], relu ? OptTensor(saved(out)) : OptTensor(), saved(conv_out), saved(mean), saved(var),
        gam.defined() ? OptTensor(gam) : OptTensor(), eps, relu);
    if (need[0]) r[0] = input_backward(g_conv, saved(weight), input_size, c);
    if (need[1]) r[1] = weight_backward(g_conv, saved(input), weight_size, c);
    if (need[2]) r[2] = g_bias;
    if (need[3]) r[3] = g_gamma;
    if (need[4]) r[4] = g_beta;
    return r;
  }
};

// The batch-norm + ReLU part of the training backward: its derivative is not
// implemented, so a gradient through it raises.
struct ConvBnReluTrainBackwardNode : OpNode {
  ConvBnReluTrainBackwardNode() : OpNode("cnnext_conv_bn_relu2d_train_backward") {}
  variable_list apply(variable_list&& grads) override { TORCH_CHECK(false, kNoDoubleBackward); }
};

// Inference: w' = w * scale, b' = (b - running_mean) * scale + beta with
// scale = gamma * invstd (see cnnext/_conv_bn_relu.py for the derivatives).
// Edges: input, weight, bias, bn_weight, bn_bias, running_mean, running_var.
struct ConvBnReluEvalNode : OpNode {
  ConvBnReluEvalNode() : OpNode("cnnext_conv_bn_relu2d_eval") {}
  Conf c;
  double eps = 0;
  size_t input = 0, weight = 0, bias = 0, gamma = 0, rmean = 0, rvar = 0, out = 0;
  // Each BN gradient in its own input's dtype (under autocast the BN parameters and
  // running statistics stay float32 while the convolution runs in a half type).
  at::ScalarType beta_dtype = at::kFloat;
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list r(7);
    if (!grads[0].defined()) return r;
    const at::Tensor x = saved(input), w = saved(weight), b = saved(bias), gam = saved(gamma),
                     running_mean = saved(rmean), running_var = saved(rvar), y = saved(out);
    bool need[7];
    for (size_t i = 0; i < 7; ++i) need[i] = needs(i);
    const at::ScalarType dt = w.scalar_type(), sdt = stats_dtype(dt);
    const at::Tensor& grad = grads[0];
    // Zero where out <= 0: a NaN output passes the gradient, as torch's ReLU does.
    const at::Tensor gm = y.defined() ? at::where(y <= 0, at::zeros_like(grad), grad) : grad;
    // The fold, as the op computes it (in the stats dtype).
    const at::Tensor invstd = (running_var.to(sdt) + eps).rsqrt();
    const at::Tensor scale = gam.defined() ? invstd * gam.to(sdt) : invstd;
    if (need[0]) {
      const at::Tensor w_folded = (w.to(sdt) * scale.view({-1, 1, 1, 1})).to(dt);
      r[0] = input_backward(gm, w_folded, x.sym_sizes(), c);
    }
    const bool need_scale = need[1] || need[3] || need[6];
    at::Tensor gw_folded;
    if (need_scale) gw_folded = weight_backward(gm, x, w.sym_sizes(), c).to(sdt);
    const at::Tensor gs = op::channel_sum().call(gm).to(sdt);
    if (need[1]) r[1] = (gw_folded * scale.view({-1, 1, 1, 1})).to(dt);
    if (need[2]) r[2] = (gs * scale).to(b.scalar_type());
    if (need[3] || need[6]) {
      const at::Tensor shift = b.defined() ? b.to(sdt) - running_mean.to(sdt) : -running_mean.to(sdt);
      const at::Tensor g_scale = (gw_folded * w.to(sdt)).sum({1, 2, 3}) + gs * shift;
      if (need[3]) r[3] = (g_scale * invstd).to(gam.scalar_type());
      if (need[6]) {
        const at::Tensor gamma1 = gam.defined() ? gam.to(sdt) : at::ones_like(invstd);
        r[6] = (g_scale * gamma1 * invstd.pow(3) * -0.5).to(running_var.scalar_type());
      }
    }
    if (need[4]) r[4] = gs.to(beta_dtype);
    if (need[5]) r[5] = (-gs * scale).to(running_mean.scalar_type());
    return r;
  }
};

// --- the Autograd kernels -----------------------------------------------------------------

at::Tensor conv2d_ad(const at::Tensor& x, const at::Tensor& w, const OptTensor& b, IntList s, IntList p,
                     IntList d, int64_t g) {
  const bool fw = has_tangent(x, w) || has_tangent_opt(b);
  const bool rg = wants_grad(x, w) || (c10::GradMode::is_enabled() && wants_grad_opt(b));
  if (!fw && !rg) return CNNEXT_BELOW(op::conv2d().call(x, w, b, s, p, d, g));
  at::Tensor out = CNNEXT_BELOW(op::conv2d().call(x, w, b, s, p, d, g));
  if (rg) {
    auto node = make_node<Conv2dNode>(x, w, b);
    node->c.set(s, p, d, g);
    node->input_size = sym_vector(x.sym_sizes());
    node->weight_size = sym_vector(w.sym_sizes());
    node->cl = layout_of({out}) == at::MemoryFormat::ChannelsLast;
    node->input = node->save(w.requires_grad() ? x : at::Tensor());
    node->weight = node->save(x.requires_grad() ? w : at::Tensor());
    out = record(node, out, x, w, value(b));
  }
  if (fw) {  // bilinear in (x, w), plus the bias
    const at::Tensor tx = tangent(x), tw = tangent(w), tb = tangent_opt(b);
    at::Tensor t;
    if (tx.defined()) t = op::conv2d().call(tx, primal(w), c10::nullopt, s, p, d, g);
    if (tw.defined()) t = add_defined(t, op::conv2d().call(primal(x), tw, c10::nullopt, s, p, d, g));
    if (tb.defined()) t = add_defined(t, channel_broadcast(tb, out));
    set_tangent(out, t);
  }
  return out;
}

template <ConvGrad G>
at::Tensor conv2d_backward_ad(const at::Tensor& go, const at::Tensor& other, SymList size, IntList s, IntList p,
                              IntList d, int64_t g) {
  const auto& backward = G == ConvGrad::kInput ? op::conv2d_input_backward() : op::conv2d_weight_backward();
  const bool fw = has_tangent(go, other), rg = wants_grad(go, other);
  at::Tensor out = CNNEXT_BELOW(backward.call(go, other, size, s, p, d, g));
  if (!fw && !rg) return out;
  if (rg) {
    auto node = make_node<Conv2dBackwardNode<G>>(go, other);
    node->c.set(s, p, d, g);
    node->other_size = sym_vector(other.sym_sizes());
    node->grad_output = node->save(other.requires_grad() ? go : at::Tensor());
    node->other = node->save(go.requires_grad() ? other : at::Tensor());
    out = record(node, out, go, other);
  }
  if (fw) {
    at::Tensor t;
    if (has_tangent(go)) t = backward.call(tangent(go), primal(other), size, s, p, d, g);
    if (has_tangent(other)) t = add_defined(t, backward.call(primal(go), tangent(other), size, s, p, d, g));
    set_tangent(out, t);
  }
  return out;
}

at::Tensor channel_sum_ad(const at::Tensor& x) {
  const bool fw = has_tangent(x), rg = wants_grad(x);
  if (!fw && !rg) return CNNEXT_BELOW(op::channel_sum().call(x));
  at::Tensor out = CNNEXT_BELOW(op::channel_sum().call(x));
  if (rg) {
    auto node = make_node<ChannelSumNode>(x);
    node->input_size = sym_vector(x.sym_sizes());
    out = record(node, out, x);
  }
  if (fw) set_tangent(out, op::channel_sum().call(tangent(x)));
  return out;
}

at::Tensor conv_transpose2d_ad(const at::Tensor& x, const at::Tensor& w, const OptTensor& b, IntList s,
                               IntList p, IntList outpad, int64_t g, IntList d) {
  const bool fw = has_tangent(x, w) || has_tangent_opt(b);
  const bool rg = wants_grad(x, w) || (c10::GradMode::is_enabled() && wants_grad_opt(b));
  if (!fw && !rg) return CNNEXT_BELOW(op::conv_transpose2d().call(x, w, b, s, p, outpad, g, d));
  at::Tensor out = CNNEXT_BELOW(op::conv_transpose2d().call(x, w, b, s, p, outpad, g, d));
  if (rg) {
    auto node = make_node<ConvTranspose2dNode>(x, w, b);
    node->c.set(s, p, d, g);
    node->input_hw = {x.sym_size(-2), x.sym_size(-1)};
    node->weight_size = sym_vector(w.sym_sizes());
    node->cl = layout_of({out}) == at::MemoryFormat::ChannelsLast;
    node->input = node->save(w.requires_grad() ? x : at::Tensor());
    node->weight = node->save(x.requires_grad() ? w : at::Tensor());
    out = record(node, out, x, w, value(b));
  }
  if (fw) {  // bilinear in (x, w), plus the bias
    const at::Tensor tx = tangent(x), tw = tangent(w), tb = tangent_opt(b);
    at::Tensor t;
    if (tx.defined()) t = op::conv_transpose2d().call(tx, primal(w), c10::nullopt, s, p, outpad, g, d);
    if (tw.defined()) t = add_defined(t, op::conv_transpose2d().call(primal(x), tw, c10::nullopt, s, p, outpad, g, d));
    if (tb.defined()) t = add_defined(t, channel_broadcast(tb, out));
    set_tangent(out, t);
  }
  return out;
}

// Forward-mode AD of the fused ops: the chain of their parts. With c = conv(x, w) + b,
// m, v its batch mean and (biased) variance per channel, invstd = (v + eps)^-1/2,
// xhat = (c - m) invstd and y = gamma xhat + beta, out = relu(y):
//   dc = conv(dx, w) + conv(x, dw) + db, dm = mean(dc), dv = 2 mean((c - m) dc),
//   dxhat = invstd (dc - dm) - xhat invstd^2 dv / 2,
//   dy = dgamma xhat + gamma dxhat + dbeta, dout = dy where out > 0 (or NaN), else 0.
// Computed with torch's ops in the statistics dtype (float for half types), so it is
// itself differentiable; the batch statistics are the op's own outputs.
at::Tensor conv_tangent(const at::Tensor& x, const at::Tensor& w, const OptTensor& b, const Conf& c) {
  const at::Tensor tx = tangent(x), tw = tangent(w), tb = tangent_opt(b);
  at::Tensor t;
  if (tx.defined()) t = conv(tx, primal(w), c);
  if (tw.defined()) t = add_defined(t, conv(primal(x), tw, c));
  if (tb.defined()) {
    if (!t.defined()) {  // only the bias moves: a tangent of the conv output's shape
      t = at::zeros_like(conv(primal(x), primal(w), c));
    }
    t = t + channel_broadcast(tb, t);
  }
  return t;
}

at::Tensor relu_tangent(const at::Tensor& t, const at::Tensor& out, bool relu) {
  return relu ? at::where(out <= 0, at::zeros_like(t), t) : t;
}

at::Tensor channel_view(const at::Tensor& v, int64_t dim) {
  return dim == 4 ? v.view({1, -1, 1, 1}) : v.view({-1, 1, 1});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu2d_train_ad(
    const at::Tensor& x, const at::Tensor& w, const OptTensor& b, const OptTensor& gamma,
    const OptTensor& beta, double eps, IntList s, IntList p, IntList d, int64_t g, bool relu) {
  const bool fw = has_tangent(x, w) || has_tangent_opt(b) || has_tangent_opt(gamma) || has_tangent_opt(beta);
  const bool rg = wants_grad(x, w) ||
                  (c10::GradMode::is_enabled() && (wants_grad_opt(b) || wants_grad_opt(gamma) || wants_grad_opt(beta)));
  if (!fw && !rg) return CNNEXT_BELOW(op::conv_bn_relu2d_train().call(x, w, b, gamma, beta, eps, s, p, d, g, relu));
  auto [out, conv_out, mean, var] =
      CNNEXT_BELOW(op::conv_bn_relu2d_train().call(x, w, b, gamma, beta, eps, s, p, d, g, relu));
  Conf c;
  c.set(s, p, d, g);
  if (rg) {
    auto node = make_node<ConvBnReluTrainNode>(x, w, b, gamma, beta);
    node->c = c;
    node->input_size = sym_vector(x.sym_sizes());
    node->weight_size = sym_vector(w.sym_sizes());
    node->eps = eps;
    node->relu = relu;
    node->input = node->save(w.requires_grad() ? x : at::Tensor());
    node->weight = node->save(x.requires_grad() ? w : at::Tensor());
    node->conv_out = node->save(conv_out);
    node->mean = node->save(mean);
    node->var = node->save(var);
    node->gamma = node->save(value(gamma));
    out = record(node, out, x, w, value(b), value(gamma), value(beta));
    node->out = node->save(relu ? out : at::Tensor(), /*is_output=*/true);
  }
  if (fw) {
    const at::ScalarType sdt = stats_dtype(out.scalar_type());
    const int64_t nd = out.dim();
    std::vector<int64_t> red{0, 2, 3};
    if (nd == 3) red = {1, 2};
    const at::Tensor invstd = channel_view((var + eps).rsqrt(), nd);
    const at::Tensor centred = conv_out.to(sdt) - channel_view(mean, nd);
    const at::Tensor xhat = centred * invstd;
    at::Tensor ty;
    const at::Tensor tc = conv_tangent(x, w, b, c);
    if (tc.defined()) {
      const at::Tensor tcs = tc.to(sdt);
      const at::Tensor tm = tcs.mean(red, /*keepdim=*/true);
      const at::Tensor tv = 2 * (centred * tcs).mean(red, /*keepdim=*/true);
      at::Tensor txhat = invstd * (tcs - tm) - xhat * invstd * invstd * tv * 0.5;
      ty = given(gamma) ? txhat * channel_view(primal(*gamma).to(sdt), nd) : txhat;
    }
    if (has_tangent_opt(gamma)) ty = add_defined(ty, xhat * channel_view(tangent(*gamma).to(sdt), nd));
    if (has_tangent_opt(beta)) {
      const at::Tensor tb = channel_view(tangent(*beta).to(sdt), nd).expand_as(xhat);
      ty = ty.defined() ? ty + tb : tb.clone();
    }
    set_tangent(out, relu_tangent(ty.to(out.scalar_type()), out, relu).contiguous(layout_of({out})));
  }
  return {out, conv_out, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu2d_train_backward_ad(
    const at::Tensor& go, const OptTensor& out, const at::Tensor& conv_out, const at::Tensor& mean,
    const at::Tensor& var, const OptTensor& gamma, double eps, bool relu) {
  if (has_tangent(go, conv_out, mean, var) || has_tangent_opt(out) || has_tangent_opt(gamma)) no_forward_ad("conv_bn_relu2d_train_backward");
  const bool rg = wants_grad(go, conv_out, mean, var) ||
                  (c10::GradMode::is_enabled() && (wants_grad_opt(out) || wants_grad_opt(gamma)));
  auto r = CNNEXT_BELOW(op::conv_bn_relu2d_train_backward().call(go, out, conv_out, mean, var, gamma, eps, relu));
  if (rg) {
    auto node = make_node<ConvBnReluTrainBackwardNode>(go, out, conv_out, mean, var, gamma);
    std::get<0>(r) = record(node, std::get<0>(r), go, conv_out);
    std::get<1>(r) = record(node, std::get<1>(r), go, conv_out);
    std::get<2>(r) = record(node, std::get<2>(r), go, conv_out);
    std::get<3>(r) = record(node, std::get<3>(r), go, conv_out);
  }
  return r;
}

at::Tensor conv_bn_relu2d_eval_ad(const at::Tensor& x, const at::Tensor& w, const OptTensor& b,
                                  const OptTensor& gamma, const OptTensor& beta, const at::Tensor& rm,
                                  const at::Tensor& rv, double eps, IntList s, IntList p, IntList d, int64_t g,
                                  bool relu) {
  const bool fw = has_tangent(x, w, rm, rv) || has_tangent_opt(b) || has_tangent_opt(gamma) || has_tangent_opt(beta);
  const bool rg = wants_grad(x, w, rm, rv) ||
                  (c10::GradMode::is_enabled() && (wants_grad_opt(b) || wants_grad_opt(gamma) || wants_grad_opt(beta)));
  if (!fw && !rg)
    return CNNEXT_BELOW(op::conv_bn_relu2d_eval().call(x, w, b, gamma, beta, rm, rv, eps, s, p, d, g, relu));
  at::Tensor out = CNNEXT_BELOW(op::conv_bn_relu2d_eval().call(x, w, b, gamma, beta, rm, rv, eps, s, p, d, g, relu));
  Conf c;
  c.set(s, p, d, g);
  if (rg) {
    auto node = make_node<ConvBnReluEvalNode>(x, w, b, gamma, beta, rm, rv);
    node->c = c;
    node->eps = eps;
    node->input = node->save(x);
    node->weight = node->save(w);
    node->bias = node->save(value(b));
    node->gamma = node->save(value(gamma));
    node->rmean = node->save(rm);
    node->rvar = node->save(rv);
    if (given(beta)) node->beta_dtype = beta->scalar_type();
    out = record(node, out, x, w, value(b), value(gamma), value(beta), rm, rv);
    node->out = node->save(relu ? out : at::Tensor(), /*is_output=*/true);
  }
  if (fw) {
    // y = (c - rm) scale + beta, scale = gamma invstd, invstd = (rv + eps)^-1/2:
    // dy = (dc - drm) scale + (c - rm) dscale + dbeta, dscale = dgamma invstd - gamma invstd^3 drv / 2.
    const at::ScalarType sdt = stats_dtype(out.scalar_type());
    const int64_t nd = out.dim();
    const at::Tensor invstd = (primal(rv).to(sdt) + eps).rsqrt();
    const at::Tensor gam = given(gamma) ? primal(*gamma).to(sdt) : at::Tensor();
    const at::Tensor scale = gam.defined() ? invstd * gam : invstd;
    at::Tensor ty;
    const at::Tensor tc = conv_tangent(x, w, b, c);
    if (tc.defined()) ty = tc.to(sdt) * channel_view(scale, nd);
    if (has_tangent(rm)) {
      const at::Tensor t = channel_view(-tangent(rm).to(sdt) * scale, nd);
      ty = ty.defined() ? ty + t : t.expand(out.sizes()).clone();
    }
    at::Tensor tscale;
    if (has_tangent_opt(gamma)) tscale = tangent(*gamma).to(sdt) * invstd;
    if (has_tangent(rv)) {
      const at::Tensor g1 = gam.defined() ? gam : at::ones_like(invstd);
      tscale = add_defined(tscale, tangent(rv).to(sdt) * g1 * invstd.pow(3) * -0.5);
    }
    if (tscale.defined()) {
      at::Tensor cpre = conv(primal(x), primal(w), c).to(sdt);
      if (given(b)) cpre = cpre + channel_view(primal(*b).to(sdt), nd);
      const at::Tensor t = (cpre - channel_view(primal(rm).to(sdt), nd)) * channel_view(tscale, nd);
      ty = ty.defined() ? ty + t : t;
    }
    if (has_tangent_opt(beta)) {
      const at::Tensor t = channel_view(tangent(*beta).to(sdt), nd);
      ty = ty.defined() ? ty + t : t.expand(out.sizes()).clone();
    }
    set_tangent(out, relu_tangent(ty.to(out.scalar_type()), out, relu).contiguous(layout_of({out})));
  }
  return out;
}

#undef CNNEXT_BELOW

}  // namespace

TORCH_LIBRARY_IMPL(cnnext, Autograd, m) {
  m.impl("conv2d", &conv2d_ad);
  m.impl("conv2d_input_backward", &conv2d_backward_ad<ConvGrad::kInput>);
  m.impl("conv2d_weight_backward", &conv2d_backward_ad<ConvGrad::kWeight>);
  m.impl("channel_sum", &channel_sum_ad);
  m.impl("conv_transpose2d", &conv_transpose2d_ad);
  m.impl("conv_bn_relu2d_train", &conv_bn_relu2d_train_ad);
  m.impl("conv_bn_relu2d_train_backward", &conv_bn_relu2d_train_backward_ad);
  m.impl("conv_bn_relu2d_eval", &conv_bn_relu2d_eval_ad);
}

}  // namespace cnnext
