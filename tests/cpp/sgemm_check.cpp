// Checks cnnext's packed sgemm (csrc/cpu/sgemm.cpp) against a plain triple loop on
// integer-valued inputs, where every result is exact: prints one line per case,
// "M N K accumulate bias relu maxerr", after a first line naming the kernel gemm() runs:
// avx512 (sgemm::available()), avx2 (AVX2 + FMA, no AVX-512F) or plain (neither, or a
// build with CNNEXT_NO_AVX512). Built by tests/test_sgemm.py with and without
// CNNEXT_NO_AVX512 and run under CNNEXT_CPU_ISA caps, so each kernel this CPU has runs.
// The other entry points (gemm_rows, gemm_arows, gemm_small_n) are AVX-512 only: their
// callers check available(), and this check calls them nowhere.
#include <cmath>
#include <cstdio>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/sgemm.h"

using namespace cnnext::cpu::sgemm;

int main() {
  const int sizes[][3] = {{1, 1, 1}, {12, 32, 1}, {13, 37, 29}, {11, 31, 300}, {64, 448, 576}, {25, 17, 513},
                          {2, 48, 3}, {3, 9, 7}, {5, 40, 17}, {9, 16, 400}, {8, 33, 385}};
  // (pack_a's row-major blocks: 8 rows x 16 k, with partial panels and K tails above.)
#ifdef CNNEXT_NO_AVX512
  const char* kernel = "plain";
#else
  const char* kernel = available() ? "avx512" : cnnext::cpu::cpu_features().avx2_fma() ? "avx2" : "plain";
#endif
  std::printf("kernel=%s\n", kernel);
  for (const auto& s : sizes) {
    const int M = s[0], N = s[1], K = s[2];
    for (int accumulate = 0; accumulate < 2; ++accumulate) {
      for (int with_bias = 0; with_bias < 2; ++with_bias) {
       for (int relu = 0; relu < 2; ++relu) {
        std::vector<float> a(M * K), b(K * N), bias(M), c(M * N), before(M * N);
        for (int i = 0; i < M * K; ++i) a[i] = float(i * 7 % 11 - 5);
        for (int i = 0; i < K * N; ++i) b[i] = float(i * 5 % 13 - 6);
        for (int i = 0; i < M; ++i) bias[i] = float(i % 5 - 2);
        for (int i = 0; i < M * N; ++i) before[i] = c[i] = float(i % 3);
        // A read transposed (column-major) to exercise pack_a's strides.
        std::vector<float> at(K * M);
        for (int i = 0; i < M; ++i)
          for (int k = 0; k < K; ++k) at[k * M + i] = a[i * K + k];
        std::vector<float> ap(packed_a_size(M, K)), bp(packed_b_size(K, N));
        pack_a(at.data(), 1, M, M, K, ap.data());
        // The same A read row-major (rows contiguous: pack_a's vector transposes) must pack
        // to the same panels.
        std::vector<float> ap_rows(packed_a_size(M, K));
        pack_a(a.data(), K, 1, M, K, ap_rows.data());
        const bool same_pack = ap_rows == ap;
        pack_b(b.data(), N, 1, K, N, bp.data());
        gemm(ap.data(), bp.data(), M, N, K, c.data(), N, accumulate, with_bias ? bias.data() : nullptr, relu);
        double err = 0;
        for (int i = 0; i < M; ++i)
          for (int j = 0; j < N; ++j) {
            double want = accumulate ? before[i * N + j] : (with_bias ? bias[i] : 0.0);
            for (int k = 0; k < K; ++k) want += double(a[i * K + k]) * b[k * N + j];
            if (relu && want < 0) want = 0;
            err = std::fmax(err, std::fabs(want - c[i * N + j]));
          }
        if (!same_pack) err = 1e30;
        std::printf("%d %d %d %d %d %d %g\n", M, N, K, accumulate, with_bias, relu, err);
       }
      }
    }
  }
  return 0;
}
