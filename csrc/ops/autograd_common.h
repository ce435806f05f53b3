// Helpers of the C++ autograd kernels (csrc/ops/autograd_*.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <c10/core/SymInt.h>

#include <vector>

namespace cnnext {

// Whether a call must record an autograd node: grad mode on and some differentiable
// input requiring grad. Otherwise the Autograd kernel goes straight to the backend.
template <typename... Ts>
inline bool wants_grad(const Ts&... ts) {
  if (!c10::GradMode::is_enabled()) return false;
  return ((ts.defined() && ts.requires_grad()) || ...);
}

inline bool wants_grad_opt(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() && t->requires_grad();
}

// Forward-mode AD (torch.autograd.forward_ad, torch.func.jvp / jacfwd): whether an input
// carries a tangent at level 0, the level both use. An op without a forward derivative
// must raise then, never hand back an output whose tangent silently reads as zero.
template <typename... Ts>
inline bool has_tangent(const Ts&... ts) {
  return ((ts.defined() && ts._fw_grad(/*level=*/0).defined()) || ...);
}

inline bool has_tangent_opt(const c10::optional<at::Tensor>& t) {
  return t.has_value() && has_tangent(*t);
}

[[noreturn]] inline void no_forward_ad(const char* op) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, "cnnext::", op,
                              ": forward-mode AD (torch.autograd.forward_ad, torch.func.jvp, "
                              "jacfwd) is not implemented for this op; an input carries a "
                              "tangent. Use reverse mode (backward, torch.autograd.grad) or the "
                              "stock torch op");
}

// The primal of t at level 0 (t itself when it carries no tangent): what an op's node
// and its forward derivative read, as torch's generated code does (an input carrying a
// tangent would make the op compute a tangent of its own tangent formula).
inline at::Tensor primal(const at::Tensor& t) { return has_tangent(t) ? t._fw_primal(0) : t; }

inline c10::optional<at::Tensor> primal_opt(const c10::optional<at::Tensor>& t) {
  return has_tangent_opt(t) ? c10::optional<at::Tensor>(primal(*t)) : t;
}

// t's tangent at level 0, undefined when it has none.
inline at::Tensor tangent(const at::Tensor& t) { return t.defined() ? t._fw_grad(0) : at::Tensor(); }

inline at::Tensor tangent_opt(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? tangent(*t) : at::Tensor();
}

// a + b where either may be undefined (an input without a tangent adds nothing).
inline at::Tensor add_defined(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined()) return b;
  if (!b.defined()) return a;
  return a + b;
}

// Sets out's tangent at level 0 (nothing when t is undefined: every input's tangent was
// undefined, which has_tangent excluded, or only non-differentiable inputs had one).
inline void set_tangent(const at::Tensor& out, const at::Tensor& t) {
  if (t.defined()) out._set_fw_grad(t, /*level=*/0, /*is_inplace_op=*/false);
}

inline std::vector<c10::SymInt> sym_vector(c10::SymIntArrayRef a) {
  return std::vector<c10::SymInt>(a.begin(), a.end());
}

}  // namespace cnnext
