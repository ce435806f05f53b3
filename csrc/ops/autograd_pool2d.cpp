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
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops/autograd_common.h"

namespace cnnext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using IntList = at::IntArrayRef;
using SymList = c10::SymIntArrayRef;
using OptInt = c10::optional<int64_t>;

// The Function types are named after their ops: a node's name() (grad_fn.name()) is
// the type's, e.g. "cnnext::(anonymous namespace)::cnnext_avg_pool2d_backward".

// --- dispatcher handles (the op below autograd, or with autograd from a backward) ------

#define CNNEXT_OP(NAME, ...)                                                           \
  static const auto& NAME##_op() {                                                     \
    static const auto h =                                                              \
        c10::Dispatcher::singleton().findSchemaOrThrow("cnnext::" #NAME, "").typed<__VA_ARGS__>(); \
    return h;                                                                          \
  }

CNNEXT_OP(avg_pool2d, at::Tensor(const at::Tensor&, IntList, IntList, IntList, bool, bool, OptInt))
CNNEXT_OP(avg_pool2d_backward,
          at::Tensor(const at::Tensor&, const at::Tensor&, IntList, IntList, IntList, bool, bool, OptInt))
CNNEXT_OP(adaptive_avg_pool2d, at::Tensor(const at::Tensor&, IntList))
CNNEXT_OP(adaptive_avg_pool2d_backward, at::Tensor(const at::Tensor&, const at::Tensor&))
CNNEXT_OP(max_pool2d_with_indices,
          std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, IntList, IntList, IntList, IntList, bool))
CNNEXT_OP(max_pool2d_with_indices_backward,
          at::Tensor(const at::Tensor&, const at::Tensor&, SymList, IntList, IntList, IntList, IntList, bool))
CNNEXT_OP(max_pool2d_select,
          at::Tensor(const at::Tensor&, const at::Tensor&, IntList, IntList, IntList, IntList, bool))
CNNEXT_OP(max_unpool2d, at::Tensor(const at::Tensor&, const at::Tensor&, SymList))
CNNEXT_OP(max_unpool2d_backward, at::Tensor(const at::Tensor&, const at::Tensor&))
#undef CNNEXT_OP

// Pooling arguments kept for the backward pass: (kernel_size, stride, padding, dilation).
struct PoolConf {
  std::vector<int64_t> k, s, p, d;
};
void save_conf(AutogradContext* ctx, IntList k, IntList s, IntList p, IntList d) {
  ctx->saved_data["k"] = k.vec();
  ctx->saved_data["s"] = s.vec();
  ctx->saved_data["p"] = p.vec();
  ctx->saved_data["d"] = d.vec();
}
PoolConf load_conf(AutogradContext* ctx) {
  return {ctx->saved_data["k"].toIntVector(), ctx->saved_data["s"].toIntVector(),
          ctx->saved_data["p"].toIntVector(), ctx->saved_data["d"].toIntVector()};
}

// --- average pooling ---------------------------------------------------------------------

struct cnnext_avg_pool2d : torch::autograd::Function<cnnext_avg_pool2d> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, IntList k, IntList s,
                            IntList p, bool ceil, bool cip, OptInt div) {
    save_conf(ctx, k, s, p, {});
    ctx->saved_data["ceil"] = ceil;
    ctx->saved_data["cip"] = cip;
    ctx->saved_data["div"] = div;
    ctx->save_for_backward({input});
    return avg_pool2d_op().call(input, k, s, p, ceil, cip, div);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto x = ctx->get_saved_variables()[0];
    const PoolConf c = load_conf(ctx);
    at::Tensor gx;
    if (ctx->needs_input_grad(0))
      gx = avg_pool2d_backward_op().call(grads[0], x, c.k, c.s, c.p, ctx->saved_data["ceil"].toBool(),
                                         ctx->saved_data["cip"].toBool(),
                                         ctx->saved_data["div"].toOptional<int64_t>());
    return {gx, {}, {}, {}, {}, {}, {}};
  }
};

// Linear in grad_output: its derivative is avg_pool2d of the incoming gradient; the
// input is read for its shape and layout only and gets no gradient.
struct cnnext_avg_pool2d_backward : torch::autograd::Function<cnnext_avg_pool2d_backward> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& g, const at::Tensor& input,
                            IntList k, IntList s, IntList p, bool ceil, bool cip, OptInt div) {
    save_conf(ctx, k, s, p, {});
    ctx->saved_data["ceil"] = ceil;
    ctx->saved_data["cip"] = cip;
    ctx->saved_data["div"] = div;
    return avg_pool2d_backward_op().call(g, input, k, s, p, ceil, cip, div);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const PoolConf c = load_conf(ctx);
    at::Tensor dg;
    if (ctx->needs_input_grad(0))
      dg = avg_pool2d_op().call(grads[0], c.k, c.s, c.p, ctx->saved_data["ceil"].toBool(),
                                ctx->saved_data["cip"].toBool(),
                                ctx->saved_data["div"].toOptional<int64_t>());
    return {dg, {}, {}, {}, {}, {}, {}, {}};
  }
};

struct cnnext_adaptive_avg_pool2d : torch::autograd::Function<cnnext_adaptive_avg_pool2d> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, IntList size) {
    ctx->save_for_backward({input});
    return adaptive_avg_pool2d_op().call(input, size);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor gx;
    if (ctx->needs_input_grad(0))
      gx = adaptive_avg_pool2d_backward_op().call(grads[0], ctx->get_saved_variables()[0]);
    return {gx, {}};
  }
};

struct cnnext_adaptive_avg_pool2d_backward : torch::autograd::Function<cnnext_adaptive_avg_pool2d_backward> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& g, const at::Tensor& input) {
    // The output size of the forward op is grad_output's H x W (an int[2] argument:
    // under symbolic shapes this guards, as the Python formula did).
    ctx->saved_data["hw"] = std::vector<int64_t>{
        g.sym_size(-2).guard_int(__FILE__, __LINE__), g.sym_size(-1).guard_int(__FILE__, __LINE__)};
    return adaptive_avg_pool2d_backward_op().call(g, input);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor dg;
    if (ctx->needs_input_grad(0))
      dg = adaptive_avg_pool2d_op().call(grads[0], ctx->saved_data["hw"].toIntVector());
    return {dg, {}};
  }
};

// --- max pooling -------------------------------------------------------------------------

struct cnnext_max_pool2d_with_indices : torch::autograd::Function<cnnext_max_pool2d_with_indices> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, IntList k, IntList s,
                               IntList p, IntList d, bool ceil) {
    auto [out, idx] = max_pool2d_with_indices_op().call(input, k, s, p, d, ceil);
    ctx->mark_non_differentiable({idx});
    // No zero tensor for the indices' (never defined) gradient: materialising it cost
    // an int64 fill the size of the output, longer than the backward kernel itself.
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({idx});
    ctx->saved_data["size"] = sym_vector(input.sym_sizes());
    save_conf(ctx, k, s, p, d);
    ctx->saved_data["ceil"] = ceil;
    return {out, idx};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor gx;
    if (ctx->needs_input_grad(0) && grads[0].defined()) {
      const PoolConf c = load_conf(ctx);
      const auto size = ctx->saved_data["size"].toSymIntVector();
      gx = max_pool2d_with_indices_backward_op().call(grads[0], ctx->get_saved_variables()[0], size,
                                                      c.k, c.s, c.p, c.d, ctx->saved_data["ceil"].toBool());
    }
    return {gx, {}, {}, {}, {}, {}};
  }
};

// S g (scatter-add to the indices); derivative in g: S^T dz = max_pool2d_select.
struct cnnext_max_pool2d_with_indices_backward : torch::autograd::Function<cnnext_max_pool2d_with_indices_backward> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& g, const at::Tensor& idx,
                            SymList size, IntList k, IntList s, IntList p, IntList d, bool ceil) {
    ctx->save_for_backward({idx});
    save_conf(ctx, k, s, p, d);
    ctx->saved_data["ceil"] = ceil;
    return max_pool2d_with_indices_backward_op().call(g, idx, size, k, s, p, d, ceil);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor dg;
    if (ctx->needs_input_grad(0)) {
      const PoolConf c = load_conf(ctx);
      dg = max_pool2d_select_op().call(grads[0], ctx->get_saved_variables()[0], c.k, c.s, c.p, c.d,
                                       ctx->saved_data["ceil"].toBool());
    }
    return {dg, {}, {}, {}, {}, {}, {}, {}};
  }
};

// S^T x (x at the indices); derivative in x: S dz.
struct cnnext_max_pool2d_select : torch::autograd::Function<cnnext_max_pool2d_select> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& idx,
                            IntList k, IntList s, IntList p, IntList d, bool ceil) {
    ctx->save_for_backward({idx});
    ctx->saved_data["size"] = sym_vector(input.sym_sizes());
    save_conf(ctx, k, s, p, d);
    ctx->saved_data["ceil"] = ceil;
    return max_pool2d_select_op().call(input, idx, k, s, p, d, ceil);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor gx;
    if (ctx->needs_input_grad(0)) {
      const PoolConf c = load_conf(ctx);
      const auto size = ctx->saved_data["size"].toSymIntVector();
      gx = max_pool2d_with_indices_backward_op().call(grads[0], ctx->get_saved_variables()[0], size,
                                                      c.k, c.s, c.p, c.d, ctx->saved_data["ceil"].toBool());
    }
    return {gx, {}, {}, {}, {}, {}, {}};
  }
};

struct cnnext_max_unpool2d : torch::autograd::Function<cnnext_max_unpool2d> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& idx,
                            SymList size) {
    ctx->save_for_backward({idx});
    return max_unpool2d_op().call(input, idx, size);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor gx;
    if (ctx->needs_input_grad(0))
      gx = max_unpool2d_backward_op().call(grads[0], ctx->get_saved_variables()[0]);
    return {gx, {}, {}};
  }
};

struct cnnext_max_unpool2d_backward : torch::autograd::Function<cnnext_max_unpool2d_backward> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& g, const at::Tensor& idx) {
    ctx->save_for_backward({idx});
    ctx->saved_data["hw"] = std::vector<c10::SymInt>{g.sym_size(-2), g.sym_size(-1)};
    return max_unpool2d_backward_op().call(g, idx);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor dg;
    if (ctx->needs_input_grad(0)) {
      // The adjoint of a gather is a scatter-ADD: with repeated indices the values at
      // one position sum (max_unpool2d would keep only the last).
      const auto hw = ctx->saved_data["hw"].toSymIntVector();
      const at::Tensor& dz = grads[0];
      std::vector<c10::SymInt> flat(dz.sym_sizes().begin(), dz.sym_sizes().end() - 2);
      flat.push_back(hw[0] * hw[1]);
      std::vector<c10::SymInt> shape(flat.begin(), flat.end() - 1);
      shape.push_back(hw[0]);
      shape.push_back(hw[1]);
      dg = at::zeros_symint(flat, dz.options())
               .scatter_add(-1, ctx->get_saved_variables()[0].flatten(-2), dz.flatten(-2))
               .view_symint(shape);
    }
    return {dg, {}};
  }
};

// --- the Autograd kernels -----------------------------------------------------------------

at::Tensor avg_pool2d_ad(const at::Tensor& x, IntList k, IntList s, IntList p, bool ceil, bool cip,
                         OptInt div) {
  if (has_tangent(x)) {  // forward-mode AD: linear, the op applied to the tangent
    at::Tensor out = avg_pool2d_ad(primal(x), k, s, p, ceil, cip, div);
    set_tangent(out, avg_pool2d_op().call(tangent(x), k, s, p, ceil, cip, div));
    return out;
  }
  if (!wants_grad(x)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return avg_pool2d_op().call(x, k, s, p, ceil, cip, div);
  }
  return cnnext_avg_pool2d::apply(x, k, s, p, ceil, cip, div);
}

at::Tensor avg_pool2d_backward_ad(const at::Tensor& g, const at::Tensor& x, IntList k, IntList s,
                                  IntList p, bool ceil, bool cip, OptInt div) {
  if (has_tangent(g, x)) {  // linear in g; x gives its shape only
    at::Tensor out = avg_pool2d_backward_ad(primal(g), primal(x), k, s, p, ceil, cip, div);
    if (has_tangent(g))
      set_tangent(out, avg_pool2d_backward_op().call(tangent(g), primal(x), k, s, p, ceil, cip, div));
    return out;
  }
  if (!wants_grad(g)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return avg_pool2d_backward_op().call(g, x, k, s, p, ceil, cip, div);
  }
  return cnnext_avg_pool2d_backward::apply(g, x, k, s, p, ceil, cip, div);
}

at::Tensor adaptive_avg_pool2d_ad(const at::Tensor& x, IntList size) {
  if (has_tangent(x)) {
    at::Tensor out = adaptive_avg_pool2d_ad(primal(x), size);
    set_tangent(out, adaptive_avg_pool2d_op().call(tangent(x), size));
    return out;
  }
  if (!wants_grad(x)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return adaptive_avg_pool2d_op().call(x, size);
  }
  return cnnext_adaptive_avg_pool2d::apply(x, size);
}

at::Tensor adaptive_avg_pool2d_backward_ad(const at::Tensor& g, const at::Tensor& x) {
  if (has_tangent(g, x)) {
    at::Tensor out = adaptive_avg_pool2d_backward_ad(primal(g), primal(x));
    if (has_tangent(g)) set_tangent(out, adaptive_avg_pool2d_backward_op().call(tangent(g), primal(x)));
    return out;
  }
  if (!wants_grad(g)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return adaptive_avg_pool2d_backward_op().call(g, x);
  }
  return cnnext_adaptive_avg_pool2d_backward::apply(g, x);
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_with_indices_ad(const at::Tensor& x, IntList k,
                                                              IntList s, IntList p, IntList d,
                                                              bool ceil) {
  if (has_tangent(x)) {  // the tangent at the maxima's indices
    auto r = max_pool2d_with_indices_ad(primal(x), k, s, p, d, ceil);
    set_tangent(std::get<0>(r), max_pool2d_select_op().call(tangent(x), std::get<1>(r), k, s, p, d, ceil));
    return r;
  }
  if (!wants_grad(x)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return max_pool2d_with_indices_op().call(x, k, s, p, d, ceil);
  }
  auto r = cnnext_max_pool2d_with_indices::apply(x, k, s, p, d, ceil);
  return {r[0], r[1]};
}

at::Tensor max_pool2d_with_indices_backward_ad(const at::Tensor& g, const at::Tensor& idx,
                                               SymList size, IntList k, IntList s, IntList p,
                                               IntList d, bool ceil) {
  if (has_tangent(g)) {
    at::Tensor out = max_pool2d_with_indices_backward_ad(primal(g), idx, size, k, s, p, d, ceil);
    set_tangent(out, max_pool2d_with_indices_backward_op().call(tangent(g), idx, size, k, s, p, d, ceil));
    return out;
  }
  if (!wants_grad(g)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return max_pool2d_with_indices_backward_op().call(g, idx, size, k, s, p, d, ceil);
  }
  return cnnext_max_pool2d_with_indices_backward::apply(g, idx, size, k, s, p, d, ceil);
}

at::Tensor max_pool2d_select_ad(const at::Tensor& x, const at::Tensor& idx, IntList k, IntList s,
                                IntList p, IntList d, bool ceil) {
  if (has_tangent(x)) {
    at::Tensor out = max_pool2d_select_ad(primal(x), idx, k, s, p, d, ceil);
    set_tangent(out, max_pool2d_select_op().call(tangent(x), idx, k, s, p, d, ceil));
    return out;
  }
  if (!wants_grad(x)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return max_pool2d_select_op().call(x, idx, k, s, p, d, ceil);
  }
  return cnnext_max_pool2d_select::apply(x, idx, k, s, p, d, ceil);
}

at::Tensor max_unpool2d_ad(const at::Tensor& x, const at::Tensor& idx, SymList size) {
  if (has_tangent(x)) {
    at::Tensor out = max_unpool2d_ad(primal(x), idx, size);
    set_tangent(out, max_unpool2d_op().call(tangent(x), idx, size));
    return out;
  }
  if (!wants_grad(x)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return max_unpool2d_op().call(x, idx, size);
  }
  return cnnext_max_unpool2d::apply(x, idx, size);
}

at::Tensor max_unpool2d_backward_ad(const at::Tensor& g, const at::Tensor& idx) {
  if (has_tangent(g)) {
    at::Tensor out = max_unpool2d_backward_ad(primal(g), idx);
    set_tangent(out, max_unpool2d_backward_op().call(tangent(g), idx));
    return out;
  }
  if (!wants_grad(g)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return max_unpool2d_backward_op().call(g, idx);
  }
  return cnnext_max_unpool2d_backward::apply(g, idx);
}

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
