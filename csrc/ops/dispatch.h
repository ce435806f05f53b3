// Device dispatch for every op: the one place that knows whether this build has CUDA
// kernels. The op files (csrc/ops/*.cpp) include this header, never a backend's own.
//
//   CNNEXT_BACKEND(op, t, fn)(args...)   calls cuda::fn for a CUDA tensor t and cpu::fn
//                                        otherwise; in a CPU-only build a CUDA tensor
//                                        raises the rebuild message naming op.
//   CNNEXT_IMPL_CPU_AND_CUDA(fn)         registers the impls fn(m) makes for both the CPU
//                                        and the CUDA dispatch key.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/avg_pool2d.h"
#include "cpu/conv2d.h"
#include "cpu/conv_bn_relu2d.h"
#include "cpu/max_pool2d.h"

#ifdef CNNEXT_WITH_CUDA
#include "cuda/avg_pool2d_launch.h"
#include "cuda/conv2d_launch.h"
#include "cuda/conv_bn_relu2d_launch.h"
#include "cuda/max_pool2d_launch.h"
#endif

namespace cnnext {

[[noreturn]] inline void no_cuda(const char* op) {
  TORCH_CHECK(false, op,
              ": got CUDA tensors, but this cnnext build has no CUDA kernels "
              "(cnnext.build_info()['cuda'] is False). Rebuild with a CUDA build of torch and "
              "nvcc on PATH, e.g. FORCE_CUDA=1 pip install --no-build-isolation .");
}

// Whether t's op runs on the CUDA backend; in a CPU-only build, raises for CUDA tensors.
inline bool on_cuda(const char* op, const at::Tensor& t) {
#ifdef CNNEXT_WITH_CUDA
  (void)op;
  return t.is_cuda();
#else
  if (t.is_cuda()) no_cuda(op);
  return false;
#endif
}

}  // namespace cnnext

#ifdef CNNEXT_WITH_CUDA
#define CNNEXT_BACKEND(op, t, fn) \
  (::cnnext::on_cuda(op, t) ? &::cnnext::cuda::fn : &::cnnext::cpu::fn)
#else
#define CNNEXT_BACKEND(op, t, fn) (::cnnext::on_cuda(op, t), &::cnnext::cpu::fn)
#endif

#define CNNEXT_IMPL_CPU_AND_CUDA(fn) \
  TORCH_LIBRARY_IMPL(cnnext, CPU, m) { fn(m); } \
  TORCH_LIBRARY_IMPL(cnnext, CUDA, m) { fn(m); }
