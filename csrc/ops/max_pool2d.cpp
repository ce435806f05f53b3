// max_pool2d and max_unpool2d: argument checks and device dispatch (schemas:
// csrc/ops/op_table.h). The only place that checks what a user passed (index values
// excepted: the backends check each index as they read it).
//
// Five ops, closed under differentiation (autograd: csrc/ops/autograd_pool2d.cpp; the
// algebra: cnnext/_max_pool.py). With S the scatter-add of a plane of values to the
// positions `indices` names:
//   max_pool2d_with_indices            (y, idx)  y = x at idx (torch's maximum)
//   max_pool2d_with_indices_backward   dx = S(dy)                 d/d(dy): max_pool2d_select
//   max_pool2d_select                  z  = S^T(x) = x at idx     d/dx: ..._backward
//   max_unpool2d                       u  = zeros, u[idx] = x     d/dx: max_unpool2d_backward
//   max_unpool2d_backward              dx = du at idx             d/d(du): max_unpool2d
// The windows of max_pool2d that have no tap inside the input (possible with dilation
// and padding) output -inf with torch's index, and pass no gradient.
#include <torch/library.h>

#include "ops/checks.h"
#include "ops/dispatch.h"
#include "ops/pool2d_common.h"

namespace cnnext {
namespace {

// stride [] (torch's stride=None) means the kernel size.
Pool2dParams pool_params(const char* op, at::IntArrayRef in, at::IntArrayRef kernel,
                         at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, bool ceil_mode) {
  return make_pool_params(op, in, kernel, stride.empty() ? kernel : stride, padding, dilation,
                          ceil_mode);
}

void check_indices_type(const char* op, const at::Tensor& ref, const char* ref_name,
                        const at::Tensor& indices) {
  TORCH_CHECK(indices.device() == ref.device(), op, ": expected indices to be on the same device as ",
              ref_name, " (", ref.device(), "), got ", indices.device());
  TORCH_CHECK(indices.scalar_type() == at::kLong, op, ": expected indices to be int64, got ",
              indices.scalar_type());
}

void check_indices(const char* op, const at::Tensor& ref, const char* ref_name,
                   const at::Tensor& indices, at::IntArrayRef want) {
  check_indices_type(op, ref, ref_name, indices);
  TORCH_CHECK(indices.sizes() == want, op, ": expected indices of shape ", shape_str(want),
              " (the shape of ", ref_name, "), got ", shape_str(indices.sizes()));
}

std::vector<int64_t> input_size_4d(const char* op, at::IntArrayRef input_size, bool batched,
                                   int64_t dim) {
  TORCH_CHECK(input_size.size() == (batched ? 4u : 3u), op, ": expected input_size of ",
              batched ? 4 : 3, " entries to match grad_output's ", dim, " dims, got ",
              shape_str(input_size));
  std::vector<int64_t> in(input_size.begin(), input_size.end());
  if (!batched) in.insert(in.begin(), 1);
  return in;
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_with_indices(const at::Tensor& input,
                                                           at::IntArrayRef kernel_size,
                                                           at::IntArrayRef stride,
                                                           at::IntArrayRef padding,
                                                           at::IntArrayRef dilation,
                                                           bool ceil_mode) {
  constexpr const char* op = "max_pool2d";
  auto [x, batched] = as_batch(op, "input", input);
  check_dtype_supported(op, "input", input);
  const Pool2dParams p =
      pool_params(op, x.sizes(), kernel_size, stride, padding, dilation, ceil_mode);
  const auto fmt = batched ? layout_of({x}) : at::MemoryFormat::Contiguous;
  const auto r = CNNEXT_BACKEND(op, x, max_pool2d_forward)(x, p, fmt);
  return {unbatch(std::get<0>(r), batched), unbatch(std::get<1>(r), batched)};
}

at::Tensor max_pool2d_with_indices_backward(const at::Tensor& grad_output,
                                            const at::Tensor& indices, at::IntArrayRef input_size,
                                            at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                            at::IntArrayRef padding, at::IntArrayRef dilation,
                                            bool ceil_mode) {
  constexpr const char* op = "max_pool2d_with_indices_backward";
  auto [g, batched] = as_batch(op, "grad_output", grad_output);
  check_dtype_supported(op, "grad_output", grad_output);
  const auto in = input_size_4d(op, input_size, batched, grad_output.dim());
  const Pool2dParams p = pool_params(op, in, kernel_size, stride, padding, dilation, ceil_mode);
  const std::vector<int64_t> want{p.N, p.C, p.OH, p.OW};
  TORCH_CHECK(g.sizes() == at::IntArrayRef(want), op, ": expected grad_output of shape ",
              shape_str(want), " (the output of input_size ", shape_str(in), "), got ",
              shape_str(g.sizes()));
  check_indices(op, grad_output, "grad_output", indices, grad_output.sizes());
  const at::Tensor idx = batched ? indices : indices.unsqueeze(0);
  // grad_input takes the layout of the indices, which is the input's (as torch's does).
  const auto fmt = batched ? layout_of({idx}) : at::MemoryFormat::Contiguous;
  return unbatch(CNNEXT_BACKEND(op, g, max_pool2d_backward)(g, idx, p, fmt), batched);
}

at::Tensor max_pool2d_select(const at::Tensor& input, const at::Tensor& indices,
                             at::IntArrayRef kernel_size, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  constexpr const char* op = "max_pool2d_select";
  auto [x, batched] = as_batch(op, "input", input);
  check_dtype_supported(op, "input", input);
  const Pool2dParams p =
      pool_params(op, x.sizes(), kernel_size, stride, padding, dilation, ceil_mode);
  std::vector<int64_t> want{p.N, p.C, p.OH, p.OW};
  if (!batched) want.erase(want.begin());
  check_indices(op, input, "the output of max_pool2d on input", indices, want);
  const at::Tensor idx = batched ? indices : indices.unsqueeze(0);
  const auto fmt = batched ? layout_of({idx}) : at::MemoryFormat::Contiguous;
  return unbatch(CNNEXT_BACKEND(op, x, max_pool2d_select)(x, idx, p, fmt), batched);
}

at::Tensor max_unpool2d(const at::Tensor& input, const at::Tensor& indices,
                        at::IntArrayRef output_size) {
  constexpr const char* op = "max_unpool2d";
  auto [x, batched] = as_batch(op, "input", input);
  check_dtype_supported(op, "input", input);
  check_indices(op, input, "input", indices, input.sizes());
  TORCH_CHECK(output_size.size() == 2, op,
              ": expected output_size to have 2 entries (height, width), got ",
              shape_str(output_size));
  TORCH_CHECK(output_size[0] >= 0 && output_size[1] >= 0, op,
              ": expected output_size to be non-negative, got ", shape_str(output_size));
  const at::Tensor idx = batched ? indices : indices.unsqueeze(0);
  // The output takes the input's layout, as torch's does.
  const auto fmt = batched ? layout_of({x}) : at::MemoryFormat::Contiguous;
  return unbatch(CNNEXT_BACKEND(op, x, max_unpool2d_forward)(x, idx, output_size[0],
                                                                    output_size[1], fmt),
                 batched);
}

at::Tensor max_unpool2d_backward(const at::Tensor& grad_output, const at::Tensor& indices) {
  constexpr const char* op = "max_unpool2d_backward";
  auto [g, batched] = as_batch(op, "grad_output", grad_output);
  check_dtype_supported(op, "grad_output", grad_output);
  TORCH_CHECK(indices.dim() == grad_output.dim(), op, ": expected indices to have ",
              grad_output.dim(), " dims like grad_output, got ", indices.dim(),
              "-D tensor of shape ", shape_str(indices.sizes()));
  TORCH_CHECK(indices.size(-3) == grad_output.size(-3) &&
                  (!batched || indices.size(0) == grad_output.size(0)),
              op, ": expected indices to have the batch and channel sizes of grad_output ",
              shape_str(grad_output.sizes()), ", got ", shape_str(indices.sizes()));
  check_indices_type(op, grad_output, "grad_output", indices);
  // An empty plane (max_unpool2d's default output size can be 0 high or wide) holds
  // no position, so every index is out of range: raise as torch does, on the first.
  TORCH_CHECK(indices.numel() == 0 || g.size(2) * g.size(3) != 0, op, ": found an invalid index ",
              indices.flatten()[0].item<int64_t>(), " in indices: the plane it indexes is ",
              g.size(2), " x ", g.size(3), ", so it holds no position");
  const at::Tensor idx = batched ? indices : indices.unsqueeze(0);
  // Contiguous whatever the layouts, as torch's (a gather over flattened planes).
  const auto fmt = at::MemoryFormat::Contiguous;
  return unbatch(CNNEXT_BACKEND(op, g, max_unpool2d_backward)(g, idx, fmt), batched);
}

}  // namespace

// The same checked entry points serve both dispatch keys: they pick the backend
// from the input's device (CNNEXT_BACKEND).
static void impls(torch::Library& m) {
  m.impl("max_pool2d_with_indices", &max_pool2d_with_indices);
  m.impl("max_pool2d_with_indices_backward", &max_pool2d_with_indices_backward);
  m.impl("max_pool2d_select", &max_pool2d_select);
  m.impl("max_unpool2d", &max_unpool2d);
  m.impl("max_unpool2d_backward", &max_unpool2d_backward);
}
CNNEXT_IMPL_CPU_AND_CUDA(impls)

}  // namespace cnnext
