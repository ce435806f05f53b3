// The autograd nodes of cnnext's ops: torch::autograd::Node subclasses, built the way
// torch's generated VariableType kernels build theirs (collect the input edges, save
// what the backward reads as SavedVariables, run the op below autograd, set the
// outputs' history).
//
// Why not torch::autograd::Function: its apply() refuses every functorch transform
// ("cannot use C++ torch::autograd::Function with functorch transforms"), and runs the
// forward with grad mode off, which a grad level nested in another would get wrong.
// A plain Node is what torch's own ops record, so torch.func.grad / vjp / jacrev /
// hessian go through it as through a native op: functorch wraps the inputs of a grad
// level, our Autograd kernel records the node on the wrappers, and the call below
// autograd reaches the next level. It also costs less per call than a Function (no
// AutogradContext, no IValue map of saved data).
#pragma once

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

namespace cnnext {

using torch::autograd::variable_list;

// torch 2.13 holds nodes by c10::intrusive_ptr, earlier versions by std::shared_ptr:
// NodePtr<N> is whichever an Edge holds, new_node<N>() makes one.
using AnyNodePtr = std::decay_t<decltype(std::declval<torch::autograd::Edge>().function)>;
constexpr bool kIntrusiveNodes = !std::is_same_v<AnyNodePtr, std::shared_ptr<torch::autograd::Node>>;
template <class N>
using NodePtr = std::conditional_t<kIntrusiveNodes, c10::intrusive_ptr<N>, std::shared_ptr<N>>;

template <class N>
NodePtr<N> new_node() {
  if constexpr (kIntrusiveNodes) {
    return c10::make_intrusive<N>();
  } else {
    // torch's deleteNode (found by argument-dependent lookup: it exists only where
    // nodes are shared_ptrs) frees long chains of nodes without deep recursion.
    return std::shared_ptr<N>(new N(), [](auto* node) { deleteNode(node); });
  }
}

// A node with its name (grad_fn.name()) and an indexed list of saved tensors.
struct OpNode : torch::autograd::Node {
  explicit OpNode(const char* name) : name_(name) {}

  std::string name() const override { return name_; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& s : saved_) s.reset_data();
  }

  // Saves t (undefined: nothing to save) and returns its slot. is_output: t is an output
  // of this node (kept without its grad_fn, which is this node, to break the cycle).
  size_t save(const at::Tensor& t, bool is_output = false) {
    saved_.emplace_back(t, is_output);
    return saved_.size() - 1;
  }

  // The tensor in slot i; raises torch's "backward through the graph a second time"
  // error once the saved tensors were freed.
  at::Tensor saved(size_t i) { return saved_[i].unpack(getptr()); }

  // Whether the gradient of input edge i is wanted in this backward pass (false for an
  // absent optional tensor, whose edge is empty).
  bool needs(size_t i) const { return task_should_compute_output(i); }

  // The apply() of a node whose op is linear in its first input and passes none of its
  // other n_inputs - 1 a gradient (they are read for shape, layout or indices): the
  // first input's gradient is f(dz), where it is wanted and dz is defined.
  template <class F>
  variable_list first_input_only(const variable_list& grads, size_t n_inputs, F&& f) {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list r(n_inputs);
    if (needs(0) && grads[0].defined()) r[0] = f(grads[0]);
    return r;
  }

 protected:
  const char* name_;
  std::vector<torch::autograd::SavedVariable> saved_;
};

// A node of type N with one edge per tensor argument, in order (an absent optional
// tensor gets an empty edge, so positions never shift).
template <class N, class... Inputs>
NodePtr<N> make_node(const Inputs&... inputs) {
  NodePtr<N> node = new_node<N>();
  node->set_next_edges(torch::autograd::collect_next_edges(inputs...));
  return node;
}

// Makes out (a result of the op below autograd) the node's next differentiable output.
// An output that aliases an input would take over that input's history: copy it then.
// (functorch's wrappers have no storage to compare: they are never aliases here.)
template <class P, class... Inputs>
at::Tensor record(const P& node, at::Tensor out, const Inputs&... inputs) {
  const bool aliased =
      out.has_storage() && ((inputs.defined() && inputs.has_storage() && out.is_alias_of(inputs)) || ...);
  if (aliased) out = out.clone();
  torch::autograd::set_history(out, node);
  return out;
}

}  // namespace cnnext
