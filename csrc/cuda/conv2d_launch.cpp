// conv2d on CUDA, torch side: device guard, current stream, output allocation and
// dtype mapping around the torch-free launchers of csrc/cuda/conv2d.cu. Compiled only
// in CUDA builds (setup.py defines CNNEXT_WITH_CUDA for them). The arguments were
// checked by csrc/ops/conv2d.cpp; every tensor here is 4-D and on one device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdlib>
#include <cstring>

#include "cuda/conv2d.h"
#include "cuda/conv2d_igemm.h"
#include "cuda/conv2d_launch.h"
#include "cuda/torch_glue.h"

namespace cnnext {
namespace cuda {
namespace {

// Which kernels conv2d uses, from $CNNEXT_CUDA_IGEMM: "0" the direct kernels only,
// "1" the implicit GEMM wherever it supports the problem (tests use it to reach the
// GEMM path with small shapes), anything else (or unset) the implicit GEMM where it
// pays off (kernels::igemm_profitable).
bool use_igemm(const kernels::IgemmProblem& q, kernels::DType dt) {
  const char* env = std::getenv("CNNEXT_CUDA_IGEMM");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  if (!kernels::igemm_supported(q, dt)) return false;
  if (env != nullptr && std::strcmp(env, "1") == 0) return true;
  return kernels::igemm_profitable(q);
}

bool use_igemm_wgrad(const kernels::IgemmWgradProblem& q, kernels::DType dt) {
  const char* env = std::getenv("CNNEXT_CUDA_IGEMM");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  if (!kernels::igemm_wgrad_supported(q, dt)) return false;
  if (env != nullptr && std::strcmp(env, "1") == 0) return true;
  return kernels::igemm_wgrad_profitable(q);
}

// float32 on tensor cores (TF32) only when torch allows TF32 for cuDNN convolutions
// (torch.backends.cudnn.allow_tf32): the same precision stock would use.
kernels::IgemmF32Math f32_math() {
  return at::globalContext().allowTF32CuDNN() ? kernels::IgemmF32Math::kTF32
                                              : kernels::IgemmF32Math::kStrict;
}

}  // namespace

at::Tensor conv2d_forward(const at::Tensor& input, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias, const Conv2dParams& p,
                          at::MemoryFormat out_format, bool relu) {
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty({p.N, p.O, p.OH, p.OW}, input.options().memory_format(out_format));
  if (out.numel() == 0) return out;
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  const auto q = kernels::igemm_forward_problem(p, strides_of(input), strides_of(out), relu);
  if (use_igemm(q, dtype_of(input))) {
    // B of the GEMM, k-contiguous in the problem's k order: (O, C/G, KH, KW) for
    // (c, kh, kw), (O, KH, KW, C/G) for the channels-last order (kh, kw, c).
    const at::Tensor wk = q.ch_fast ? weight.permute({0, 2, 3, 1}).contiguous() : weight.contiguous();
    C10_CUDA_CHECK(kernels::conv2d_igemm(q, dtype_of(input), f32_math(), input.const_data_ptr(),
                                         wk.const_data_ptr(),
                                         has_bias ? b.const_data_ptr() : nullptr,
                                         out.mutable_data_ptr(), current_stream()));
    return out;
  }
  const at::Tensor w = weight.contiguous();
  C10_CUDA_CHECK(kernels::conv2d_forward(
      p, dtype_of(input), input.const_data_ptr(), strides_of(input), w.const_data_ptr(),
      has_bias ? b.const_data_ptr() : nullptr, out.mutable_data_ptr(), strides_of(out),
      current_stream(), relu));
  return out;
}

bool conv2d_forward_bn_stats(const at::Tensor& input, const at::Tensor& weight,
                             const c10::optional<at::Tensor>& bias, const Conv2dParams& p,
                             at::MemoryFormat out_format, at::Tensor* out, at::Tensor& mean,
                             at::Tensor& var) {
  const c10::cuda::CUDAGuard guard(input.device());
  if (mean.scalar_type() != at::kFloat || var.scalar_type() != at::kFloat) return false;
  at::Tensor y = at::empty({p.N, p.O, p.OH, p.OW}, input.options().memory_format(out_format));
  if (y.numel() == 0) return false;
  const auto dt = dtype_of(input);
  const auto q = kernels::igemm_forward_problem(p, strides_of(input), strides_of(y), false);
  if (!use_igemm(q, dt)) return false;
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  const at::Tensor wk = q.ch_fast ? weight.permute({0, 2, 3, 1}).contiguous() : weight.contiguous();
  at::Tensor stats = at::empty({kernels::igemm_stats_floats(q)}, input.options().dtype(at::kFloat));
  C10_CUDA_CHECK(kernels::conv2d_igemm(q, dt, f32_math(), input.const_data_ptr(),
                                       wk.const_data_ptr(), has_bias ? b.const_data_ptr() : nullptr,
                                       y.mutable_data_ptr(), current_stream(),
                                       stats.mutable_data_ptr<float>()));
  C10_CUDA_CHECK(kernels::igemm_stats_finish(q, stats.const_data_ptr<float>(),
                                             mean.mutable_data_ptr<float>(),
                                             var.mutable_data_ptr<float>(), current_stream()));
  *out = y;
  return true;
}

at::Tensor conv2d_input_backward(const at::Tensor& grad_output, const at::Tensor& weight,
                                 const Conv2dParams& p, at::MemoryFormat out_format) {
  const c10::cuda::CUDAGuard guard(grad_output.device());
  at::Tensor gx =
      at::empty({p.N, p.C, p.H, p.W}, grad_output.options().memory_format(out_format));
  if (gx.numel() == 0) return gx;
  const auto q = kernels::igemm_input_backward_problem(p, strides_of(grad_output), strides_of(gx));
  if (use_igemm(q, dtype_of(grad_output))) {
    // B of the GEMM: column c of group g, k = (o, kh, kw) or (kh, kw, o) contiguous,
    // i.e. the weight as (G, C/G, O/G, KH, KW) or (G, C/G, KH, KW, O/G).
    const at::Tensor w5 = weight.reshape({p.G, p.out_per_group(), p.in_per_group(), p.KH, p.KW});
    const at::Tensor wk = q.ch_fast ? w5.permute({0, 2, 3, 4, 1}).contiguous()
                                    : w5.permute({0, 2, 1, 3, 4}).contiguous();
    C10_CUDA_CHECK(kernels::conv2d_igemm(q, dtype_of(grad_output), f32_math(),
                                         grad_output.const_data_ptr(), wk.const_data_ptr(),
                                         nullptr, gx.mutable_data_ptr(), current_stream()));
    return gx;
  }
  const at::Tensor w = weight.contiguous();
  C10_CUDA_CHECK(kernels::conv2d_input_backward(
      p, dtype_of(grad_output), grad_output.const_data_ptr(), strides_of(grad_output),
      w.const_data_ptr(), gx.mutable_data_ptr(), strides_of(gx),
      current_stream()));
  return gx;
}

at::Tensor conv2d_weight_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                  const Conv2dParams& p) {
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor gw = at::empty({p.O, p.in_per_group(), p.KH, p.KW}, input.options());
  if (gw.numel() == 0) return gw;
  const auto dt = dtype_of(input);
  const auto q = kernels::igemm_wgrad_problem(p, strides_of(grad_output), strides_of(input),
                                              input.element_size(), kernels::igemm_target_blocks());
  if (use_igemm_wgrad(q, dt)) {
    at::Tensor ws = at::empty({kernels::igemm_wgrad_workspace(q)}, input.options().dtype(at::kFloat));
    C10_CUDA_CHECK(kernels::conv2d_igemm_wgrad(q, dt, f32_math(), grad_output.const_data_ptr(),
                                               input.const_data_ptr(), ws.mutable_data_ptr<float>(),
                                               gw.mutable_data_ptr(), current_stream()));
    return gw;
  }
  // With N == 0 the launcher still runs: it writes the zeros of an empty sum.
  C10_CUDA_CHECK(kernels::conv2d_weight_backward(
      p, dtype_of(input), grad_output.const_data_ptr(), strides_of(grad_output),
      input.const_data_ptr(), strides_of(input), gw.mutable_data_ptr(),
      current_stream()));
  return gw;
}

at::Tensor channel_sum(const at::Tensor& t) {
  const c10::cuda::CUDAGuard guard(t.device());
  const int64_t C = t.size(1);
  at::Tensor out = at::empty({C}, t.options());
  if (C == 0) return out;
  // With N * H * W == 0 the launcher still runs: it writes zeros.
  C10_CUDA_CHECK(kernels::channel_sum(dtype_of(t), t.const_data_ptr(), t.size(0), C, t.size(2),
                                      t.size(3), strides_of(t), out.mutable_data_ptr(),
                                      current_stream()));
  return out;
}

void add_channel_bias_(at::Tensor& out, const at::Tensor& bias) {
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor b = bias.contiguous();
  C10_CUDA_CHECK(kernels::add_channel_bias(dtype_of(out), out.mutable_data_ptr(), out.size(0),
                                           out.size(1), out.size(2), out.size(3),
                                           strides_of(out), b.const_data_ptr(),
                                           current_stream()));
}

}  // namespace cuda
}  // namespace cnnext
