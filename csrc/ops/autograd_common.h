// Helpers of the C++ autograd kernels (csrc/ops/autograd_*.cpp).
#pragma once

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

inline std::vector<c10::SymInt> sym_vector(c10::SymIntArrayRef a) {
  return std::vector<c10::SymInt>(a.begin(), a.end());
}

}  // namespace cnnext
