// max_pool2d and max_unpool2d on CUDA, torch side: device guard, current stream,
// allocation, dtype mapping and the read-back of the bad-index flag around the
// torch-free launchers of csrc/cuda/max_pool2d.cu. Compiled only in CUDA builds.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/max_pool2d.h"
#include "cuda/torch_glue.h"
#include "cuda/max_pool2d_launch.h"

namespace cnnext {
namespace cuda {
namespace {

// {found, value} on the device; read back (a synchronisation) after the kernel.
at::Tensor bad_flag(const at::Tensor& like) {
  return at::zeros({2}, like.options().dtype(at::kLong));
}

void check_bad(const at::Tensor& flag, const char* op, int64_t H, int64_t W) {
  const at::Tensor h = flag.cpu();
  const int64_t* v = h.const_data_ptr<int64_t>();
  TORCH_CHECK(v[0] == 0, op, ": found an invalid index ", v[1],
              " in indices: the plane it indexes is ", H, " x ", W,
              ", so indices must lie in [0, ", H * W, ")");
}

at::Tensor gather(const char* op, const at::Tensor& src, const at::Tensor& indices,
                  const Pool2dParams* pool, at::MemoryFormat out_format) {
  const c10::cuda::CUDAGuard guard(src.device());
  at::Tensor out = at::empty(indices.sizes(), src.options().memory_format(out_format));
  if (out.numel() == 0) return out;
  const int64_t Hs = src.size(2), Ws = src.size(3);
  if (Hs * Ws == 0) return out.zero_();
  at::Tensor flag = bad_flag(src);
  C10_CUDA_CHECK(kernels::gather_planes(
      pool, dtype_of(src), src.const_data_ptr(), strides_of(src), Hs, Ws,
      indices.const_data_ptr<int64_t>(), strides_of(indices), indices.size(0), indices.size(1),
      indices.size(2), indices.size(3), out.mutable_data_ptr(), strides_of(out),
      flag.mutable_data_ptr<int64_t>(), current_stream()));
  check_bad(flag, op, Hs, Ws);
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> max_pool2d_forward(const at::Tensor& input,
                                                      const Pool2dParams& p,
                                                      at::MemoryFormat out_format) {
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty({p.N, p.C, p.OH, p.OW}, input.options().memory_format(out_format));
  at::Tensor idx = at::empty({p.N, p.C, p.OH, p.OW},
                             input.options().dtype(at::kLong).memory_format(out_format));
  if (out.numel() == 0) return {out, idx};
  C10_CUDA_CHECK(kernels::max_pool2d_forward(p, dtype_of(input), input.const_data_ptr(),
                                             strides_of(input), out.mutable_data_ptr(),
                                             strides_of(out), idx.mutable_data_ptr<int64_t>(),
                                             strides_of(idx), current_stream()));
  return {out, idx};
}

at::Tensor max_pool2d_backward(const at::Tensor& grad_output, const at::Tensor& indices,
                               const Pool2dParams& p, at::MemoryFormat out_format) {
  const c10::cuda::CUDAGuard guard(grad_output.device());
  at::Tensor gx = at::empty({p.N, p.C, p.H, p.W}, grad_output.options().memory_format(out_format));
  if (gx.numel() == 0) return gx;
  // Every element is written (zero where no window chose it).
  C10_CUDA_CHECK(kernels::max_pool2d_backward(
      p, dtype_of(grad_output), grad_output.const_data_ptr(), strides_of(grad_output),
      indices.const_data_ptr<int64_t>(), strides_of(indices), gx.mutable_data_ptr(),
      strides_of(gx), current_stream()));
  return gx;
}

at::Tensor max_pool2d_select(const at::Tensor& src, const at::Tensor& indices,
                             const Pool2dParams& p, at::MemoryFormat out_format) {
  return gather("max_pool2d_select", src, indices, &p, out_format);
}

at::Tensor max_unpool2d_backward(const at::Tensor& grad_output, const at::Tensor& indices,
                                 at::MemoryFormat out_format) {
  return gather("max_unpool2d_backward", grad_output, indices, nullptr, out_format);
}

at::Tensor max_unpool2d_forward(const at::Tensor& input, const at::Tensor& indices, int64_t OH,
                                int64_t OW, at::MemoryFormat out_format) {
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  at::Tensor out = at::empty({N, C, OH, OW}, input.options().memory_format(out_format)).zero_();
  if (out.numel() == 0 || input.numel() == 0) return out;
  at::Tensor flag = bad_flag(input);
  C10_CUDA_CHECK(kernels::max_unpool2d(dtype_of(input), input.const_data_ptr(), strides_of(input),
                                       indices.const_data_ptr<int64_t>(), strides_of(indices), N, C,
                                       H, W, out.mutable_data_ptr(), strides_of(out), OH, OW,
                                       flag.mutable_data_ptr<int64_t>(), current_stream()));
  check_bad(flag, "max_unpool2d", OH, OW);
  return out;
}

}  // namespace cuda
}  // namespace cnnext
