// Runs the per-element bodies of the CUDA conv2d kernels on the host, without a GPU,
// for tests/test_conv2d_cuda_host.py. It includes csrc/cuda/conv2d.cu itself, so
// it calls the very __host__ __device__ functions the kernels loop around:
// forward_element, input_backward_element, weight_backward_partial and
// channel_sum_partial. No torch headers; build with
//   nvcc -std=c++17 -Icsrc -o conv2d_host tests/cuda_host/conv2d_host.cu
// and run as `conv2d_host IN OUT`.
//
// IN is a sequence of records; every integer is a little-endian int64.
//   op      0 forward, 1 input backward, 2 weight backward, 3 channel_sum
//   dtype   DType: 0 F32, 1 F64, 2 F16, 3 BF16
//   split   the reductions (ops 2, 3) add `split` partial sums, partial j0 taking terms
//           j0, j0 + split, ... (a block of the kernel has kThreads of them)
//   the 16 fields of Conv2dParams, in declaration order (channel_sum reads N, C, H, W)
//   the op's tensors, each as: strides (n, c, h, w), span, then span elements for an
//   input (none for the output). span is the number of elements from element
//   (0, 0, 0, 0) to the last one; 0 for an empty tensor or an absent bias.
//     op 0: x, w, bias, y        op 1: gy, w, gx
//     op 2: gy, x, gw            op 3: t, out
// For each record OUT gets the output's span elements. Outputs start out NaN, so an
// element no call writes, or a gap of a strided output, comes back NaN.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cuda/conv2d.cu"

using namespace cnnext;
using namespace cnnext::cuda::kernels;

#define CNNEXT_HOST_PROGRAM "conv2d_host"
#include "harness.h"

namespace {

// The loops of the kernels, in sequence: every element index once, every partial sum
// of a reduction added in order (block_sum's tree order is device-only).
template <typename T>
void run(int64_t op, const Conv2dParams& p, int64_t split, FILE* out) {
  using A = typename AccType<T>::type;
  if (op == 0) {
    auto x = read_tensor<T>(true), w = read_tensor<T>(true), b = read_tensor<T>(true);
    auto y = read_tensor<T>(false);
    const int64_t total = p.N * p.O * p.OH * p.OW;
    const bool cl = channels_fastest(y.s);  // as the launcher picks
    for (int64_t i = 0; i < total; ++i) {
      if (cl)
        forward_element<T, true>(p, x.data(), x.s, w.data(), b.data_or_null(), y.data(), y.s, i);
      else
        forward_element<T, false>(p, x.data(), x.s, w.data(), b.data_or_null(), y.data(), y.s, i);
    }
    write_output(y, out);
  } else if (op == 1) {
    auto gy = read_tensor<T>(true), w = read_tensor<T>(true), gx = read_tensor<T>(false);
    const int64_t total = p.N * p.C * p.H * p.W;
    const bool cl = channels_fastest(gx.s);
    for (int64_t i = 0; i < total; ++i) {
      if (cl)
        input_backward_element<T, true>(p, gy.data(), gy.s, w.data(), gx.data(), gx.s, i);
      else
        input_backward_element<T, false>(p, gy.data(), gy.s, w.data(), gx.data(), gx.s, i);
    }
    write_output(gx, out);
  } else if (op == 2) {
    auto gy = read_tensor<T>(true), x = read_tensor<T>(true), gw = read_tensor<T>(false);
    const int64_t total = p.O * p.in_per_group() * p.KH * p.KW;
    for (int64_t e = 0; e < total; ++e) {
      A acc = A(0);
      for (int64_t j0 = 0; j0 < split; ++j0)
        acc += weight_backward_partial<T>(p, gy.data(), gy.s, x.data(), x.s, e, j0, split);
      gw.data()[e] = AccType<T>::from(acc);
    }
    write_output(gw, out);
  } else if (op == 3) {
    auto t = read_tensor<T>(true), sums = read_tensor<T>(false);
    for (int64_t c = 0; c < p.C; ++c) {
      A acc = A(0);
      for (int64_t j0 = 0; j0 < split; ++j0)
        acc += channel_sum_partial<T>(t.data(), p.N, p.H, p.W, t.s, c, j0, split);
      sums.data()[c] = AccType<T>::from(acc);
    }
    write_output(sums, out);
  } else {
    die("unknown op");
  }
}

}  // namespace

int main(int argc, char** argv) {
  return harness_main(argc, argv, [](int64_t op, FILE* out) {
    const int64_t dtype = read_i64(), split = read_i64();
    if (split < 1) die("split < 1");
    Conv2dParams p;
    for (int64_t* f : {&p.N, &p.C, &p.H, &p.W, &p.O, &p.KH, &p.KW, &p.OH, &p.OW, &p.SH, &p.SW,
                       &p.PH, &p.PW, &p.DH, &p.DW, &p.G})
      *f = read_i64();
    switch (dtype) {
      case int64_t(DType::F32): run<float>(op, p, split, out); break;
      case int64_t(DType::F64): run<double>(op, p, split, out); break;
      case int64_t(DType::F16): run<__half>(op, p, split, out); break;
      case int64_t(DType::BF16): run<__nv_bfloat16>(op, p, split, out); break;
      default: die("unknown dtype");
    }
  });
}
