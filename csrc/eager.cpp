// cnnext._C.eager: direct Python entries to the ops of torch.ops.cnnext, for eager calls.
//
// Each function calls its op through a typed dispatcher handle, looked up once, so the
// call still goes through every dispatch key (Autograd, Python modes, fake tensors,
// tracing, CPU / CUDA). What it skips is torch.ops' per-call parse of the arguments
// against the schema: about 2.5 us of the 4.5 us a torch.ops call costs on a tiny
// tensor. cnnext/functional.py uses these entries only outside torch.compile and when no
// argument or mode asks for __torch_function__ (there it calls torch.ops.cnnext, which
// handles both). Errors and warnings are translated as torch's own bindings do, and the
// GIL is released while the op runs.
#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>
#include <vector>

#include "eager.h"

namespace cnnext {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Ints = std::vector<int64_t>;

template <typename Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

Tensor conv2d(const Tensor& input, const Tensor& weight, const OptTensor& bias, const Ints& stride,
              const Ints& padding, const Ints& dilation, int64_t groups) {
  static const auto op = handle<Tensor(const Tensor&, const Tensor&, const OptTensor&, c10::IntArrayRef,
                                       c10::IntArrayRef, c10::IntArrayRef, int64_t)>("cnnext::conv2d");
  return op.call(input, weight, bias, stride, padding, dilation, groups);
}

Tensor conv_transpose2d(const Tensor& input, const Tensor& weight, const OptTensor& bias, const Ints& stride,
                        const Ints& padding, const Ints& output_padding, int64_t groups, const Ints& dilation) {
  static const auto op =
      handle<Tensor(const Tensor&, const Tensor&, const OptTensor&, c10::IntArrayRef, c10::IntArrayRef,
                    c10::IntArrayRef, int64_t, c10::IntArrayRef)>("cnnext::conv_transpose2d");
  return op.call(input, weight, bias, stride, padding, output_padding, groups, dilation);
}

Tensor avg_pool2d(const Tensor& input, const Ints& kernel_size, const Ints& stride, const Ints& padding,
                  bool ceil_mode, bool count_include_pad, std::optional<int64_t> divisor_override) {
  static const auto op = handle<Tensor(const Tensor&, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, bool,
                                       bool, std::optional<int64_t>)>("cnnext::avg_pool2d");
  return op.call(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override);
}

Tensor adaptive_avg_pool2d(const Tensor& input, const Ints& output_size) {
  static const auto op = handle<Tensor(const Tensor&, c10::IntArrayRef)>("cnnext::adaptive_avg_pool2d");
  return op.call(input, output_size);
}

std::tuple<Tensor, Tensor> max_pool2d_with_indices(const Tensor& input, const Ints& kernel_size,
                                                   const Ints& stride, const Ints& padding,
                                                   const Ints& dilation, bool ceil_mode) {
  static const auto op =
      handle<std::tuple<Tensor, Tensor>(const Tensor&, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef,
                                        c10::IntArrayRef, bool)>("cnnext::max_pool2d_with_indices");
  return op.call(input, kernel_size, stride, padding, dilation, ceil_mode);
}

Tensor max_unpool2d(const Tensor& input, const Tensor& indices, const Ints& output_size) {
  static const auto op =
      handle<Tensor(const Tensor&, const Tensor&, c10::SymIntArrayRef)>("cnnext::max_unpool2d");
  return op.call(input, indices, c10::fromIntArrayRefSlow(output_size));
}

Tensor conv_bn_relu2d_eval(const Tensor& input, const Tensor& weight, const OptTensor& bias,
                           const OptTensor& bn_weight, const OptTensor& bn_bias, const Tensor& running_mean,
                           const Tensor& running_var, double eps, const Ints& stride, const Ints& padding,
                           const Ints& dilation, int64_t groups, bool relu) {
  static const auto op =
      handle<Tensor(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                    const Tensor&, const Tensor&, double, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef,
                    int64_t, bool)>("cnnext::conv_bn_relu2d_eval");
  return op.call(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, stride, padding,
                 dilation, groups, relu);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> conv_bn_relu2d_train(const Tensor& input, const Tensor& weight,
                                                                 const OptTensor& bias, const OptTensor& bn_weight,
                                                                 const OptTensor& bn_bias, double eps,
                                                                 const Ints& stride, const Ints& padding,
                                                                 const Ints& dilation, int64_t groups, bool relu) {
  static const auto op =
      handle<std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                                        const OptTensor&, const OptTensor&, double,
                                                        c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef,
                                                        int64_t, bool)>("cnnext::conv_bn_relu2d_train");
  return op.call(input, weight, bias, bn_weight, bn_bias, eps, stride, padding, dilation, groups, relu);
}

}  // namespace

void bind_eager(pybind11::module_& parent) {
  auto m = parent.def_submodule(
      "eager", "Direct entries to torch.ops.cnnext's ops for eager calls (see csrc/eager.cpp).");
  m.def("conv2d", torch::wrap_pybind_function_no_gil(conv2d));
  m.def("conv_transpose2d", torch::wrap_pybind_function_no_gil(conv_transpose2d));
  m.def("avg_pool2d", torch::wrap_pybind_function_no_gil(avg_pool2d));
  m.def("adaptive_avg_pool2d", torch::wrap_pybind_function_no_gil(adaptive_avg_pool2d));
  m.def("max_pool2d_with_indices", torch::wrap_pybind_function_no_gil(max_pool2d_with_indices));
  m.def("max_unpool2d", torch::wrap_pybind_function_no_gil(max_unpool2d));
  m.def("conv_bn_relu2d_eval", torch::wrap_pybind_function_no_gil(conv_bn_relu2d_eval));
  m.def("conv_bn_relu2d_train", torch::wrap_pybind_function_no_gil(conv_bn_relu2d_train));
}

}  // namespace cnnext
