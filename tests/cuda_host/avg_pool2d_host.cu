// Runs the per-element bodies of the CUDA avg_pool2d / adaptive_avg_pool2d kernels on
// the host, without a GPU, for tests/test_avg_pool2d_cuda_host.py. It includes
// csrc/cuda/avg_pool2d.cu itself, so it calls the very __host__ __device__ functions
// the kernels loop around: forward_element, global_partial + global_store and
// backward_element. No torch headers; build with
//   nvcc -std=c++17 -Icsrc -o avg_pool2d_host tests/cuda_host/avg_pool2d_host.cu
// and run as `avg_pool2d_host IN OUT`.
//
// IN is a sequence of records; every integer is a little-endian int64.
//   op      0 forward (one element at a time, in the order the launcher picks),
//           1 global forward (`split` lane partial sums per plane, added in lane order,
//             as a warp of 32 lanes does with split 32), 2 backward
//   dtype   DType: 0 F32, 1 F64, 2 F16, 3 BF16
//   split   op 1 only (>= 1)
//   the 14 fields of Pool2dParams in declaration order, then adaptive,
//   count_include_pad and divisor (AvgPool2dParams)
//   two tensors, each as: strides (n, c, h, w), span, then span elements for the
//   input (none for the output). span: elements from element (0, 0, 0, 0) to the last.
//     op 0, 1: x, y        op 2: gy, gx
// For each record OUT gets the output's span elements. Outputs start out NaN, so an
// element no call writes, or a gap of a strided output, comes back NaN; inputs sit
// between NaN guards, so a read outside them poisons the result.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cuda/avg_pool2d.cu"

using namespace cnnext;
using namespace cnnext::cuda::kernels;
using namespace cnnext::cuda::kernels::avg_pool2d_detail;

#define CNNEXT_HOST_PROGRAM "avg_pool2d_host"
#include "harness.h"

namespace {

template <typename T>
void run(int64_t op, const AvgPool2dParams& a, int64_t split, FILE* out) {
  using A = typename AccType<T>::type;
  auto in = read_tensor<T>(true), res = read_tensor<T>(false);
  const Pool2dParams& p = a.p;
  if (op == 0) {
    const int64_t total = p.N * p.C * p.OH * p.OW;
    const bool cl = channels_fastest(res.s);  // as the launcher picks
    for (int64_t i = 0; i < total; ++i) {
      if (cl)
        forward_element<T, true>(a, in.data(), in.s, res.data(), res.s, i);
      else
        forward_element<T, false>(a, in.data(), in.s, res.data(), res.s, i);
    }
  } else if (op == 1) {
    if (!is_global(a)) die("op 1 needs a global pooling");
    for (int64_t plane = 0; plane < p.N * p.C; ++plane) {
      A acc = A(0);
      for (int64_t lane = 0; lane < split; ++lane)
        acc += global_partial<T>(a, in.data(), in.s, plane, lane, split);
      global_store<T>(a, acc, plane, res.data(), res.s);
    }
  } else if (op == 2) {
    const int64_t total = p.N * p.C * p.H * p.W;
    const bool cl = channels_fastest(res.s);
    for (int64_t i = 0; i < total; ++i) {
      if (cl)
        backward_element<T, true>(a, in.data(), in.s, res.data(), res.s, i);
      else
        backward_element<T, false>(a, in.data(), in.s, res.data(), res.s, i);
    }
  } else {
    die("unknown op");
  }
  write_output(res, out);
}

}  // namespace

int main(int argc, char** argv) {
  return harness_main(argc, argv, [](int64_t op, FILE* out) {
    const int64_t dtype = read_i64(), split = read_i64();
    if (split < 1) die("split < 1");
    AvgPool2dParams a{};
    Pool2dParams& p = a.p;
    for (int64_t* f : {&p.N, &p.C, &p.H, &p.W, &p.OH, &p.OW, &p.KH, &p.KW, &p.SH, &p.SW, &p.PH,
                       &p.PW, &p.DH, &p.DW})
      *f = read_i64();
    a.adaptive = read_i64() != 0;
    a.count_include_pad = read_i64() != 0;
    a.divisor = read_i64();
    switch (dtype) {
      case int64_t(DType::F32): run<float>(op, a, split, out); break;
      case int64_t(DType::F64): run<double>(op, a, split, out); break;
      case int64_t(DType::F16): run<__half>(op, a, split, out); break;
      case int64_t(DType::BF16): run<__nv_bfloat16>(op, a, split, out); break;
      default: die("unknown dtype");
    }
  });
}
