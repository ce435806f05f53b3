// The bfloat16 forward GEMM's micro-kernel alone (csrc/cpu/conv2d_bf16.cpp's micro_kernel:
// an MR x 32 tile of float accumulators, per K pair two 32-pixel B loads and MR A pairs
// broadcast), on data that stays in cache, in G vdpbf16ps a second: how close the tile runs
// to the instruction's throughput, and what other tile heights and broadcast forms give.
// Not part of the extension, no torch needed:
//
//   g++ -O3 -o /tmp/bf16_dp benchmarks/bf16_dp_throughput.cpp && /tmp/bf16_dp 1152 384
//
// arguments: K pairs (AlexNet's 256 -> 384 3x3: 1152; ResNet's 64 -> 64: 288) and output
// channels (the A panels run over one B panel, as the forward does). Best of 30 runs.
// Variants: "vpb" (vpbroadcastd, then two vdpbf16ps: the extension's), "emb" (the pair
// broadcast embedded in each vdpbf16ps's memory operand, {1to16}); and the direct kernels'
// tile (output channels in the lanes: NP pixels x V vectors of 16 channels, per K pair V
// weight loads and NP input pairs broadcast from rows 16 dwords apart, each feeding V
// vdpbf16ps), "dir NPxV".
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma")))

TARGET inline __m512 dp_embedded(__m512 acc, __m512bh b, const uint32_t* a) {
  asm("vdpbf16ps %[a]%{1to16%}, %[b], %[acc]" : [acc] "+v"(acc) : [b] "v"(b), [a] "m"(*a));
  return acc;
}

template <int MR, bool kEmbedded>
TARGET __attribute__((noinline)) void tile(const uint32_t* a, const uint16_t* b, int64_t Kp, float* c) {
  __m512 acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < Kp; ++kp) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + kp * 64);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + kp * 64 + 32);
    const uint32_t* ak = a + kp * MR;
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      if (kEmbedded) {
        acc[i][0] = dp_embedded(acc[i][0], b0, ak + i);
        acc[i][1] = dp_embedded(acc[i][1], b1, ak + i);
      } else {
        const __m512bh ai = (__m512bh)_mm512_set1_epi32(static_cast<int>(ak[i]));
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], ai, b0);
        acc[i][1] = _mm512_dpbf16_ps(acc[i][1], ai, b1);
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    _mm512_storeu_ps(c + i * 32, acc[i][0]);
    _mm512_storeu_ps(c + i * 32 + 16, acc[i][1]);
  }
}

template <int NP, int V>
TARGET __attribute__((noinline)) void dir_tile(const uint32_t* x, const uint32_t* w, int64_t Kp, float* c) {
  __m512 acc[NP][V];
  for (int j = 0; j < NP; ++j)
    for (int v = 0; v < V; ++v) acc[j][v] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < Kp; ++kp, x += 16, w += 16 * V) {
    __m512bh wv[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) wv[v] = (__m512bh)_mm512_loadu_si512(w + 16 * v);
#pragma GCC unroll 16
    for (int j = 0; j < NP; ++j) {
      const __m512bh b = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[j]));
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[j][v] = _mm512_dpbf16_ps(acc[j][v], b, wv[v]);
    }
  }
  for (int j = 0; j < NP; ++j)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(c + (j * V + v) * 16, acc[j][v]);
}

template <int NP, int V>
double dir_rate(int64_t Kp) {
  std::vector<uint32_t> x(static_cast<size_t>(Kp * 16 + 16)), w(static_cast<size_t>(Kp * 16 * V));
  for (auto& v : x) v = (static_cast<uint32_t>(rand()) & 0x007f007fu) | 0x3f803f80u;
  for (auto& v : w) v = (static_cast<uint32_t>(rand()) & 0x007f007fu) | 0x3f803f80u;
  std::vector<float> c(NP * V * 16);
  double best = 1e30;
  for (int rep = 0; rep < 30; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int it = 0; it < 50; ++it) dir_tile<NP, V>(x.data(), w.data(), Kp, c.data());
    const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (t < best) best = t;
  }
  return 50.0 * Kp * NP * V / best / 1e9;
}

template <int MR, bool kEmbedded>
double rate(int64_t Kp, int64_t rows) {
  const int64_t panels = rows / MR;
  std::vector<uint32_t> a(static_cast<size_t>(Kp * MR * panels));
  std::vector<uint16_t> b(static_cast<size_t>(Kp * 64), 0x3f80);
  std::vector<float> c(MR * 32);
  for (auto& v : a) v = (static_cast<uint32_t>(rand()) & 0x007f007fu) | 0x3f803f80u;
  double best = 1e30;
  for (int rep = 0; rep < 30; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t op = 0; op < panels; ++op) tile<MR, kEmbedded>(a.data() + op * Kp * MR, b.data(), Kp, c.data());
    const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (t < best) best = t;
  }
  return double(Kp) * MR * 2 * panels / best / 1e9;
}

int main(int argc, char** argv) {
  const int64_t Kp = argc > 1 ? atoll(argv[1]) : 1152, rows = argc > 2 ? atoll(argv[2]) : 384;
  std::printf("K pairs %lld, %lld rows: G vdpbf16ps/s  vpb MR8 %.2f  vpb MR12 %.2f  emb MR8 %.2f  emb MR12 %.2f\n",
              static_cast<long long>(Kp), static_cast<long long>(rows), rate<8, false>(Kp, rows),
              rate<12, false>(Kp, rows), rate<8, true>(Kp, rows), rate<12, true>(Kp, rows));
  std::printf("K pairs %lld: G vdpbf16ps/s  dir 7x4 %.2f  dir 6x4 %.2f  dir 14x2 %.2f  dir 4x6 %.2f  dir 3x8 %.2f\n",
              static_cast<long long>(Kp), dir_rate<7, 4>(Kp), dir_rate<6, 4>(Kp), dir_rate<14, 2>(Kp),
              dir_rate<4, 6>(Kp), dir_rate<3, 8>(Kp));
}
