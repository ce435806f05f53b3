// The table of cnnext's ops: each op once, with its schema and the C++ function type of
// its typed dispatcher handle. Everything that names an op's signature is made from it:
//   csrc/ops/op_table.cpp   the schemas (the one TORCH_LIBRARY(cnnext) block)
//   csrc/ops/handles.h      cnnext::op::<name>(), the typed handle, looked up once
//   csrc/eager.cpp          cnnext._C.eager, the direct Python entries of the eager ops
// The kernels (CPU and CUDA: csrc/ops/<op>.cpp, Autograd: csrc/ops/autograd_*.cpp, fake:
// cnnext/_meta.py and its siblings) are registered by name against these schemas;
// tests/test_op_table.py checks that every op has all of them.
//
// X(name, entry, schema, signature...):
//   entry      eager: cnnext._C.eager binds the op (cnnext.functional calls it there);
//              internal: reached through torch.ops or the handles only
//   schema     the schema after the name: "(arguments) -> returns"
//   signature  the handle's function type (SymInt[] arguments as c10::SymIntArrayRef)
// Add an op here, then its kernels; the rest follows.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace cnnext {
namespace op {
namespace types {
using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;
using OptInt = std::optional<int64_t>;
using Ints = at::IntArrayRef;
using SymInts = c10::SymIntArrayRef;
using Tensor2 = std::tuple<at::Tensor, at::Tensor>;
using Tensor4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
}  // namespace types
}  // namespace op
}  // namespace cnnext

// The signatures are written with the names of cnnext::op::types.
#define CNNEXT_OPS(X)                                                                                   \
  /* convolution: csrc/ops/conv2d.cpp, conv_transpose2d.cpp */                                         \
  X(conv2d, eager,                                                                                      \
    "(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, "     \
    "int groups) -> Tensor",                                                                            \
    Tensor(const Tensor&, const Tensor&, const OptTensor&, Ints, Ints, Ints, int64_t))                  \
  X(conv2d_input_backward, internal,                                                                    \
    "(Tensor grad_output, Tensor weight, SymInt[] input_size, int[2] stride, int[2] padding, "         \
    "int[2] dilation, int groups) -> Tensor",                                                           \
    Tensor(const Tensor&, const Tensor&, SymInts, Ints, Ints, Ints, int64_t))                           \
  X(conv2d_weight_backward, internal,                                                                   \
    "(Tensor grad_output, Tensor input, SymInt[] weight_size, int[2] stride, int[2] padding, "         \
    "int[2] dilation, int groups) -> Tensor",                                                           \
    Tensor(const Tensor&, const Tensor&, SymInts, Ints, Ints, Ints, int64_t))                           \
  X(channel_sum, internal, "(Tensor input) -> Tensor", Tensor(const Tensor&))                           \
  X(conv_transpose2d, eager,                                                                            \
    "(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "                      \
    "int[2] output_padding, int groups, int[2] dilation) -> Tensor",                                    \
    Tensor(const Tensor&, const Tensor&, const OptTensor&, Ints, Ints, Ints, int64_t, Ints))            \
  /* average pooling: csrc/ops/avg_pool2d.cpp */                                                        \
  X(avg_pool2d, eager,                                                                                  \
    "(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, bool ceil_mode, "               \
    "bool count_include_pad, int? divisor_override) -> Tensor",                                         \
    Tensor(const Tensor&, Ints, Ints, Ints, bool, bool, OptInt))                                        \
  X(avg_pool2d_backward, internal,                                                                      \
    "(Tensor grad_output, Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, "           \
    "bool ceil_mode, bool count_include_pad, int? divisor_override) -> Tensor",                         \
    Tensor(const Tensor&, const Tensor&, Ints, Ints, Ints, bool, bool, OptInt))                         \
  X(adaptive_avg_pool2d, eager, "(Tensor input, int[2] output_size) -> Tensor",                         \
    Tensor(const Tensor&, Ints))                                                                        \
  X(adaptive_avg_pool2d_backward, internal, "(Tensor grad_output, Tensor input) -> Tensor",             \
    Tensor(const Tensor&, const Tensor&))                                                               \
  /* max pooling and unpooling: csrc/ops/max_pool2d.cpp */                                             \
  X(max_pool2d_with_indices, eager,                                                                     \
    "(Tensor input, int[2] kernel_size, int[] stride, int[2] padding, int[2] dilation, "               \
    "bool ceil_mode) -> (Tensor, Tensor)",                                                              \
    Tensor2(const Tensor&, Ints, Ints, Ints, Ints, bool))                                               \
  X(max_pool2d_with_indices_backward, internal,                                                         \
    "(Tensor grad_output, Tensor indices, SymInt[] input_size, int[2] kernel_size, int[] stride, "     \
    "int[2] padding, int[2] dilation, bool ceil_mode) -> Tensor",                                       \
    Tensor(const Tensor&, const Tensor&, SymInts, Ints, Ints, Ints, Ints, bool))                        \
  X(max_pool2d_select, internal,                                                                        \
    "(Tensor input, Tensor indices, int[2] kernel_size, int[] stride, int[2] padding, "                \
    "int[2] dilation, bool ceil_mode) -> Tensor",                                                       \
    Tensor(const Tensor&, const Tensor&, Ints, Ints, Ints, Ints, bool))                                 \
  X(max_unpool2d, eager, "(Tensor input, Tensor indices, SymInt[2] output_size) -> Tensor",             \
    Tensor(const Tensor&, const Tensor&, SymInts))                                                      \
  X(max_unpool2d_backward, internal, "(Tensor grad_output, Tensor indices) -> Tensor",                  \
    Tensor(const Tensor&, const Tensor&))                                                               \
  /* fused convolution + batch norm (+ ReLU): csrc/ops/conv_bn_relu2d.cpp */                            \
  X(conv_bn_relu2d_train, eager,                                                                        \
    "(Tensor input, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, float eps, "      \
    "int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu) "                           \
    "-> (Tensor out, Tensor conv_out, Tensor mean, Tensor var)",                                        \
    Tensor4(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, double, \
            Ints, Ints, Ints, int64_t, bool))                                                           \
  X(conv_bn_relu2d_train_backward, internal,                                                            \
    "(Tensor grad_out, Tensor? out, Tensor conv_out, Tensor mean, Tensor var, Tensor? bn_weight, "     \
    "float eps, bool relu) "                                                                            \
    "-> (Tensor grad_conv_out, Tensor grad_bn_weight, Tensor grad_bn_bias, Tensor grad_conv_bias)",     \
    Tensor4(const Tensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&,               \
            const OptTensor&, double, bool))                                                            \
  X(batch_norm_update_stats_, internal,                                                                 \
    "(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, float momentum, "      \
    "int count) -> ()",                                                                                 \
    void(Tensor&, Tensor&, const Tensor&, const Tensor&, double, int64_t))                              \
  X(conv_bn_relu2d_eval, eager,                                                                         \
    "(Tensor input, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, "                 \
    "Tensor running_mean, Tensor running_var, float eps, int[2] stride, int[2] padding, "              \
    "int[2] dilation, int groups, bool relu) -> Tensor",                                                \
    Tensor(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,          \
           const Tensor&, const Tensor&, double, Ints, Ints, Ints, int64_t, bool))
