// Implicit-GEMM conv2d on CUDA (csrc/cuda/conv2d_igemm.cu; the kernels are in
// conv2d_igemm_kernels.cuh): the GEMM a convolution is,
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

// ---- weight gradient: per group g,
//   gw[g*Og + o][col] = sum over k of gy[n, g*Og + o, oh, ow] * x[n, g*Cg + c, ih, iw]
//   m = o (Og rows), col = (c, kh, kw) (kw fastest: gw's own layout), k = (n, oh, ow),
//   (ih, iw) = conv_in_coord of (oh, ow) through (kh, kw); 0 where that is padding.
// The K = N * OH * OW sum is long and the GEMM small, so it is split in `splits` runs of
// `tiles_per_split` k tiles (grid z = G * splits); each writes its float partial sums to
// a workspace (splits, G * Og, Ncol) and a second kernel adds the splits in order.
struct IgemmWgradProblem {
  int64_t M, Ncol, K, G;   // Og, Cg * KH * KW, N * OH * OW, groups
  int64_t N, OH, OW, Cg, Og, H, W;
  int64_t KH, KW, SH, SW, PH, PW, DH, DW;
  Strides4 gys, xs;        // grad_output (N, O, OH, OW), input (N, C, H, W)
  bool a_m_fast;           // copy A (grad_output) row-fast: when it is channels-last
  int64_t splits, tiles_per_split;
};

// k tile depth of the weight-gradient kernel for an element type of `elem_bytes`.
CNNEXT_HD int64_t igemm_wgrad_bk(int64_t elem_bytes) { return elem_bytes == 4 ? 16 : 32; }

// The problem, split so that the grid has about `target_blocks` blocks (at most 64
// splits, at least one k tile each).
inline IgemmWgradProblem igemm_wgrad_problem(const Conv2dParams& p, const Strides4& gys,
                                             const Strides4& xs, int64_t elem_bytes,
                                             int64_t target_blocks) {
  IgemmWgradProblem q{};
  q.G = p.G; q.Og = p.out_per_group(); q.Cg = p.in_per_group();
  q.M = q.Og; q.Ncol = q.Cg * p.KH * p.KW; q.K = p.N * p.OH * p.OW;
  q.N = p.N; q.OH = p.OH; q.OW = p.OW; q.H = p.H; q.W = p.W;
  q.KH = p.KH; q.KW = p.KW; q.SH = p.SH; q.SW = p.SW;
  q.PH = p.PH; q.PW = p.PW; q.DH = p.DH; q.DW = p.DW;
  q.gys = gys; q.xs = xs;
  q.a_m_fast = igemm_channels_fastest(gys);
  const int64_t bk = igemm_wgrad_bk(elem_bytes);
  const int64_t tiles = (q.K + bk - 1) / bk;
  const int64_t base = ((q.M + 127) / 128) * ((q.Ncol + 127) / 128) * q.G;
  int64_t s = base > 0 ? (target_blocks + base - 1) / base : 1;
  if (s > 64) s = 64;
  if (s > tiles) s = tiles;
  if (s < 1) s = 1;
  q.tiles_per_split = tiles > 0 ? (tiles + s - 1) / s : 0;
  q.splits = q.tiles_per_split > 0 ? (tiles + q.tiles_per_split - 1) / q.tiles_per_split : 1;
  return q;
}

// k -> (n, oh, ow).
CNNEXT_HD void igemm_wgrad_k(const IgemmWgradProblem& q, int64_t k, int64_t* n, int64_t* oh,
                             int64_t* ow) {
  *ow = k % q.OW;
  k /= q.OW;
  *oh = k % q.OH;
  *n = k / q.OH;
}

// col -> (c, kh, kw).
CNNEXT_HD void igemm_wgrad_col(const IgemmWgradProblem& q, int64_t col, int64_t* c, int64_t* kh,
                               int64_t* kw) {
  *kw = col % q.KW;
  col /= q.KW;
  *kh = col % q.KH;
  *c = col / q.KH;
}

// Offset of A[o][k] = grad_output[n, g*Og + o, oh, ow].
CNNEXT_HD int64_t igemm_wgrad_a_offset(const IgemmWgradProblem& q, int64_t g, int64_t o,
                                       int64_t n, int64_t oh, int64_t ow) {
  return n * q.gys.n + (g * q.Og + o) * q.gys.c + oh * q.gys.h + ow * q.gys.w;
}

// Offset of B[k][col] = input[n, g*Cg + c, ih, iw]; -1 in the padding.
CNNEXT_HD int64_t igemm_wgrad_b_offset(const IgemmWgradProblem& q, int64_t g, int64_t c,
                                       int64_t kh, int64_t kw, int64_t n, int64_t oh, int64_t ow) {
  const int64_t ih = conv_in_coord(oh, kh, q.SH, q.PH, q.DH);
  const int64_t iw = conv_in_coord(ow, kw, q.SW, q.PW, q.DW);
  if (ih < 0 || ih >= q.H || iw < 0 || iw >= q.W) return -1;
  return n * q.xs.n + (g * q.Cg + c) * q.xs.c + ih * q.xs.h + iw * q.xs.w;
}

// Floats of workspace conv2d_igemm_wgrad needs.
CNNEXT_HD int64_t igemm_wgrad_workspace(const IgemmWgradProblem& q) {
  return q.splits * q.G * q.M * q.Ncol;
}

// Blocks that fill the current device about twice (2 x its multiprocessors).
int64_t igemm_target_blocks();

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
//
// With `stats` (forward, for conv_bn_relu2d's training path) the epilogue also writes the
// batch-norm statistics of each 128-row tile of every channel of the stored output,
// (count, mean, M2) as floats: igemm_stats_floats(q) of them; igemm_stats_finish then
// combines the tiles into each channel's mean and biased variance (float, contiguous
// (G * Ncol,)), so the output is not read again for them.
cudaError_t conv2d_igemm(const IgemmProblem& q, DType dt, IgemmF32Math math, const void* a,
                         const void* b, const void* bias, void* c, cudaStream_t stream,
                         float* stats = nullptr);
int64_t igemm_stats_floats(const IgemmProblem& q);
cudaError_t igemm_stats_finish(const IgemmProblem& q, const float* stats, float* mean, float* var,
                               cudaStream_t stream);

bool igemm_wgrad_supported(const IgemmWgradProblem& q, DType dt);
bool igemm_wgrad_profitable(const IgemmWgradProblem& q);

// gw, contiguous (O, C / G, KH, KW) = the weight gradient; workspace: at least
// igemm_wgrad_workspace(q) floats. Writes every element of gw (zeros when K == 0).
cudaError_t conv2d_igemm_wgrad(const IgemmWgradProblem& q, DType dt, IgemmF32Math math,
                               const void* gy, const void* x, float* workspace, void* gw,
                               cudaStream_t stream);

}  // namespace kernels
}  // namespace cuda
}  // namespace cnnext
