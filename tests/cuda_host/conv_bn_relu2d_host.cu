// Runs the per-element bodies of the CUDA conv_bn_relu2d kernels on the host, without a
// GPU, for tests/test_conv_bn_relu_cuda_host.py. It includes csrc/cuda/conv_bn_relu2d.cu
// itself, so it calls the very __host__ __device__ functions the kernels loop around:
// bn_moment_partial, bn_normalize_element, bn_backward_partial, bn_backward_element.
// No torch headers; build with
//   nvcc -std=c++17 -Icsrc -o conv_bn_relu2d_host tests/cuda_host/conv_bn_relu2d_host.cu
// and run as `conv_bn_relu2d_host IN OUT`.
//
// IN is a sequence of records: int64 dtype (DType), N, C, H, W, channels_last (0/1),
// relu (0/1), affine (0/1), split (partial sums per reduction, as a block's threads); a
// float64 eps; then float64 arrays (values exactly representable in the dtype): y and g
// (N * C * H * W each, dense in the layout), gamma and beta (C each). For each record OUT
// gets float64 arrays: mean, var (C each), out (N * C * H * W), sums (2 * C), dy
// (N * C * H * W). The mask of the backward is the program's own out, as on the GPU.
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda/conv_bn_relu2d.cu"

using namespace cnnext;
using namespace cnnext::cuda::kernels;

namespace {

FILE* g_in;
FILE* g_out;

[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "conv_bn_relu2d_host: %s\n", what);
  std::exit(2);
}

int64_t read_i64() {
  int64_t v;
  if (std::fread(&v, sizeof v, 1, g_in) != 1) die("truncated input");
  return v;
}

std::vector<double> read_f64(int64_t n) {
  std::vector<double> v(n);
  if (n > 0 && std::fread(v.data(), sizeof(double), n, g_in) != size_t(n)) die("truncated input");
  return v;
}

void write_f64(const std::vector<double>& v) {
  if (!v.empty() && std::fwrite(v.data(), sizeof(double), v.size(), g_out) != v.size()) die("write failed");
}

template <typename T>
std::vector<T> to_t(const std::vector<double>& v) {
  using Acc = AccType<T>;
  std::vector<T> r;
  r.reserve(v.size());
  for (double x : v) r.push_back(Acc::from(static_cast<typename Acc::type>(x)));
  return r;
}

template <typename T>
std::vector<double> to_f64(const T* p, int64_t n) {
  std::vector<double> r(n);
  for (int64_t i = 0; i < n; ++i) r[i] = static_cast<double>(AccType<T>::to(p[i]));
  return r;
}

template <typename T>
void run(int64_t N, int64_t C, int64_t H, int64_t W, bool cl, bool relu, bool affine, int64_t split,
         double eps) {
  using Acc = AccType<T>;
  using A = typename Acc::type;
  const int64_t total = N * C * H * W;
  const Strides4 s = cl ? Strides4{H * W * C, 1, W * C, C} : Strides4{C * H * W, H * W, W, 1};
  const auto y = to_t<T>(read_f64(total)), g = to_t<T>(read_f64(total));
  const auto gamma = to_t<T>(read_f64(C)), beta = to_t<T>(read_f64(C));
  const T* gp = affine ? gamma.data() : nullptr;
  const T* bp = affine ? beta.data() : nullptr;
  // bn_batch_stats_kernel: per channel, the block's partial sums added in order.
  std::vector<A> mean(C), var(C);
  const A count = static_cast<A>(N * H * W);
  for (int64_t c = 0; c < C; ++c) {
    A s1 = A(0), s2 = A(0);
    for (int64_t j0 = 0; j0 < split; ++j0) s1 += bn_moment_partial<T>(y.data(), N, H, W, s, c, A(0), 1, j0, split);
    mean[c] = s1 / count;
    for (int64_t j0 = 0; j0 < split; ++j0) s2 += bn_moment_partial<T>(y.data(), N, H, W, s, c, mean[c], 2, j0, split);
    var[c] = s2 / count;
  }
  std::vector<T> out(total);
  for (int64_t i = 0; i < total; ++i) {
    if (cl)
      bn_normalize_element<T, true>(y.data(), C, H, W, s, mean.data(), var.data(), gp, bp, eps, relu, out.data(), i);
    else
      bn_normalize_element<T, false>(y.data(), C, H, W, s, mean.data(), var.data(), gp, bp, eps, relu, out.data(), i);
  }
  const T* mask = relu ? out.data() : nullptr;
  std::vector<A> sums(2 * C);
  for (int64_t c = 0; c < C; ++c) {
    A sg = A(0), sgx = A(0);
    for (int64_t j0 = 0; j0 < split; ++j0) {
      A a, b;
      bn_backward_partial<T>(g.data(), mask, y.data(), N, H, W, s, c, mean[c], j0, split, &a, &b);
      sg += a;
      sgx += b;
    }
    sums[c] = sgx * inv_std(var[c], eps);
    sums[C + c] = sg;
  }
  std::vector<T> dy(total);
  for (int64_t i = 0; i < total; ++i) {
    if (cl)
      bn_backward_element<T, true>(g.data(), mask, y.data(), C, H, W, s, N * H * W, mean.data(), var.data(), gp,
                                   sums.data(), eps, dy.data(), i);
    else
      bn_backward_element<T, false>(g.data(), mask, y.data(), C, H, W, s, N * H * W, mean.data(), var.data(), gp,
                                    sums.data(), eps, dy.data(), i);
  }
  std::vector<double> m64(mean.begin(), mean.end()), v64(var.begin(), var.end()), s64(sums.begin(), sums.end());
  write_f64(m64);
  write_f64(v64);
  write_f64(to_f64(out.data(), total));
  write_f64(s64);
  write_f64(to_f64(dy.data(), total));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) die("usage: conv_bn_relu2d_host IN OUT");
  g_in = std::fopen(argv[1], "rb");
  g_out = std::fopen(argv[2], "wb");
  if (g_in == nullptr || g_out == nullptr) die("cannot open IN or OUT");
  int64_t dtype;
  while (std::fread(&dtype, sizeof dtype, 1, g_in) == 1) {
    const int64_t N = read_i64(), C = read_i64(), H = read_i64(), W = read_i64();
    const bool cl = read_i64() != 0, relu = read_i64() != 0, affine = read_i64() != 0;
    const int64_t split = read_i64();
    const double eps = read_f64(1)[0];
    if (split < 1) die("split < 1");
    switch (dtype) {
      case int64_t(DType::F32): run<float>(N, C, H, W, cl, relu, affine, split, eps); break;
      case int64_t(DType::F64): run<double>(N, C, H, W, cl, relu, affine, split, eps); break;
      case int64_t(DType::F16): run<__half>(N, C, H, W, cl, relu, affine, split, eps); break;
      case int64_t(DType::BF16): run<__nv_bfloat16>(N, C, H, W, cl, relu, affine, split, eps); break;
      default: die("unknown dtype");
    }
  }
  if (std::fclose(g_out) != 0) die("write failed");
  return 0;
}
