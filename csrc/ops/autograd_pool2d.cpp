// Autograd of the pooling ops, in C++ (the Autograd dispatch key).
//
// The formulas are those cnnext/_avg_pool.py and cnnext/_max_pool.py describe: the nine
// ops are closed under differentiation, each backward calls the others through the
// dispatcher, so gradients of any order run on cnnext kernels and torch.compile /
// opcheck trace real ops (with the fake kernels registered in Python).
//
// Why C++: torch.library.register_autograd builds a Python autograd.Function around the
// op; on a small tensor (NiN's (32, 10, 5, 5) global pooling) its ~8 us per forward
// and ~15 us per backward were more than the kernel. A torch::autograd::Function costs
// about what torch's own generated autograd nodes cost, and a call that needs no
// gradient (grad mode off, or no input requiring grad) goes straight to the kernel.
#include <torch/library.h>

#include "ops/autograd_common.h"
#include "ops/autograd_node.h"
#include "ops/handles.h"

namespace cnnext {
namespace {

using IntList = at::IntArrayRef;
using SymList = c10::SymIntArrayRef;
using OptInt = c10::optional<int64_t>;

// Each node is named after its op: grad_fn.name() is e.g. "cnnext_avg_pool2d_backward".

// The ops are called through their handles (csrc/ops/handles.h: op::<name>()), below
// autograd or, from a backward, with it.

// Pooling arguments kept for the backward pass: (kernel_size, stride, padding, dilation).
struct PoolConf {
  std::vector<int64_t> k, s, p, d;
  bool ceil = false;
  void set(IntList k_, IntList s_, IntList p_, IntList d_, bool ceil_) {
    k = k_.vec(), s = s_.vec(), p = p_.vec(), d = d_.vec(), ceil = ceil_;
  }
};

// The Autograd kernels below share one shape:
//   1. an input carrying a tangent (forward-mode AD): the output's tangent is the op's
//      linear map applied to the tangent, computed with the ops (so it is differentiable);
//   2. no gradient wanted: the op below autograd, no node;
//   3. else a node (csrc/ops/autograd_node.h) with one edge per tensor argument.
// The op below autograd reads its inputs' values only, so duals go in as they are.
#define CNNEXT_BELOW(CALL)                       \
  [&] {                                          \
    at::AutoDispatchBelowADInplaceOrView guard;  \
    return CALL;                                 \
  }()

// --- average pooling ---------------------------------------------------------------------

struct AvgPoolConf {
  PoolConf c;
  bool cip = true;
  OptInt div;
};

struct AvgPool2dNode : OpNode {  // avg_pool2d(input, ...)
  AvgPool2dNode() : OpNode("cnnext_avg_pool2d") {}
  AvgPoolConf a;
  size_t input;
  variable_list apply(variable_list&& grads) override {
    return first_input_only(grads, 1, [&](const at::Tensor& dz) {
      return op::avg_pool2d_backward().call(dz, saved(input), a.c.k, a.c.s, a.c.p, a.c.ceil, a.cip, a.div);
    });
  }
};

// Linear in grad_output: its derivative is avg_pool2d of the incoming gradient; the
// input is read for its shape and layout only and gets no gradient.
struct AvgPool2dBackwardNode : OpNode {  // avg_pool2d_backward(grad_output, input, ...)
  AvgPool2dBackwardNode() : OpNode("cnnext_avg_pool2d_backward") {}
  AvgPoolConf a;
  variable_list apply(variable_list&& grads) override {
    return first_input_only(grads, 2, [&](const at::Tensor& dz) {
      return op::avg_pool2d().call(dz, a.c.k, a.c.s, a.c.p, a.c.ceil, a.cip, a.div);
    });
  }
};

struct AdaptiveAvgPool2dNode : OpNode {
  AdaptiveAvgPool2dNode() : OpNode("cnnext_adaptive_avg_pool2d") {}
  size_t input;
  variable_list apply(variable_list&& grads) override {
    return first_input_only(
        grads, 1, [&](const at::Tensor& dz) { return op::adaptive_avg_pool2d_backward().call(dz, saved(input)); });
  }
};

struct AdaptiveAvgPool2dBackwardNode : OpNode {  // (grad_output, input)
  AdaptiveAvgPool2dBackwardNode() : OpNode("cnnext_adaptive_avg_pool2d_backward") {}
  std::vector<int64_t> hw;  // the forward op's output size: grad_output's H x W
  variable_list apply(variable_list&& grads) override {
    return first_input_only(grads, 2, [&](const at::Tensor& dz) { return op::adaptive_avg_pool2d().call(dz, hw); });
  }
};

// --- max pooling -------------------------------------------------------------------------

// max_pool2d_with_indices(input, ...) -> (out, indices): indices are not differentiable
// (they get no history, so the node has one input: out's gradient).
struct MaxPool2dNode : OpNode {
  MaxPool2dNode() : OpNode("cnnext_max_pool2d_with_indices") {}
  PoolConf c;
  std::vector<c10::SymInt> size;
  size_t idx;
  variable_list apply(variable_list&& grads) override {
    return first_input_only(grads, 1, [&](const at::Tensor& dz) {
      return op::max_pool2d_with_indices_backward().call(dz, saved(idx), size, c.k, c.s, c.p, c.d, c.ceil);
    });
  }
};

// S g (scatter-add to the indices); derivative in g: S^T dz = max_pool2d_select.
struct MaxPool2dBackwardNode : OpNode {  // (grad_output, indices, ...)
  MaxPool2dBackwardNode() : OpNode("cnnext_max_pool2d_with_indices_backward") {}
  PoolConf c;
  size_t idx;
  variable_list apply(variable_list&& grads) override {
    return first_input_only(grads, 2, [&](const at::Tensor& dz) {
      return op::max_pool2d_select().call(dz, saved(idx), c.k, c.s, c.p, c.d, c.ceil);
    });
  }
};

// S^T x (x at the indices); derivative in x: S dz.
struct MaxPool2dSelectNode : OpNode {  // (input, indices, ...)
  MaxPool2dSelectNode() : OpNode("cnnext_max_pool2d_select") {}
  PoolConf c;
  std::vector<c10::SymInt> size;
  size_t idx;
  variable_list apply(variable_list&& grads) override {
    return first_input_only(grads, 2, [&](const at::Tensor& dz) {
      return op::max_pool2d_with_indices_backward().call(dz, saved(idx), size, c.k, c.s, c.p, c.d, c.ceil);
    });
  }
};

struct MaxUnpool2dNode : OpNode {  // (input, indices, output_size)
  MaxUnpool2dNode() : OpNode("cnnext_max_unpool2d") {}
  size_t idx;
  variable_list apply(variable_list&& grads) override {
    return first_input_only(grads, 2, [&](const at::Tensor& dz) { return op::max_unpool2d_backward().call(dz, saved(idx)); });
  }
};

struct MaxUnpool2dBackwardNode : OpNode {  // (grad_output, indices)
  MaxUnpool2dBackwardNode() : OpNode("cnnext_max_unpool2d_backward") {}
  std::vector<c10::SymInt> hw;
  size_t idx;
  variable_list apply(variable_list&& grads) override {
    // The adjoint of a gather is a scatter-ADD: with repeated indices the values at
    // one position sum (max_unpool2d would keep only the last).
    return first_input_only(grads, 2, [&](const at::Tensor& dz) {
      std::vector<c10::SymInt> flat(dz.sym_sizes().begin(), dz.sym_sizes().end() - 2);
      flat.push_back(hw[0] * hw[1]);
      std::vector<c10::SymInt> shape(flat.begin(), flat.end() - 1);
      shape.push_back(hw[0]);
      shape.push_back(hw[1]);
      return at::zeros_symint(flat, dz.options())
          .scatter_add(-1, saved(idx).flatten(-2), dz.flatten(-2))
          .view_symint(shape);
    });
  }
};

// --- the Autograd kernels -----------------------------------------------------------------

at::Tensor avg_pool2d_ad(const at::Tensor& x, IntList k, IntList s, IntList p, bool ceil, bool cip,
                         OptInt div) {
  const bool fw = has_tangent(x);
  if (!fw && !wants_grad(x)) return CNNEXT_BELOW(op::avg_pool2d().call(x, k, s, p, ceil, cip, div));
  at::Tensor out = CNNEXT_BELOW(op::avg_pool2d().call(x, k, s, p, ceil, cip, div));
  if (wants_grad(x)) {
    auto node = make_node<AvgPool2dNode>(x);
    node->a = {{}, cip, div};
    node->a.c.set(k, s, p, {}, ceil);
    node->input = node->save(x);
    out = record(node, out, x);
  }
  if (fw) set_tangent(out, op::avg_pool2d().call(tangent(x), k, s, p, ceil, cip, div));  // linear
  return out;
}

at::Tensor avg_pool2d_backward_ad(const at::Tensor& g, const at::Tensor& x, IntList k, IntList s,
                                  IntList p, bool ceil, bool cip, OptInt div) {
  const bool fw = has_tangent(g);  // linear in g; x gives its shape only
  if (!fw && !wants_grad(g)) return CNNEXT_BELOW(op::avg_pool2d_backward().call(g, x, k, s, p, ceil, cip, div));
  at::Tensor out = CNNEXT_BELOW(op::avg_pool2d_backward().call(g, x, k, s, p, ceil, cip, div));
  if (wants_grad(g)) {
    auto node = make_node<AvgPool2dBackwardNode>(g, x);
    node->a = {{}, cip, div};
    node->a.c.set(k, s, p, {}, ceil);
    out = record(node, out, g, x);
  }
  if (fw) set_tangent(out, op::avg_pool2d_backward().call(tangent(g), primal(x), k, s, p, ceil, cip, div));
  return out;
}

at::Tensor adaptive_avg_pool2d_ad(const at::Tensor& x, IntList size) {
  const bool fw = has_tangent(x);
  if (!fw && !wants_grad(x)) return CNNEXT_BELOW(op::adaptive_avg_pool2d().call(x, size));
  at::Tensor out = CNNEXT_BELOW(op::adaptive_avg_pool2d().call(x, size));
  if (wants_grad(x)) {
    auto node = make_node<AdaptiveAvgPool2dNode>(x);
    node->input = node->save(x);
    out = record(node, out, x);
  }
  if (fw) set_tangent(out, op::adaptive_avg_pool2d().call(tangent(x), size));
  return out;
}

at::Tensor adaptive_avg_pool2d_backward_ad(const at::Tensor& g, const at::Tensor& x) {
  const bool fw = has_tangent(g);
  if (!fw && !wants_grad(g)) return CNNEXT_BELOW(op::adaptive_avg_pool2d_backward().call(g, x));
  at::Tensor out = CNNEXT_BELOW(op::adaptive_avg_pool2d_backward().call(g, x));
  if (wants_grad(g)) {
    auto node = make_node<AdaptiveAvgPool2dBackwardNode>(g, x);
    // The forward op's output size is grad_output's H x W (an int[2] argument: under
    // symbolic shapes this guards).
    node->hw = {g.sym_size(-2).guard_int(__FILE__, __LINE__), g.sym_size(-1).guard_int(__FILE__, __LINE__)};
    out = record(node, out, g, x);
  }
  if (fw) set_tangent(out, op::adaptive_avg_pool2d_backward().call(tangent(g), primal(x)));
  return out;
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_with_indices_ad(const at::Tensor& x, IntList k,
                                                              IntList s, IntList p, IntList d,
                                                              bool ceil) {
  const bool fw = has_tangent(x);
  if (!fw && !wants_grad(x)) return CNNEXT_BELOW(op::max_pool2d_with_indices().call(x, k, s, p, d, ceil));
  auto [out, idx] = CNNEXT_BELOW(op::max_pool2d_with_indices().call(x, k, s, p, d, ceil));
  if (wants_grad(x)) {
    auto node = make_node<MaxPool2dNode>(x);
    node->c.set(k, s, p, d, ceil);
    node->size = sym_vector(x.sym_sizes());
    node->idx = node->save(idx);
    out = record(node, out, x);
  }
  // The tangent at the maxima's indices.
  if (fw) set_tangent(out, op::max_pool2d_select().call(tangent(x), idx, k, s, p, d, ceil));
  return {out, idx};
}

at::Tensor max_pool2d_with_indices_backward_ad(const at::Tensor& g, const at::Tensor& idx,
                                               SymList size, IntList k, IntList s, IntList p,
                                               IntList d, bool ceil) {
  const bool fw = has_tangent(g);
  if (!fw && !wants_grad(g))
    return CNNEXT_BELOW(op::max_pool2d_with_indices_backward().call(g, idx, size, k, s, p, d, ceil));
  at::Tensor out = CNNEXT_BELOW(op::max_pool2d_with_indices_backward().call(g, idx, size, k, s, p, d, ceil));
  if (wants_grad(g)) {
    auto node = make_node<MaxPool2dBackwardNode>(g, idx);
    node->c.set(k, s, p, d, ceil);
    node->idx = node->save(idx);
    out = record(node, out, g, idx);
  }
  if (fw) set_tangent(out, op::max_pool2d_with_indices_backward().call(tangent(g), idx, size, k, s, p, d, ceil));
  return out;
}

at::Tensor max_pool2d_select_ad(const at::Tensor& x, const at::Tensor& idx, IntList k, IntList s,
                                IntList p, IntList d, bool ceil) {
  const bool fw = has_tangent(x);
  if (!fw && !wants_grad(x)) return CNNEXT_BELOW(op::max_pool2d_select().call(x, idx, k, s, p, d, ceil));
  at::Tensor out = CNNEXT_BELOW(op::max_pool2d_select().call(x, idx, k, s, p, d, ceil));
  if (wants_grad(x)) {
    auto node = make_node<MaxPool2dSelectNode>(x, idx);
    node->c.set(k, s, p, d, ceil);
    node->size = sym_vector(x.sym_sizes());
    node->idx = node->save(idx);
    out = record(node, out, x, idx);
  }
  if (fw) set_tangent(out, op::max_pool2d_select().call(tangent(x), idx, k, s, p, d, ceil));
  return out;
}

at::Tensor max_unpool2d_ad(const at::Tensor& x, const at::Tensor& idx, SymList size) {
  const bool fw = has_tangent(x);
  if (!fw && !wants_grad(x)) return CNNEXT_BELOW(op::max_unpool2d().call(x, idx, size));
  at::Tensor out = CNNEXT_BELOW(op::max_unpool2d().call(x, idx, size));
  if (wants_grad(x)) {
    auto node = make_node<MaxUnpool2dNode>(x, idx);
    node->idx = node->save(idx);
    out = record(node, out, x, idx);
  }
  if (fw) set_tangent(out, op::max_unpool2d().call(tangent(x), idx, size));
  return out;
}

at::Tensor max_unpool2d_backward_ad(const at::Tensor& g, const at::Tensor& idx) {
  const bool fw = has_tangent(g);
  if (!fw && !wants_grad(g)) return CNNEXT_BELOW(op::max_unpool2d_backward().call(g, idx));
  at::Tensor out = CNNEXT_BELOW(op::max_unpool2d_backward().call(g, idx));
  if (wants_grad(g)) {
    auto node = make_node<MaxUnpool2dBackwardNode>(g, idx);
    node->hw = {g.sym_size(-2), g.sym_size(-1)};
    node->idx = node->save(idx);
    out = record(node, out, g, idx);
  }
  if (fw) set_tangent(out, op::max_unpool2d_backward().call(tangent(g), idx));
  return out;
}

#undef CNNEXT_BELOW

}  // namespace

TORCH_LIBRARY_IMPL(cnnext, Autograd, m) {
  m.impl("avg_pool2d", &avg_pool2d_ad);
  m.impl("avg_pool2d_backward", &avg_pool2d_backward_ad);
  m.impl("adaptive_avg_pool2d", &adaptive_avg_pool2d_ad);
  m.impl("adaptive_avg_pool2d_backward", &adaptive_avg_pool2d_backward_ad);
  m.impl("max_pool2d_with_indices", &max_pool2d_with_indices_ad);
  m.impl("max_pool2d_with_indices_backward", &max_pool2d_with_indices_backward_ad);
  m.impl("max_pool2d_select", &max_pool2d_select_ad);
  m.impl("max_unpool2d", &max_unpool2d_ad);
  m.impl("max_unpool2d_backward", &max_unpool2d_backward_ad);
}

}  // namespace cnnext
