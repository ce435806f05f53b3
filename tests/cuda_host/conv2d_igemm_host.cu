// Runs the implicit-GEMM conv2d kernel of csrc/cuda/conv2d_igemm_kernels.cuh on the host,
// without a GPU, for tests/test_conv2d_igemm_cuda_host.py. It includes that header and, for
// every block of the launch grid, calls the kernel's own __host__ __device__ pieces for
// each of its 256 threads in the kernel's order: init_thread, load_stage of stage 0,
// then per stage load_stage of the next stage into the other buffer, the stage compute,
// and at the end the epilogue. cp.async becomes a plain copy (the pieces' host branch);
// shared memory is poisoned (NaN) before each stage is copied in, so an element a
// stage leaves unwritten poisons the result. The tensor-core compute, which is
// warp-collective, is emulated here: ldmatrix from the 32 lane addresses the kernel
// computes (ldsm_a_rc, ldsm_b_rc) or the TF32 fragments it reads (tf32_a_rc,
// tf32_b_rc, operands rounded like cvt.rna.tf32.f32), then mma.sync per the fragment
// layouts of the PTX ISA (written out below independently of the kernel's helpers),
// accumulating in float. No torch headers; build with
//   nvcc -std=c++17 -Icsrc -o conv2d_igemm_host tests/cuda_host/conv2d_igemm_host.cu
// and run as `conv2d_igemm_host IN OUT`.
//
// IN is a sequence of records; every integer is a little-endian int64.
//   op      0 forward, 1 input backward, 2 weight backward, 3 forward with the batch-norm
//           statistics of its output (then OUT also gets mean and biased variance per
//           channel, float32, after the output)
//   dtype   DType: 0 F32, 2 F16, 3 BF16
//   math    float32 only: 0 strict (SIMT), 1 TF32 (tensor cores)
//   relu    forward only: 0 or 1
//   target_blocks  weight backward only: the grid size its split of K aims at
//   the 16 fields of Conv2dParams, in declaration order
//   the tensors, each as: strides (n, c, h, w), span, then span elements for an input
//   (none for the output). ops 0, 1: A (x or grad_output), B (the k-contiguous weight
//   the torch side passes: strides unused), bias (span 0: none), C (the output);
//   op 2: grad_output, x, grad_weight (contiguous).
// For each record OUT gets an int64 (ops 0, 1: the copy mapping the launcher picks,
// kMap*; op 2: the number of K splits), then the output's span elements. Outputs start
// out NaN; the weight gradient's split workspace too.
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "cuda/conv2d_igemm_kernels.cuh"

using namespace cnnext;
using namespace cnnext::cuda::kernels;
using namespace cnnext::cuda::kernels::igemm;

#define CNNEXT_HOST_PROGRAM "conv2d_igemm_host"
#include "harness.h"

namespace {

// cvt.rna.tf32.f32: round to 10 mantissa bits, to nearest, ties away from zero.
float tf32_round(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
  std::memcpy(&v, &u, 4);
  return v;
}

template <typename T>
float f(T v) { return AccType<T>::to(v); }

// mma.sync m16n8k{8,16} on the registers of the 32 lanes of a warp, per the PTX ISA
// fragment layouts (gid = lane / 4, tig = lane % 4):
//   A  element (row, k) is in lane (row % 8) * 4 + (k % KP) / EPR, register
//      (row / 8) + 2 * (k / KP), element k % EPR of the register;
//   B  element (k, col) is in lane col * 4 + (k % KP) / EPR, register k / KP;
//   C  register r of a lane is (gid + 8 * (r / 2), 2 * tig + r % 2);
// KP = 4, EPR = 1 for TF32 (k8); KP = 8, EPR = 2 for f16/bf16 (k16).
// a[lane][reg][elem], b[lane][reg][elem]; acc[lane][r] += sum over k, k in order.
template <int KSTEP>
void mma_emulate(const float (*a)[4][2], const float (*b)[2][2], float (*acc)[4]) {
  constexpr int KP = KSTEP / 2, EPR = KSTEP == 8 ? 1 : 2;
  for (int lane = 0; lane < 32; ++lane)
    for (int r = 0; r < 4; ++r) {
      const int row = lane / 4 + 8 * (r / 2), col = 2 * (lane % 4) + r % 2;
      float sum = 0.f;
      for (int k = 0; k < KSTEP; ++k) {
        const float av = a[(row % 8) * 4 + (k % KP) / EPR][(row / 8) + 2 * (k / KP)][k % EPR];
        const float bv = b[col * 4 + (k % KP) / EPR][k / KP][k % EPR];
        sum = fmaf(av, bv, sum);
      }
      acc[lane][r] += sum;
    }
}

// ldmatrix.x4 of 16-bit elements: lane l's address (row[l], col[l]) names a row of 8
// elements; matrix j is made of the rows of lanes 8j .. 8j + 7; lane l receives as
// register j the elements 2 (l % 4), 2 (l % 4) + 1 of matrix j's row l / 4.
template <typename T, int ROWS, int COLS>
void ldmatrix_x4_emulate(const T (&tile)[ROWS][COLS], const int* row, const int* col,
                         float (*out)[4][2] /* [lane][reg][elem] */) {
  for (int lane = 0; lane < 32; ++lane) {
    if (row[lane] < 0 || row[lane] >= ROWS || col[lane] < 0 || col[lane] + 8 > COLS)
      die("ldmatrix address outside the tile");
    if (col[lane] % 8 != 0) die("ldmatrix row address not 16-byte aligned");
  }
  for (int lane = 0; lane < 32; ++lane)
    for (int j = 0; j < 4; ++j) {
      const int src = 8 * j + lane / 4;
      for (int e = 0; e < 2; ++e) out[lane][j][e] = f(tile[row[src]][col[src] + 2 * (lane % 4) + e]);
    }
}

// One stage of warp `warp`'s mma tiles, as the device's mma_stage computes it. st: the
// warp's 32 thread states (anything with a float acc[64]).
template <typename T, typename S>
void mma_stage_emulate(const Smem<T>& sm, int buf, S* st, int warp) {
  const int wm = warp_m0(warp), wn = warp_n0(warp);
  static float a[4][32][4][2], b[4][32][2][2], acc[32][4];
  if constexpr (sizeof(T) == 4) {
    for (int kk = 0; kk < Cfg<T>::BK; kk += 8) {
      for (int lane = 0; lane < 32; ++lane) {
        for (int mi = 0; mi < 4; ++mi)
          for (int r = 0; r < 4; ++r) {
            int row, k;
            tf32_a_rc(lane, r, &row, &k);
            a[mi][lane][r][0] = tf32_round(sm.a[buf][kk + k][wm + mi * 16 + row]);
          }
        for (int ni = 0; ni < 4; ++ni)
          for (int r = 0; r < 2; ++r) {
            int k, col;
            tf32_b_rc(lane, r, &k, &col);
            b[ni][lane][r][0] = tf32_round(sm.b[buf][kk + k][wn + ni * 8 + col]);
          }
      }
      for (int mi = 0; mi < 4; ++mi)
        for (int ni = 0; ni < 4; ++ni) {
          for (int lane = 0; lane < 32; ++lane)
            for (int r = 0; r < 4; ++r) acc[lane][r] = st[lane].acc[(mi * 4 + ni) * 4 + r];
          mma_emulate<8>(a[mi], b[ni], acc);
          for (int lane = 0; lane < 32; ++lane)
            for (int r = 0; r < 4; ++r) st[lane].acc[(mi * 4 + ni) * 4 + r] = acc[lane][r];
        }
    }
  } else {
    for (int kk = 0; kk < Cfg<T>::BK; kk += 16) {
      int row[32], col[32];
      for (int mi = 0; mi < 4; ++mi) {
        for (int lane = 0; lane < 32; ++lane) ldsm_a_rc(lane, wm + mi * 16, kk, &row[lane], &col[lane]);
        ldmatrix_x4_emulate(sm.a[buf], row, col, a[mi]);
      }
      for (int nj = 0; nj < 2; ++nj) {
        float r4[32][4][2];
        for (int lane = 0; lane < 32; ++lane) ldsm_b_rc(lane, wn + nj * 16, kk, &row[lane], &col[lane]);
        ldmatrix_x4_emulate(sm.b[buf], row, col, r4);
        for (int lane = 0; lane < 32; ++lane)
          for (int e = 0; e < 2; ++e) {
            b[2 * nj][lane][0][e] = r4[lane][0][e];
            b[2 * nj][lane][1][e] = r4[lane][1][e];
            b[2 * nj + 1][lane][0][e] = r4[lane][2][e];
            b[2 * nj + 1][lane][1][e] = r4[lane][3][e];
          }
      }
      for (int mi = 0; mi < 4; ++mi)
        for (int ni = 0; ni < 4; ++ni) {
          for (int lane = 0; lane < 32; ++lane)
            for (int r = 0; r < 4; ++r) acc[lane][r] = st[lane].acc[(mi * 4 + ni) * 4 + r];
          mma_emulate<16>(a[mi], b[ni], acc);
          for (int lane = 0; lane < 32; ++lane)
            for (int r = 0; r < 4; ++r) st[lane].acc[(mi * 4 + ni) * 4 + r] = acc[lane][r];
        }
    }
  }
}

template <typename T>
void poison(T* p, size_t n) { std::memset(static_cast<void*>(p), 0xFF, n * sizeof(T)); }

// The launch: every block of the grid, every thread of the block, in kernel order.
template <typename T, bool kMma, int kMap>
void run_grid(const IgemmProblem& q, const T* a, const T* b, const T* bias, T* c, float* stats) {
  constexpr int BK = Cfg<T>::BK;
  auto sm = std::make_unique<Smem<T>>();
  std::vector<State<T, kMap>> st(kThreadsPerBlock);
  const int64_t mt = (q.M + kBM - 1) / kBM, nt = (q.Ncol + kBN - 1) / kBN;
  const int64_t stages = (q.K + BK - 1) / BK;
  for (int64_t g = 0; g < q.G; ++g)
    for (int64_t by = 0; by < nt; ++by)
      for (int64_t bx = 0; bx < mt; ++bx) {
        const Ctx<T> ctx{q, a, b, bias, c, g, bx * kBM, by * kBN, stats};
        for (int tid = 0; tid < kThreadsPerBlock; ++tid) init_thread(ctx, st[tid], tid);
        poison(&sm->a[0][0][0], sizeof(sm->a[0]) / sizeof(T));
        poison(&sm->b[0][0][0], sizeof(sm->b[0]) / sizeof(T));
        for (int tid = 0; tid < kThreadsPerBlock; ++tid) load_stage(ctx, st[tid], *sm, 0, 0, tid);
        for (int64_t s = 0; s < stages; ++s) {
          const int buf = static_cast<int>(s & 1);
          if (s + 1 < stages) {
            poison(&sm->a[buf ^ 1][0][0], sizeof(sm->a[0]) / sizeof(T));
            poison(&sm->b[buf ^ 1][0][0], sizeof(sm->b[0]) / sizeof(T));
            for (int tid = 0; tid < kThreadsPerBlock; ++tid)
              load_stage(ctx, st[tid], *sm, buf ^ 1, (s + 1) * BK, tid);
          }
          if constexpr (kMma) {
            for (int warp = 0; warp < kThreadsPerBlock / 32; ++warp)
              mma_stage_emulate<T>(*sm, buf, &st[warp * 32], warp);
          } else {
            for (int tid = 0; tid < kThreadsPerBlock; ++tid) simt_stage(*sm, buf, st[tid].acc, tid);
          }
        }
        for (int tid = 0; tid < kThreadsPerBlock; ++tid) epilogue<T, kMma, kMap>(ctx, st[tid], tid);
        if (stats != nullptr) {  // the kernel's four phases, a barrier between each
          float* part = stats_part(*sm);
          float* mean = stats_mean(*sm);
          poison(part, 17 * kBN);
          for (int tid = 0; tid < kThreadsPerBlock; ++tid)
            stats_pass<T, kMma>(ctx, st[tid].acc, part, nullptr, tid);
          for (int tid = 0; tid < kThreadsPerBlock; ++tid) stats_column(ctx, part, mean, false, tid);
          for (int tid = 0; tid < kThreadsPerBlock; ++tid)
            stats_pass<T, kMma>(ctx, st[tid].acc, part, mean, tid);
          for (int tid = 0; tid < kThreadsPerBlock; ++tid) stats_column(ctx, part, mean, true, tid);
        }
      }
}

// stats_finish_kernel: one block per channel, thread partials then the same tree.
void stats_finish(const IgemmProblem& q, const float* stats, float* mean, float* var) {
  const int64_t tiles = (q.M + kBM - 1) / kBM, channels = q.G * q.Ncol;
  static float sh[kThreadsPerBlock][3];
  for (int64_t c = 0; c < channels; ++c) {
    for (int t = 0; t < kThreadsPerBlock; ++t)
      stats_thread_partial(stats, tiles, channels, c, t, kThreadsPerBlock, sh[t]);
    for (int half = kThreadsPerBlock / 2; half > 0; half /= 2)
      for (int t = 0; t < half; ++t) chan_combine(sh[t], sh[t + half]);
    mean[c] = sh[0][1];
    var[c] = sh[0][0] > 0.f ? sh[0][2] / sh[0][0] : 0.f;
  }
}

// The weight-gradient launch: every block (grid z = G * splits), then the reduction.
template <typename T, bool kMma>
void run_wgrad_grid(const IgemmWgradProblem& q, const T* gy, const T* x, T* gw) {
  constexpr int BK = Cfg<T>::BK;
  const int64_t total = q.G * q.M * q.Ncol;
  std::vector<float> ws(igemm_wgrad_workspace(q));
  poison(ws.data(), ws.size());
  auto sm = std::make_unique<Smem<T>>();
  std::vector<WState> st(kThreadsPerBlock);
  const int64_t mt = (q.M + kBM - 1) / kBM, nt = (q.Ncol + kBN - 1) / kBN;
  const int64_t tiles = (q.K + BK - 1) / BK;
  for (int64_t z = 0; z < q.G * q.splits; ++z)
    for (int64_t by = 0; by < nt; ++by)
      for (int64_t bx = 0; bx < mt; ++bx) {
        const WCtx<T> ctx{q, gy, x, ws.data(), z % q.G, z / q.G, bx * kBM, by * kBN};
        for (auto& t : st)
          for (float& v : t.acc) v = 0.f;
        const int64_t s0 = ctx.split * q.tiles_per_split;
        const int64_t s1 = std::min(s0 + q.tiles_per_split, tiles);
        poison(&sm->a[0][0][0], sizeof(sm->a) / sizeof(T));
        poison(&sm->b[0][0][0], sizeof(sm->b) / sizeof(T));
        if (s0 < s1)
          for (int tid = 0; tid < kThreadsPerBlock; ++tid) wgrad_load_stage(ctx, *sm, 0, s0 * BK, tid);
        for (int64_t s = s0; s < s1; ++s) {
          const int buf = static_cast<int>((s - s0) & 1);
          if (s + 1 < s1) {
            poison(&sm->a[buf ^ 1][0][0], sizeof(sm->a[0]) / sizeof(T));
            poison(&sm->b[buf ^ 1][0][0], sizeof(sm->b[0]) / sizeof(T));
            for (int tid = 0; tid < kThreadsPerBlock; ++tid)
              wgrad_load_stage(ctx, *sm, buf ^ 1, (s + 1) * BK, tid);
          }
          if constexpr (kMma) {
            for (int warp = 0; warp < kThreadsPerBlock / 32; ++warp)
              mma_stage_emulate<T>(*sm, buf, &st[warp * 32], warp);
          } else {
            for (int tid = 0; tid < kThreadsPerBlock; ++tid) simt_stage(*sm, buf, st[tid].acc, tid);
          }
        }
        for (int tid = 0; tid < kThreadsPerBlock; ++tid) wgrad_epilogue<T, kMma>(ctx, st[tid].acc, tid);
      }
  for (int64_t e = 0; e < total; ++e) wgrad_reduce_element(q, ws.data(), gw, e);
}

template <typename T, bool kMma>
int64_t run_math(const IgemmProblem& q, const T* a, const T* b, const T* bias, T* c, float* stats) {
  const int map = choose_map<T>(q, a, b);
  if (q.M == 0) return map;  // the launcher returns before launching
  if (map == kMapVec) {
    if constexpr (sizeof(T) == 2) run_grid<T, kMma, kMapVec>(q, a, b, bias, c, stats);
  } else if (map == kMapKFast) {
    if constexpr (sizeof(T) == 4) run_grid<T, kMma, kMapKFast>(q, a, b, bias, c, stats);
  } else {
    run_grid<T, kMma, kMapMFast>(q, a, b, bias, c, stats);
  }
  return map;
}

// op 2: record tensors gy, x, gw; OUT gets the number of splits, then gw.
template <typename T>
void run_wgrad(int64_t math, int64_t target_blocks, const Conv2dParams& p, FILE* out) {
  auto gy = read_tensor<T>(true), x = read_tensor<T>(true), gw = read_tensor<T>(false);
  const IgemmWgradProblem q = igemm_wgrad_problem(p, gy.s, x.s, sizeof(T), target_blocks);
  if (gw.span != q.G * q.M * q.Ncol) die("gw span is not O * C/G * KH * KW");
  if (q.G * q.M * q.Ncol > 0) {
    if constexpr (sizeof(T) == 4) {
      if (math == 0)
        run_wgrad_grid<T, false>(q, gy.data(), x.data(), gw.data());
      else
        run_wgrad_grid<T, true>(q, gy.data(), x.data(), gw.data());
    } else {
      run_wgrad_grid<T, true>(q, gy.data(), x.data(), gw.data());
    }
  }
  const int64_t splits = q.splits;
  if (std::fwrite(&splits, sizeof splits, 1, out) != 1) die("write failed");
  write_output(gw, out);
}

template <typename T>
void run(int64_t op, int64_t math, bool relu, const Conv2dParams& p, FILE* out) {
  auto A = read_tensor<T>(true), B = read_tensor<T>(true), bias = read_tensor<T>(true);
  auto C = read_tensor<T>(false);
  const IgemmProblem q = op != 1 ? igemm_forward_problem(p, A.s, C.s, relu)
                                 : igemm_input_backward_problem(p, A.s, C.s);
  // op 3: the forward with batch-norm statistics (a NaN-filled tile workspace).
  std::vector<float> stats(op == 3 ? stats_floats(q) : 0);
  poison(stats.data(), stats.size());
  float* sp = op == 3 ? stats.data() : nullptr;
  if (B.span != q.G * q.Ncol * q.K) die("B span is not G * Ncol * K");
  if (bias.span != 0 && bias.span != q.G * q.Ncol) die("bias span is not G * Ncol");
  int64_t map;
  if constexpr (sizeof(T) == 4) {
    map = math == 1 ? run_math<T, true>(q, A.data(), B.data(), bias.data_or_null(), C.data(), sp)
                    : run_math<T, false>(q, A.data(), B.data(), bias.data_or_null(), C.data(), sp);
  } else {
    map = run_math<T, true>(q, A.data(), B.data(), bias.data_or_null(), C.data(), sp);
  }
  if (std::fwrite(&map, sizeof map, 1, out) != 1) die("write failed");
  write_output(C, out);
  if (op == 3) {
    std::vector<float> mean(q.G * q.Ncol), var(q.G * q.Ncol);
    if (q.M > 0) stats_finish(q, stats.data(), mean.data(), var.data());
    if (std::fwrite(mean.data(), sizeof(float), mean.size(), out) != mean.size() ||
        std::fwrite(var.data(), sizeof(float), var.size(), out) != var.size())
      die("write failed");
  }
}

}  // namespace

int main(int argc, char** argv) {
  return harness_main(argc, argv, [](int64_t op, FILE* out) {
    const int64_t dtype = read_i64(), math = read_i64(), relu = read_i64();
    const int64_t target_blocks = read_i64();
    if (op < 0 || op > 3) die("unknown op");
    Conv2dParams p;
    for (int64_t* fld : {&p.N, &p.C, &p.H, &p.W, &p.O, &p.KH, &p.KW, &p.OH, &p.OW, &p.SH, &p.SW,
                         &p.PH, &p.PW, &p.DH, &p.DW, &p.G})
      *fld = read_i64();
    if (op == 2) {
      switch (dtype) {
        case int64_t(DType::F32): run_wgrad<float>(math, target_blocks, p, out); break;
        case int64_t(DType::F16): run_wgrad<__half>(math, target_blocks, p, out); break;
        case int64_t(DType::BF16): run_wgrad<__nv_bfloat16>(math, target_blocks, p, out); break;
        default: die("unknown dtype");
      }
      return;
    }
    switch (dtype) {
      case int64_t(DType::F32): run<float>(op, math, relu != 0, p, out); break;
      case int64_t(DType::F16): run<__half>(op, math, relu != 0, p, out); break;
      case int64_t(DType::BF16): run<__nv_bfloat16>(op, math, relu != 0, p, out); break;
      default: die("unknown dtype");
    }
  });
}
