// Our single-precision GEMM for the CPU convolution: packed panels and an AVX-512
// micro-kernel, used where the CPU has AVX-512F (checked at run time); elsewhere
// the convolution multiplies with at::mm, but for Winograd's element-wise stage, which
// runs gemm() on an AVX2 micro-kernel.
//
// Packed layouts (zero-padded to whole panels):
//   A (M x K) in panels of kMR rows:    a[(i / kMR) * K * kMR + k * kMR + i % kMR]
//   B (K x N) in panels of kNR columns: b[(j / kNR) * K * kNR + k * kNR + j % kNR]
#pragma once

#include <cstdint>

namespace cnnext {
namespace cpu {
namespace sgemm {

constexpr int64_t kMR = 8;
constexpr int64_t kNR = 32;

inline int64_t packed_a_size(int64_t M, int64_t K) { return (M + kMR - 1) / kMR * kMR * K; }
inline int64_t packed_b_size(int64_t K, int64_t N) { return (N + kNR - 1) / kNR * kNR * K; }

// Whether this CPU runs the AVX-512 micro-kernel (AVX-512F + FMA): every entry point below
// but gemm() may be called only then. gemm() runs anywhere: the AVX-512 micro-kernel, an
// AVX2 one (AVX2 + FMA: the same panels in 6 x 16 tiles, path sgemm.gemm_avx2) or plain
// loops.
bool available();

// dst[k * ld + i] = src[i * cs + k] for i, k in [0, 16): one 16 x 16 transpose (AVX-512).
// Returns false (and does nothing) where the CPU or the build has no AVX-512.
bool transpose16(const float* src, int64_t cs, float* dst, int64_t ld);

// Packs A (M x K), element (i, k) at a[i * rs + k * cs].
void pack_a(const float* a, int64_t rs, int64_t cs, int64_t M, int64_t K, float* out);

// Packs B (K x N), element (k, j) at b[k * rs + j * cs].
void pack_b(const float* b, int64_t rs, int64_t cs, int64_t K, int64_t N, float* out);

// C (M x N, element (i, j) at c[i * ldc + j]) = A_packed * B_packed, plus, when
// `accumulate`, the C it had, plus, when `bias` is given, bias[i] on row i; then, when
// `relu`, max(., 0) (applied as the final values are stored, after every K block).
void gemm(const float* a_packed, const float* b_packed, int64_t M, int64_t N, int64_t K,
          float* c, int64_t ldc, bool accumulate, const float* bias, bool relu = false);

// As gemm (without accumulate), but B read in place: element (k, j) at b[off[k] + j]. The
// micro-kernel reads whole panels: b[off[k] + j] must be readable for j up to N rounded
// up to kNR (the extra columns are computed and not stored).
void gemm_rows(const float* a_packed, const float* b, const int64_t* off, int64_t M, int64_t N,
               int64_t K, float* c, int64_t ldc, const float* bias, bool relu = false);

// C (M x N) (+)= A * B_packed with A read in place: element (i, k) at a[a_off[i] + k].
void gemm_arows(const float* a, const int64_t* a_off, const float* b_packed, int64_t M,
                int64_t N, int64_t K, float* c, int64_t ldc, bool accumulate);

// Few columns, nothing packed: C (M x N, element (i, j) at c[i * ldc + j]) = A * B (+ bias[i]
// on row i, then max(., 0) when `relu`), A read in place (element (i, k) at a[i * lda + k],
// a weight's rows), B row-major (element (k, j) at b[k * ldb + j]). Tiles of kMR rows by up
// to kSmallNR columns; ldb a multiple of 16 and at least N rounded up to 16, the columns past
// N readable (computed and not stored). For a GEMM whose N (output positions) is a few
// dozen: packing A would cost about as much as multiplying it once.
constexpr int64_t kSmallNR = 48;
void gemm_small_n(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t M, int64_t N,
                  int64_t K, float* c, int64_t ldc, const float* bias, bool relu = false);

}  // namespace sgemm
}  // namespace cpu
}  // namespace cnnext
