// Implicit-GEMM conv2d on CUDA (csrc/cuda/conv2d_igemm.cu): the GEMM a convolution is,
// its index math, and the launcher. Torch-free; included by the .cu (nvcc), by
// csrc/cuda/conv2d_launch.cpp (host compiler) and by the host harness
// tests/cuda_host/conv2d_igemm_host.cu, so every index function below is one
// __host__ __device__ definition that the CPU tests check.
//
// One problem shape serves two ops. Per group g (grid z):
//
//   C[m][col] = sum over k of A[m][k] * B[k][col]     (+ bias, then ReLU if asked)
//
//   forward          m = (n, oh, ow), col = output channel in the group, k = (c, kh, kw)
//                    A[m][k] = x[n, g*Cg + c, oh*S - P + kh*D, ...] (0 in the padding)
//   input backward   m = (n, ih, iw), col = input channel in the group,  k = (o, kh, kw)
//                    A[m][k] = grad_output[n, g*Og + o, oh, ow] where oh*S - P + kh*D == ih
//                    (0 when no such oh exists: between strides or outside the output)
//
// k is ordered (ch, kh, kw) (kw fastest) or, when the A tensor is channels-last,
// (kh, kw, ch) (ch fastest, so that consecutive k are consecutive in memory). B is
// always given k-contiguous in that order: B[k][col] = b[(g * Ncol + col) * K + k]; the
// torch side re-lays the (small) weight out so (conv2d_launch.cpp). No im2col buffer:
// A's elements are gathered straight from the strided input into shared memory.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/conv2d.h"
#include "launch.h"

namespace cnnext {
namespace cuda {
namespace kernels {

struct IgemmProblem {
  int64_t M, Ncol, K, G;    // GEMM sizes per group, and the number of groups
  int64_t N, P, Q;          // rows: m = (n * P + p) * Q + q
  int64_t a_ch, AH, AW;     // A tensor: channels per group, spatial size
  Strides4 as;              // A tensor (N, G * a_ch, AH, AW) strides
  int64_t KH, KW, SH, SW, PH, PW, DH, DW;
  bool transposed;          // input backward: A's coordinate is an output coordinate
  bool ch_fast;             // k = (kh * KW + kw) * a_ch + ch, else (ch * KH + kh) * KW + kw
  Strides4 cs;              // C tensor (N, G * Ncol, P, Q) strides
  bool relu;                // epilogue: max(value, 0) (NaN stays NaN)
};

// Whether the channel dimension is the innermost one of strides s (channels-last).
CNNEXT_HD bool igemm_channels_fastest(const Strides4& s) { return s.c < s.w && s.c < s.h; }

inline void igemm_fill_kernel(IgemmProblem* q, const Conv2dParams& p) {
  q->KH = p.KH; q->KW = p.KW; q->SH = p.SH; q->SW = p.SW;
  q->PH = p.PH; q->PW = p.PW; q->DH = p.DH; q->DW = p.DW;
  q->G = p.G;
}

// y (N, O, OH, OW) = x (N, C, H, W) (*) w.
inline IgemmProblem igemm_forward_problem(const Conv2dParams& p, const Strides4& xs,
                                          const Strides4& ys, bool relu) {
  IgemmProblem q{};
  igemm_fill_kernel(&q, p);
  q.a_ch = p.in_per_group();
  q.Ncol = p.out_per_group();
  q.K = q.a_ch * p.KH * p.KW;
  q.N = p.N; q.P = p.OH; q.Q = p.OW;
  q.M = p.N * p.OH * p.OW;
  q.AH = p.H; q.AW = p.W;
  q.as = xs;
  q.transposed = false;
  q.ch_fast = igemm_channels_fastest(xs);
  q.cs = ys;
  q.relu = relu;
  return q;
}

// grad_input (N, C, H, W) from grad_output (N, O, OH, OW) and w.
inline IgemmProblem igemm_input_backward_problem(const Conv2dParams& p, const Strides4& gys,
                                                 const Strides4& gxs) {
  IgemmProblem q{};
  igemm_fill_kernel(&q, p);
  q.a_ch = p.out_per_group();
  q.Ncol = p.in_per_group();
  q.K = q.a_ch * p.KH * p.KW;
  q.N = p.N; q.P = p.H; q.Q = p.W;
  q.M = p.N * p.H * p.W;
  q.AH = p.OH; q.AW = p.OW;
  q.as = gys;
  q.transposed = true;
  q.ch_fast = igemm_channels_fastest(gys);
  q.cs = gxs;
  q.relu = false;
  return q;
}

// GEMM row m -> (n, p, q) of the C tensor.
CNNEXT_HD void igemm_row(const IgemmProblem& q, int64_t m, int64_t* n, int64_t* p, int64_t* qq) {
  *qq = m % q.Q;
  m /= q.Q;
  *p = m % q.P;
  *n = m / q.P;
}

// GEMM k -> (ch, kh, kw) in the problem's k order.
CNNEXT_HD void igemm_k(const IgemmProblem& q, int64_t k, int64_t* ch, int64_t* kh, int64_t* kw) {
  if (q.ch_fast) {
    *ch = k % q.a_ch;
    k /= q.a_ch;
    *kw = k % q.KW;
    *kh = k / q.KW;
  } else {
    *kw = k % q.KW;
    k /= q.KW;
    *kh = k % q.KH;
    *ch = k / q.KH;
  }
}

// The A tensor's spatial coordinate (*a) read by C coordinate p through tap t, along
// one dimension; false when it is padding (forward) or no output reads it (backward).
CNNEXT_HD bool igemm_a_coord(bool transposed, int64_t p, int64_t t, int64_t s, int64_t pad,
                             int64_t d, int64_t size, int64_t* a) {
  if (transposed) return conv_out_coord(p, t, s, pad, d, size, a);
  *a = conv_in_coord(p, t, s, pad, d);
  return *a >= 0 && *a < size;
}

// Element offset of A[m][k] of group g, for the row (n, p, q) and k = (ch, kh, kw);
// -1 when the element is an implicit zero.
CNNEXT_HD int64_t igemm_a_offset(const IgemmProblem& q, int64_t g, int64_t n, int64_t p,
                                 int64_t qq, int64_t ch, int64_t kh, int64_t kw) {
  int64_t ah, aw;
  if (!igemm_a_coord(q.transposed, p, kh, q.SH, q.PH, q.DH, q.AH, &ah)) return -1;
  if (!igemm_a_coord(q.transposed, qq, kw, q.SW, q.PW, q.DW, q.AW, &aw)) return -1;
  return n * q.as.n + (g * q.a_ch + ch) * q.as.c + ah * q.as.h + aw * q.as.w;
}

// Element offset of B[k][col] of group g (B is k-contiguous).
CNNEXT_HD int64_t igemm_b_offset(const IgemmProblem& q, int64_t g, int64_t k, int64_t col) {
  return (g * q.Ncol + col) * q.K + k;
}

// Element offset of C[m][col] of group g, for the row (n, p, q).
CNNEXT_HD int64_t igemm_c_offset(const IgemmProblem& q, int64_t g, int64_t n, int64_t p,
                                 int64_t qq, int64_t col) {
  return n * q.cs.n + (g * q.Ncol + col) * q.cs.c + p * q.cs.h + qq * q.cs.w;
}

// Which kernel computes float32: strict fp32 FMA on the CUDA cores, or TF32 tensor
// cores (only when torch's flags allow TF32 for convolutions).
enum class IgemmF32Math { kStrict, kTF32 };

// Whether conv2d_igemm can run the problem: float32 / float16 / bfloat16 (float64
// stays on the direct kernels) and a grid that fits (Ncol tiles and G <= 65535).
bool igemm_supported(const IgemmProblem& q, DType dt);

// Whether the problem is large and wide enough that the tiles pay off (the torch side
// picks the direct kernels otherwise, unless told to force one path).
bool igemm_profitable(const IgemmProblem& q);

// C = A * B (+ bias[g * Ncol + col]) (then ReLU), every element of C written once, no
// atomics, a fixed summation order. a: the A tensor at element (0, 0, 0, 0); b: the
// k-contiguous B; bias: contiguous (G * Ncol,) or nullptr. Returns cudaSuccess without
// launching when C is empty, cudaErrorInvalidValue when !igemm_supported.
cudaError_t conv2d_igemm(const IgemmProblem& q, DType dt, IgemmF32Math math, const void* a,
                         const void* b, const void* bias, void* c, cudaStream_t stream);

}  // namespace kernels
}  // namespace cuda
}  // namespace cnnext
