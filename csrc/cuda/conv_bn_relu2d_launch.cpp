// conv_bn_relu2d (training mode) on CUDA, torch side: device guard, current stream,
// allocation and dtype mapping around the torch-free launchers of
// csrc/cuda/conv_bn_relu2d.cu. Compiled only in CUDA builds. The arguments were checked by
// csrc/ops/conv_bn_relu2d.cpp; the output-shaped tensors are dense in one layout.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/conv2d_launch.h"
#include "cuda/conv_bn_relu2d.h"
#include "cuda/torch_glue.h"
#include "cuda/conv_bn_relu2d_launch.h"

namespace cnnext {
namespace cuda {
namespace {

const void* ptr_or_null(const c10::optional<at::Tensor>& t, at::Tensor& keep) {
  if (!t.has_value() || !t->defined()) return nullptr;
  keep = t->contiguous();
  return keep.const_data_ptr();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu2d_train(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
    double eps, const Conv2dParams& p, at::MemoryFormat out_format, bool relu) {
  const c10::cuda::CUDAGuard guard(input.device());
  const auto sopt = input.options().dtype(stats_dtype(input.scalar_type()));
  at::Tensor mean = at::zeros({p.O}, sopt), var = at::zeros({p.O}, sopt);
  const auto dt = dtype_of(input);
  // The implicit GEMM takes the batch statistics in its epilogue (the output is not read
  // again for them); otherwise the direct convolution, then the two-sweep statistics.
  at::Tensor conv_out;
  const bool fused = conv2d_forward_bn_stats(input, weight, bias, p, out_format, &conv_out, mean, var);
  if (!fused) conv_out = conv2d_forward(input, weight, bias, p, out_format, /*relu=*/false);
  at::Tensor out = at::empty_like(conv_out);
  if (conv_out.numel() == 0) return {out, conv_out, mean, var};
  const Strides4 s = strides_of(conv_out);
  if (!fused)
    C10_CUDA_CHECK(kernels::bn_batch_stats(dt, conv_out.const_data_ptr(), p.N, p.O, p.OH, p.OW, s,
                                           mean.mutable_data_ptr(), var.mutable_data_ptr(),
                                           current_stream()));
  at::Tensor g_keep, b_keep;
  const void* gamma = ptr_or_null(bn_weight, g_keep);
  const void* beta = ptr_or_null(bn_bias, b_keep);
  C10_CUDA_CHECK(kernels::bn_normalize(dt, conv_out.const_data_ptr(), p.N, p.O, p.OH, p.OW, s,
                                       mean.const_data_ptr(), var.const_data_ptr(), gamma, beta,
                                       eps, relu, out.mutable_data_ptr(), current_stream()));
  return {out, conv_out, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu2d_train_backward(
    const at::Tensor& grad, const c10::optional<at::Tensor>& out, const at::Tensor& conv_out,
    const at::Tensor& mean, const at::Tensor& var, const c10::optional<at::Tensor>& bn_weight,
    double eps, bool relu) {
  const c10::cuda::CUDAGuard guard(conv_out.device());
  const int64_t N = conv_out.size(0), C = conv_out.size(1), H = conv_out.size(2), W = conv_out.size(3);
  at::Tensor grad_conv = at::empty_like(conv_out);
  if (N * H * W == 0 || C == 0) {
    grad_conv.zero_();
    const at::Tensor z = at::zeros({C}, mean.options());
    return {grad_conv, z, z.clone(), at::zeros({C}, conv_out.options())};
  }
  const Strides4 s = strides_of(conv_out);
  const auto dt = dtype_of(conv_out);
  at::Tensor sums = at::empty({2, C}, mean.options());
  const at::Tensor mc = mean.contiguous(), vc = var.contiguous();
  const void* o = (relu && out.has_value() && out->defined()) ? out->const_data_ptr() : nullptr;
  C10_CUDA_CHECK(kernels::bn_backward_reduce(dt, grad.const_data_ptr(), o, conv_out.const_data_ptr(),
                                             N, C, H, W, s, mc.const_data_ptr(), vc.const_data_ptr(),
                                             eps, sums.mutable_data_ptr(), current_stream()));
  at::Tensor g_keep;
  const void* gamma = ptr_or_null(bn_weight, g_keep);
  C10_CUDA_CHECK(kernels::bn_backward_apply(dt, grad.const_data_ptr(), o, conv_out.const_data_ptr(),
                                            N, C, H, W, s, mc.const_data_ptr(), vc.const_data_ptr(),
                                            gamma, sums.const_data_ptr(), eps,
                                            grad_conv.mutable_data_ptr(), current_stream()));
  // grad_bn_weight / grad_bn_bias in the statistics' dtype (float for float16 / bfloat16,
  // as on the CPU). Copies, not views of sums: the outputs must not alias.
  return {grad_conv, sums[0].clone(), sums[1].clone(), channel_sum(grad_conv)};
}

}  // namespace cuda
}  // namespace cnnext
