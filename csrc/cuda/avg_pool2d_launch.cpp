// avg_pool2d and adaptive_avg_pool2d on CUDA, torch side: device guard, current
// stream, output allocation and dtype mapping around the torch-free launchers of
// csrc/cuda/avg_pool2d.cu. Compiled only in CUDA builds. The arguments were checked by
// csrc/ops/avg_pool2d.cpp; every tensor here is 4-D.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/avg_pool2d.h"
#include "cuda/torch_glue.h"
#include "cuda/avg_pool2d_launch.h"

namespace cnnext {
namespace cuda {

at::Tensor avg_pool2d_forward(const at::Tensor& input, const AvgPool2dParams& a,
                              at::MemoryFormat out_format) {
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty({a.p.N, a.p.C, a.p.OH, a.p.OW},
                             input.options().memory_format(out_format));
  if (out.numel() == 0) return out;
  C10_CUDA_CHECK(kernels::avg_pool2d_forward(a, dtype_of(input), input.const_data_ptr(),
                                             strides_of(input), out.mutable_data_ptr(),
                                             strides_of(out), current_stream()));
  return out;
}

at::Tensor avg_pool2d_backward(const at::Tensor& grad_output, const AvgPool2dParams& a,
                               at::MemoryFormat out_format) {
  const c10::cuda::CUDAGuard guard(grad_output.device());
  at::Tensor gx = at::empty({a.p.N, a.p.C, a.p.H, a.p.W},
                            grad_output.options().memory_format(out_format));
  if (gx.numel() == 0) return gx;
  // With an empty grad_output (adaptive output_size 0) the launcher still runs: no
  // window contains any element, and it writes zeros.
  C10_CUDA_CHECK(kernels::avg_pool2d_backward(a, dtype_of(grad_output),
                                              grad_output.const_data_ptr(),
                                              strides_of(grad_output), gx.mutable_data_ptr(),
                                              strides_of(gx), current_stream()));
  return gx;
}

}  // namespace cuda
}  // namespace cnnext
