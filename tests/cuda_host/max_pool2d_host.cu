// Runs the per-element bodies of the CUDA max-pooling kernels on the host, without a
// GPU, for tests/test_max_pool2d_cuda_host.py. It includes csrc/cuda/max_pool2d.cu
// itself, so it calls the very __host__ __device__ functions the kernels loop around:
// max_pool_forward_element, max_pool_backward_element, gather_element and
// unpool_element. No torch headers; build with
//   nvcc -std=c++17 -Icsrc -o max_pool2d_host tests/cuda_host/max_pool2d_host.cu
// and run as `max_pool2d_host IN OUT`.
//
// IN is a sequence of records; every integer is a little-endian int64.
//   op      0 forward, 1 backward (gather), 2 gather_planes, 3 max_unpool2d
//   dtype   DType: 0 F32, 1 F64, 2 F16, 3 BF16
//   flag    op 2: 1 = with the pooling windows (windows without taps give zero)
//   the 14 fields of Pool2dParams, in declaration order. Op 2 reads src (N, C, H, W)
//   and idx / out (N, C, OH, OW); op 3 reads x / idx (N, C, H, W), out (N, C, OH, OW).
//   the op's tensors, each as: strides (n, c, h, w), span, then span elements for an
//   input (none for an output). Index tensors hold int64.
//     op 0: x, y, yi        op 1: gy, idx, gx
//     op 2: src, idx, out   op 3: x, idx, out (an input: the zeros the launcher expects)
// For each record OUT gets the outputs' span elements (op 0: y then yi), and for ops 2
// and 3 two int64: whether a bad index was met, and the last one met. Outputs start out
// all bits set (NaN in every float type, -1 as int64), so an element no call writes, or
// a gap of a strided output, comes back NaN / -1.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cuda/max_pool2d.cu"

using namespace cnnext;
using namespace cnnext::cuda::kernels;

#define CNNEXT_HOST_PROGRAM "max_pool2d_host"
#include "harness.h"

namespace {

void write_bad(bool any, int64_t value, FILE* out) {
  const int64_t v[2] = {any ? 1 : 0, value};
  if (std::fwrite(v, sizeof(int64_t), 2, out) != 2) die("write failed");
}

// The loops of the kernels, in sequence, picking the element order as the launchers do.
template <typename T>
void run(int64_t op, int64_t flag, const Pool2dParams& p, FILE* out) {
  if (op == 0) {
    auto x = read_tensor<T>(true);
    auto y = read_tensor<T>(false);
    auto yi = read_tensor<int64_t>(false);
    const int64_t total = p.N * p.C * p.OH * p.OW;
    const bool cl = channels_fastest_mp(y.s);
    for (int64_t i = 0; i < total; ++i) {
      if (cl)
        max_pool_forward_element<T, true>(p, x.data(), x.s, y.data(), y.s, yi.data(), yi.s, i);
      else
        max_pool_forward_element<T, false>(p, x.data(), x.s, y.data(), y.s, yi.data(), yi.s, i);
    }
    write_output(y, out);
    write_output(yi, out);
  } else if (op == 1) {
    auto gy = read_tensor<T>(true);
    auto idx = read_tensor<int64_t>(true);
    auto gx = read_tensor<T>(false);
    const int64_t total = p.N * p.C * p.H * p.W;
    const bool cl = channels_fastest_mp(gx.s);
    for (int64_t i = 0; i < total; ++i) {
      if (cl)
        max_pool_backward_element<T, true>(p, gy.data(), gy.s, idx.data(), idx.s, gx.data(), gx.s, i);
      else
        max_pool_backward_element<T, false>(p, gy.data(), gy.s, idx.data(), idx.s, gx.data(), gx.s, i);
    }
    write_output(gx, out);
  } else if (op == 2) {
    auto src = read_tensor<T>(true);
    auto idx = read_tensor<int64_t>(true);
    auto o = read_tensor<T>(false);
    const int64_t total = p.N * p.C * p.OH * p.OW;
    const bool cl = channels_fastest_mp(o.s);
    const Pool2dParams* pool = flag ? &p : nullptr;
    bool any = false;
    int64_t last = 0;
    for (int64_t i = 0; i < total; ++i) {
      int64_t v = 0;
      const bool ok = cl ? gather_element<T, true>(pool, src.data(), src.s, p.H, p.W, idx.data(),
                                                   idx.s, p.C, p.OH, p.OW, o.data(), o.s, i, &v)
                         : gather_element<T, false>(pool, src.data(), src.s, p.H, p.W, idx.data(),
                                                    idx.s, p.C, p.OH, p.OW, o.data(), o.s, i, &v);
      if (!ok) {
        any = true;
        last = v;
      }
    }
    write_output(o, out);
    write_bad(any, last, out);
  } else if (op == 3) {
    auto x = read_tensor<T>(true);
    auto idx = read_tensor<int64_t>(true);
    auto o = read_tensor<T>(true);
    bool any = false;
    int64_t last = 0;
    const int64_t total = p.N * p.C * p.H * p.W;
    if (p.OH * p.OW > 0)  // as the launcher: nothing to do for an empty output plane
      for (int64_t i = 0; i < total; ++i) {
        int64_t v = 0;
        if (!unpool_element<T>(x.data(), x.s, idx.data(), idx.s, p.C, p.H, p.W, o.data(), o.s,
                               p.OH, p.OW, i, &v)) {
          any = true;
          last = v;
        }
      }
    write_output(o, out);
    write_bad(any, last, out);
  } else {
    die("unknown op");
  }
}

}  // namespace

int main(int argc, char** argv) {
  return harness_main(argc, argv, [](int64_t op, FILE* out) {
    const int64_t dtype = read_i64(), flag = read_i64();
    Pool2dParams p;
    for (int64_t* f : {&p.N, &p.C, &p.H, &p.W, &p.OH, &p.OW, &p.KH, &p.KW, &p.SH, &p.SW, &p.PH,
                       &p.PW, &p.DH, &p.DW})
      *f = read_i64();
    switch (dtype) {
      case int64_t(DType::F32): run<float>(op, flag, p, out); break;
      case int64_t(DType::F64): run<double>(op, flag, p, out); break;
      case int64_t(DType::F16): run<__half>(op, flag, p, out); break;
      case int64_t(DType::BF16): run<__nv_bfloat16>(op, flag, p, out); break;
      default: die("unknown dtype");
    }
  });
}
