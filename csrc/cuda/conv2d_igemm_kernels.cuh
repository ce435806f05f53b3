// Implicit-GEMM conv2d on CUDA: forward (bias and ReLU in the epilogue) and input
// backward, as the GEMM of csrc/cuda/conv2d_igemm.h. No im2col buffer: each block
// gathers its A tile straight from the strided input into shared memory.
//
// A block computes a 128 x 128 tile of C for one group (grid z), 256 threads. The k
// loop is double-buffered: while the block computes on one shared-memory stage, the
// copies of the next stage are in flight (cp.async, zero-filled where the element is
// padding or past an edge), waited for with cp.async.wait_group before the barrier.
//
//   float32, strict   SIMT: each thread an 8 x 8 outer-product micro-tile, fmaf in a
//                     fixed k order (BK = 16; tiles k-major in shared memory, [k][m]).
//   float32, TF32     tensor cores, mma.sync m16n8k8 TF32 (inputs rounded with
//                     cvt.rna.tf32.f32), float accumulation; same tiles as strict.
//   float16/bfloat16  tensor cores, mma.sync m16n8k16, float accumulation; tiles
//                     m-major ([m][k], BK = 32, rows padded by 16 bytes so that
//                     ldmatrix is free of bank conflicts), fragments loaded by ldmatrix.
//                     Channels-last inputs with 8 | channels copy 16-byte vectors;
//                     otherwise elements are copied one by one (2-byte elements cannot
//                     go through cp.async, so these are plain loads and stores).
//
// 8 warps per block as 2 (m) x 4 (n), each a 64 x 32 warp tile of 4 x 4 mma tiles.
//
// The pieces of the kernel (thread setup, stage copy, stage compute, epilogue) are
// __host__ __device__ functions of (block, thread): tests/cuda_host/conv2d_igemm_host.cu
// runs them on the CPU for every thread of every block, in the kernel's order, with
// host stand-ins for cp.async and a host emulation of ldmatrix and mma.sync.
//
// This header holds the kernels and their launchers (templates). Each launcher pair,
// launch<T, kMma> and launch_wgrad<T, kMma>, is instantiated in a translation unit of
// its own, conv2d_igemm_{f32,tf32,f16,bf16}.cu (CNNEXT_IGEMM_INSTANTIATE below), so
// that no file compiles all twelve kernels: one did, in about 36 s per architecture.
// conv2d_igemm.cu holds the entry points of conv2d_igemm.h, which call the launchers
// through explicit instantiation declarations.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "conv2d_igemm.h"
#include "device_common.cuh"

namespace cnnext {
namespace cuda {
namespace kernels {
namespace igemm {

// #pragma unroll for the device pass only (the host compiler warns about it).
#if defined(__CUDA_ARCH__)
#define IG_UNROLL _Pragma("unroll")
#else
#define IG_UNROLL
#endif

constexpr int kBM = 128, kBN = 128, kThreadsPerBlock = 256, kPad = 8;

// Tile geometry per element type: float32 tiles are k-major ([k][m], [k][n]),
// 16-bit tiles m-major ([m][k], [n][k]).
template <typename T>
struct Cfg {
  static constexpr bool kKMajor = sizeof(T) == 4;
  static constexpr int BK = kKMajor ? 16 : 32;
  static constexpr int A_ROWS = kKMajor ? BK : kBM, A_COLS = kKMajor ? kBM + kPad : BK + kPad;
  static constexpr int B_ROWS = kKMajor ? BK : kBN, B_COLS = kKMajor ? kBN + kPad : BK + kPad;
  static constexpr int kScalarSlots = kBM * BK / kThreadsPerBlock;   // A (and B) elements per thread
  static constexpr int kVecSlots = kBM * BK / 8 / kThreadsPerBlock;  // 8-element vectors per thread
};

template <typename T>
struct alignas(16) Smem {
  T a[2][Cfg<T>::A_ROWS][Cfg<T>::A_COLS];
  T b[2][Cfg<T>::B_ROWS][Cfg<T>::B_COLS];
};

template <typename T>
CNNEXT_HD T* a_at(Smem<T>& s, int buf, int ml, int kl) {
  return Cfg<T>::kKMajor ? &s.a[buf][kl][ml] : &s.a[buf][ml][kl];
}
template <typename T>
CNNEXT_HD T* b_at(Smem<T>& s, int buf, int nl, int kl) {
  return Cfg<T>::kKMajor ? &s.b[buf][kl][nl] : &s.b[buf][nl][kl];
}

// How the threads of a block split a stage's copies:
//   kMapMFast  element by element, consecutive threads on consecutive rows (coalesced
//              for NCHW inputs, whose rows are consecutive pixels); every slot of a
//              thread lies in one row (256 threads, 128 rows), so one row is kept;
//   kMapKFast  element by element, consecutive threads on consecutive k (coalesced for
//              channels-last inputs); the slots of a thread lie in kSlots rows;
//   kMapVec    16-byte vectors of 8 consecutive k (see vec_ok).
// B (k-contiguous) is always copied k-fast, element by element or by vectors.
constexpr int kMapMFast = 0, kMapKFast = 1, kMapVec = 2;

// Scalar copy slot i of thread tid: the tile element (row, k) it copies. m_fast:
// consecutive threads take consecutive rows (coalesced for NCHW inputs, whose rows are
// consecutive pixels); otherwise consecutive k (coalesced for channels-last inputs and
// for the k-contiguous B).
template <int BK>
CNNEXT_HD void scalar_slot(int tid, int i, bool m_fast, int* row, int* kl) {
  const int e = tid + i * kThreadsPerBlock;
  if (m_fast) {
    *row = e % kBM;
    *kl = e / kBM;
  } else {
    *row = e / BK;
    *kl = e % BK;
  }
}

// Vector slot i of thread tid: 8 consecutive k (row, kl .. kl + 7).
template <int BK>
CNNEXT_HD void vec_slot(int tid, int i, int* row, int* kl) {
  const int e = tid + i * kThreadsPerBlock;
  *row = e / (BK / 8);
  *kl = (e % (BK / 8)) * 8;
}

// Whether the 16-byte vector copies apply: 2-byte elements, a channels-last A tensor
// whose channel runs of 8 are contiguous and 16-byte aligned, and a 16-byte aligned B
// (whose K = taps * a_ch is then a multiple of 8 too).
template <typename T>
CNNEXT_HD bool vec_ok(const IgemmProblem& q, const void* a, const void* b) {
  return sizeof(T) == 2 && q.ch_fast && q.as.c == 1 && q.a_ch % 8 == 0 && q.as.n % 8 == 0 &&
         q.as.h % 8 == 0 && q.as.w % 8 == 0 && reinterpret_cast<uintptr_t>(a) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(b) % 16 == 0;
}

// ---- copies: cp.async on the device, plain copies on the host ----

// *dst = src ? *src : 0. `any` is some valid global address (cp.async wants one even
// when it copies nothing).
template <typename T>
CNNEXT_HD void copy_scalar(T* dst, const T* src, const T* any) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s),
                 "l"(src != nullptr ? src : any), "r"(src != nullptr ? 4 : 0));
  } else {
    *dst = src != nullptr ? *src : T{};
  }
#else
  (void)any;
  *dst = src != nullptr ? *src : T{};
#endif
}

// 16 bytes: dst[0 .. 16) = src ? src[0 .. 16) : 0.
template <typename T>
CNNEXT_HD void copy_vec16(T* dst, const T* src, const T* any) {
#if defined(__CUDA_ARCH__)
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s),
               "l"(src != nullptr ? src : any), "r"(src != nullptr ? 16 : 0));
#else
  (void)any;
  if (src != nullptr)
    std::memcpy(static_cast<void*>(dst), static_cast<const void*>(src), 16);
  else
    std::memset(static_cast<void*>(dst), 0, 16);
#endif
}

CNNEXT_HD void cp_async_commit() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
CNNEXT_HD void cp_async_wait() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// ---- the block's work, split into per-thread pieces ----

template <typename T>
struct Ctx {
  IgemmProblem q;
  const T* a;
  const T* b;
  const T* bias;
  T* c;
  int64_t g, m0, n0;  // group, first row and first column of the block's tile
  float* stats;       // forward only: the tile's column statistics (see stats_*), or nullptr
};

template <typename T, int kMap>
struct State {
  static constexpr int kSlots = kMap == kMapVec ? Cfg<T>::kVecSlots : Cfg<T>::kScalarSlots;
  static constexpr int kRows = kMap == kMapMFast ? 1 : kSlots;
  static CNNEXT_HD int row_of(int slot) { return kMap == kMapMFast ? 0 : slot; }
  int32_t n[kRows], p[kRows], q[kRows];  // the rows of the A slots; n = -1 past M
  float acc[64];
};

// Tile element (row, kl) of A copy slot i of thread tid.
template <typename T, int kMap>
CNNEXT_HD void a_slot(int tid, int i, int* row, int* kl) {
  if (kMap == kMapVec)
    vec_slot<Cfg<T>::BK>(tid, i, row, kl);
  else
    scalar_slot<Cfg<T>::BK>(tid, i, kMap == kMapMFast, row, kl);
}

// The copy mapping the launcher picks.
template <typename T>
CNNEXT_HD int choose_map(const IgemmProblem& q, const void* a, const void* b) {
  if (vec_ok<T>(q, a, b)) return kMapVec;
  return sizeof(T) == 4 && q.ch_fast ? kMapKFast : kMapMFast;
}

template <typename T, int kMap>
CNNEXT_HD void init_thread(const Ctx<T>& ctx, State<T, kMap>& st, int tid) {
IG_UNROLL
  for (int i = 0; i < State<T, kMap>::kRows; ++i) {
    int row, kl;
    a_slot<T, kMap>(tid, i, &row, &kl);
    const int64_t m = ctx.m0 + row;
    int64_t n = -1, p = 0, qq = 0;
    if (m < ctx.q.M) igemm_row(ctx.q, m, &n, &p, &qq);
    st.n[i] = static_cast<int32_t>(n);
    st.p[i] = static_cast<int32_t>(p);
    st.q[i] = static_cast<int32_t>(qq);
  }
IG_UNROLL
  for (int i = 0; i < 64; ++i) st.acc[i] = 0.f;
}

// Issues the copies of thread tid for the stage of k in [k0, k0 + BK) into buffer buf.
template <typename T, int kMap>
CNNEXT_HD void load_stage(const Ctx<T>& ctx, const State<T, kMap>& st, Smem<T>& sm, int buf,
                          int64_t k0, int tid) {
  constexpr int BK = Cfg<T>::BK;
  constexpr bool kVec = kMap == kMapVec;
  const IgemmProblem& q = ctx.q;
IG_UNROLL
  for (int i = 0; i < State<T, kMap>::kSlots; ++i) {
    int row, kl;
    a_slot<T, kMap>(tid, i, &row, &kl);
    const int r = State<T, kMap>::row_of(i);
    const int64_t k = k0 + kl;
    const T* src = nullptr;
    if (st.n[r] >= 0 && k < q.K) {
      int64_t ch, kh, kw;
      igemm_k(q, k, &ch, &kh, &kw);
      const int64_t off = igemm_a_offset(q, ctx.g, st.n[r], st.p[r], st.q[r], ch, kh, kw);
      if (off >= 0) src = ctx.a + off;
    }
    if (kVec)
      copy_vec16(a_at(sm, buf, row, kl), src, ctx.a);
    else
      copy_scalar(a_at(sm, buf, row, kl), src, ctx.a);
  }
IG_UNROLL
  for (int i = 0; i < State<T, kMap>::kSlots; ++i) {
    int nl, kl;
    if (kVec)
      vec_slot<BK>(tid, i, &nl, &kl);
    else
      scalar_slot<BK>(tid, i, false, &nl, &kl);
    const int64_t col = ctx.n0 + nl, k = k0 + kl;
    const T* src = col < q.Ncol && k < q.K ? ctx.b + igemm_b_offset(q, ctx.g, k, col) : nullptr;
    if (kVec)
      copy_vec16(b_at(sm, buf, nl, kl), src, ctx.b);
    else
      copy_scalar(b_at(sm, buf, nl, kl), src, ctx.b);
  }
}

// -- strict float32: the SIMT micro-tile of thread tid: rows simt_row(tid, 0..7),
//    columns simt_col(tid, 0..7); acc[i * 8 + j].
CNNEXT_HD int simt_row(int tid, int i) { return (tid / 16) * 4 + (i & 3) + (i >> 2) * 64; }
CNNEXT_HD int simt_col(int tid, int j) { return (tid % 16) * 4 + (j & 3) + (j >> 2) * 64; }

CNNEXT_HD void simt_stage(const Smem<float>& sm, int buf, float* acc, int tid) {
IG_UNROLL
  for (int kk = 0; kk < Cfg<float>::BK; ++kk) {
    float a[8], b[8];
IG_UNROLL
    for (int h = 0; h < 2; ++h) {
      const float4 va = *reinterpret_cast<const float4*>(&sm.a[buf][kk][simt_row(tid, 4 * h)]);
      const float4 vb = *reinterpret_cast<const float4*>(&sm.b[buf][kk][simt_col(tid, 4 * h)]);
      a[4 * h] = va.x; a[4 * h + 1] = va.y; a[4 * h + 2] = va.z; a[4 * h + 3] = va.w;
      b[4 * h] = vb.x; b[4 * h + 1] = vb.y; b[4 * h + 2] = vb.z; b[4 * h + 3] = vb.w;
    }
IG_UNROLL
    for (int i = 0; i < 8; ++i)
IG_UNROLL
      for (int j = 0; j < 8; ++j) acc[i * 8 + j] = fmaf(a[i], b[j], acc[i * 8 + j]);
  }
}

// -- tensor cores. Warp w of the block owns rows warp_m0(w) .. + 64 and columns
//    warp_n0(w) .. + 32 of the tile: 4 x 4 mma tiles of 16 x 8, acc[(mi * 4 + ni) * 4 + r].
CNNEXT_HD int warp_m0(int warp) { return (warp % 2) * 64; }
CNNEXT_HD int warp_n0(int warp) { return (warp / 2) * 32; }

// Tile coordinates (row, col) of accumulator r of mma tile (mi, ni) of thread tid: the
// m16n8 C fragment layout (lane = 4 * gid + tig: rows gid, gid + 8; columns 2 tig, + 1).
CNNEXT_HD void mma_acc_rc(int tid, int mi, int ni, int r, int* row, int* col) {
  const int warp = tid / 32, lane = tid % 32;
  *row = warp_m0(warp) + mi * 16 + lane / 4 + 8 * (r >> 1);
  *col = warp_n0(warp) + ni * 8 + 2 * (lane % 4) + (r & 1);
}

// TF32 m16n8k8 fragments, read straight from the k-major tiles. A register r of a lane:
// (row, k) = (gid + 8 * (r & 1), tig + 4 * (r >> 1)); B register r: (k, col) = (tig + 4 r, gid).
CNNEXT_HD void tf32_a_rc(int lane, int r, int* row, int* k) {
  *row = lane / 4 + 8 * (r & 1);
  *k = lane % 4 + 4 * (r >> 1);
}
CNNEXT_HD void tf32_b_rc(int lane, int r, int* k, int* col) {
  *k = lane % 4 + 4 * r;
  *col = lane / 4;
}

// The shared-memory element whose 16-byte row lane gives ldmatrix.x4. A (16 x 16 at
// row m0, k kk): matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15),
// (rows 8-15, k 8-15), i.e. registers a0..a3 of m16n8k16. B (two 8-column tiles at
// column n0, k kk, from the [n][k] tile): (cols 0-7, k 0-7), (cols 0-7, k 8-15),
// (cols 8-15, k 0-7), (cols 8-15, k 8-15): b0, b1 of tile n0, then of tile n0 + 8.
CNNEXT_HD void ldsm_a_rc(int lane, int m0, int kk, int* row, int* k) {
  *row = m0 + lane % 16;
  *k = kk + (lane / 16) * 8;
}
CNNEXT_HD void ldsm_b_rc(int lane, int n0, int kk, int* col, int* k) {
  *col = n0 + lane % 8 + (lane / 16) * 8;
  *k = kk + ((lane / 8) % 2) * 8;
}

#if defined(__CUDA_ARCH__)
__device__ __forceinline__ uint32_t to_tf32(float v) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(v));
  return r;
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* p) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

template <typename T>
__device__ __forceinline__ void mma16816(float* d, const uint32_t* a, const uint32_t* b) {
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

__device__ __forceinline__ void mma1688_tf32(float* d, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// One stage of the warp's mma tiles (device only; the host harness emulates it).
template <typename T>
__device__ __forceinline__ void mma_stage(const Smem<T>& sm, int buf, float* acc, int tid) {
  const int warp = tid / 32, lane = tid % 32;
  const int wm = warp_m0(warp), wn = warp_n0(warp);
  if constexpr (sizeof(T) == 4) {
IG_UNROLL
    for (int kk = 0; kk < Cfg<T>::BK; kk += 8) {
      uint32_t a[4][4], b[4][2];
IG_UNROLL
      for (int mi = 0; mi < 4; ++mi)
IG_UNROLL
        for (int r = 0; r < 4; ++r) {
          int row, k;
          tf32_a_rc(lane, r, &row, &k);
          a[mi][r] = to_tf32(sm.a[buf][kk + k][wm + mi * 16 + row]);
        }
IG_UNROLL
      for (int ni = 0; ni < 4; ++ni)
IG_UNROLL
        for (int r = 0; r < 2; ++r) {
          int k, col;
          tf32_b_rc(lane, r, &k, &col);
          b[ni][r] = to_tf32(sm.b[buf][kk + k][wn + ni * 8 + col]);
        }
IG_UNROLL
      for (int mi = 0; mi < 4; ++mi)
IG_UNROLL
        for (int ni = 0; ni < 4; ++ni) mma1688_tf32(acc + (mi * 4 + ni) * 4, a[mi], b[ni]);
    }
  } else {
IG_UNROLL
    for (int kk = 0; kk < Cfg<T>::BK; kk += 16) {
      uint32_t a[4][4], b[4][2];
IG_UNROLL
      for (int mi = 0; mi < 4; ++mi) {
        int row, k;
        ldsm_a_rc(lane, wm + mi * 16, kk, &row, &k);
        ldmatrix_x4(a[mi], &sm.a[buf][row][k]);
      }
IG_UNROLL
      for (int nj = 0; nj < 2; ++nj) {
        int col, k;
        ldsm_b_rc(lane, wn + nj * 16, kk, &col, &k);
        uint32_t r[4];
        ldmatrix_x4(r, &sm.b[buf][col][k]);
        b[2 * nj][0] = r[0];
        b[2 * nj][1] = r[1];
        b[2 * nj + 1][0] = r[2];
        b[2 * nj + 1][1] = r[3];
      }
IG_UNROLL
      for (int mi = 0; mi < 4; ++mi)
IG_UNROLL
        for (int ni = 0; ni < 4; ++ni) mma16816<T>(acc + (mi * 4 + ni) * 4, a[mi], b[ni]);
    }
  }
}
#endif  // __CUDA_ARCH__

// Writes C element (row, col) of the tile from its accumulated value: + bias, ReLU.
// The value stored for accumulator v of (group-local) column col: + bias, ReLU, in T.
template <typename T>
CNNEXT_HD T out_value(const Ctx<T>& ctx, int64_t col, float v) {
  if (ctx.bias != nullptr) v += AccType<T>::to(ctx.bias[ctx.g * ctx.q.Ncol + col]);
  if (ctx.q.relu && v < 0.f) v = 0.f;
  return AccType<T>::from(v);
}

template <typename T>
CNNEXT_HD void store_c(const Ctx<T>& ctx, int64_t n, int64_t p, int64_t qq, int64_t col, float v) {
  ctx.c[igemm_c_offset(ctx.q, ctx.g, n, p, qq, col)] = out_value(ctx, col, v);
}

// ---- batch-norm statistics of the stored output, per tile (conv_bn_relu2d training):
// tile t's column col gets (count, mean, M2) of its valid rows' stored values, written to
// stats[(t * G * Ncol + g * Ncol + col) * 3 ..]; igemm_stats_finish combines the tiles.
// Two passes over the accumulators (mean, then squared deviations), each a fixed-order
// reduction through shared memory: 16 row groups x 128 columns of partial sums.

// Tile position of accumulator i of thread tid.
template <bool kMma>
CNNEXT_HD void acc_rc(int tid, int i, int* row, int* col) {
  if (kMma) {
    mma_acc_rc(tid, i / 16, (i / 4) % 4, i % 4, row, col);
  } else {
    *row = simt_row(tid, i / 8);
    *col = simt_col(tid, i % 8);
  }
}
// Which of a thread's 8 columns accumulator i is in.
template <bool kMma>
CNNEXT_HD int acc_col_slot(int i) { return kMma ? ((i / 4) % 4) * 2 + (i % 2) : i % 8; }
// The row group of thread tid: the 16 threads that share a column set have distinct
// groups, and all rows of a thread are in its group.
template <bool kMma>
CNNEXT_HD int row_group(int tid) {
  return kMma ? ((tid / 32) % 2) * 8 + (tid % 32) / 4 : tid / 16;
}

// Pass of thread tid: part[group][col] = sum over its valid rows of the stored value
// (mean == nullptr) or of its squared deviation from mean[col].
template <typename T, bool kMma>
CNNEXT_HD void stats_pass(const Ctx<T>& ctx, const float* acc, float* part, const float* mean, int tid) {
  float sum[8];
  int cols[8];
IG_UNROLL
  for (int j = 0; j < 8; ++j) sum[j] = 0.f;
IG_UNROLL
  for (int i = 0; i < 64; ++i) {
    int row, col;
    acc_rc<kMma>(tid, i, &row, &col);
    const int j = acc_col_slot<kMma>(i);
    cols[j] = col;
    if (ctx.m0 + row >= ctx.q.M || ctx.n0 + col >= ctx.q.Ncol) continue;
    const float v = AccType<T>::to(out_value(ctx, ctx.n0 + col, acc[i]));
    if (mean == nullptr) {
      sum[j] += v;
    } else {
      const float d = v - mean[col];
      sum[j] += d * d;
    }
  }
  const int gr = row_group<kMma>(tid);
IG_UNROLL
  for (int j = 0; j < 8; ++j) part[gr * kBN + cols[j]] = sum[j];
}

// Thread tid < kBN: column tid's total over the 16 row groups, in order. First pass:
// its mean into mean[tid]; second pass: (count, mean, M2) into the tile's statistics.
template <typename T>
CNNEXT_HD void stats_column(const Ctx<T>& ctx, const float* part, float* mean, bool second, int tid) {
  if (tid >= kBN) return;
  float total = 0.f;
  for (int gr = 0; gr < 16; ++gr) total += part[gr * kBN + tid];
  const int64_t rows = ctx.q.M - ctx.m0 < kBM ? ctx.q.M - ctx.m0 : kBM;
  if (!second) {
    mean[tid] = total / static_cast<float>(rows);
  } else if (ctx.n0 + tid < ctx.q.Ncol) {
    const int64_t tile = ctx.m0 / kBM, channels = ctx.q.G * ctx.q.Ncol;
    float* out = ctx.stats + (tile * channels + ctx.g * ctx.q.Ncol + ctx.n0 + tid) * 3;
    out[0] = static_cast<float>(rows);
    out[1] = mean[tid];
    out[2] = total;
  }
}

// Shared memory of the statistics passes, in the (finished) tile buffers.
template <typename T>
CNNEXT_HD float* stats_part(Smem<T>& sm) { return reinterpret_cast<float*>(&sm); }
template <typename T>
CNNEXT_HD float* stats_mean(Smem<T>& sm) { return reinterpret_cast<float*>(&sm) + 16 * kBN; }
static_assert(sizeof(Smem<float>) >= (16 + 1) * kBN * sizeof(float), "statistics scratch");
static_assert(sizeof(Smem<__half>) >= (16 + 1) * kBN * sizeof(float), "statistics scratch");

// Chan et al.'s combination of (count, mean, M2) b into a.
CNNEXT_HD void chan_combine(float* a, const float* b) {
  const float n = a[0] + b[0];
  if (b[0] == 0.f) return;
  if (a[0] == 0.f) {
    a[0] = b[0]; a[1] = b[1]; a[2] = b[2];
    return;
  }
  const float delta = b[1] - a[1];
  a[1] += delta * (b[0] / n);
  a[2] += b[2] + delta * delta * (a[0] * b[0] / n);
  a[0] = n;
}

// Thread t of the block of channel c in igemm_stats_finish: the combination of tiles
// t, t + threads, ... in order.
CNNEXT_HD void stats_thread_partial(const float* stats, int64_t tiles, int64_t channels, int64_t c,
                                    int t, int threads, float* out) {
  out[0] = out[1] = out[2] = 0.f;
  for (int64_t tile = t; tile < tiles; tile += threads) chan_combine(out, stats + (tile * channels + c) * 3);
}

// The epilogue of thread tid: its accumulators into C, inside the problem's bounds.
template <typename T, bool kMma, int kMap>
CNNEXT_HD void epilogue(const Ctx<T>& ctx, const State<T, kMap>& st, int tid) {
  const IgemmProblem& q = ctx.q;
  if (kMma) {
IG_UNROLL
    for (int mi = 0; mi < 4; ++mi)
IG_UNROLL
      for (int h = 0; h < 2; ++h) {  // the two rows (gid, gid + 8) of the fragment
        int row, col;
        mma_acc_rc(tid, mi, 0, 2 * h, &row, &col);
        const int64_t m = ctx.m0 + row;
        if (m >= q.M) continue;
        int64_t n, p, qq;
        igemm_row(q, m, &n, &p, &qq);
IG_UNROLL
        for (int ni = 0; ni < 4; ++ni)
IG_UNROLL
          for (int e = 0; e < 2; ++e) {
            const int r = 2 * h + e;
            mma_acc_rc(tid, mi, ni, r, &row, &col);
            const int64_t cg = ctx.n0 + col;
            if (cg < q.Ncol) store_c(ctx, n, p, qq, cg, st.acc[(mi * 4 + ni) * 4 + r]);
          }
      }
  } else {
IG_UNROLL
    for (int i = 0; i < 8; ++i) {
      const int64_t m = ctx.m0 + simt_row(tid, i);
      if (m >= q.M) continue;
      int64_t n, p, qq;
      igemm_row(q, m, &n, &p, &qq);
IG_UNROLL
      for (int j = 0; j < 8; ++j) {
        const int64_t cg = ctx.n0 + simt_col(tid, j);
        if (cg < q.Ncol) store_c(ctx, n, p, qq, cg, st.acc[i * 8 + j]);
      }
    }
  }
}

template <typename T, bool kMma, int kMap>
__global__ void __launch_bounds__(kThreadsPerBlock)
    igemm_kernel(const IgemmProblem q, const T* __restrict__ a, const T* __restrict__ b,
                 const T* __restrict__ bias, T* __restrict__ c, float* __restrict__ stats) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int BK = Cfg<T>::BK;
  __shared__ Smem<T> sm;
  const Ctx<T> ctx{q, a, b, bias, c, static_cast<int64_t>(blockIdx.z),
                   static_cast<int64_t>(blockIdx.x) * kBM, static_cast<int64_t>(blockIdx.y) * kBN,
                   stats};
  const int tid = static_cast<int>(threadIdx.x);
  State<T, kMap> st;
  init_thread(ctx, st, tid);
  const int64_t stages = (q.K + BK - 1) / BK;
  load_stage(ctx, st, sm, 0, 0, tid);
  cp_async_commit();
  for (int64_t s = 0; s < stages; ++s) {
    const int buf = static_cast<int>(s & 1);
    if (s + 1 < stages) {
      load_stage(ctx, st, sm, buf ^ 1, (s + 1) * BK, tid);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if constexpr (kMma)
      mma_stage<T>(sm, buf, st.acc, tid);
    else
      simt_stage(sm, buf, st.acc, tid);
    __syncthreads();
  }
  epilogue<T, kMma, kMap>(ctx, st, tid);
  if (ctx.stats != nullptr) {  // uniform across the block
    float* part = stats_part(sm);
    float* mean = stats_mean(sm);
    stats_pass<T, kMma>(ctx, st.acc, part, nullptr, tid);
    __syncthreads();
    stats_column(ctx, part, mean, false, tid);
    __syncthreads();
    stats_pass<T, kMma>(ctx, st.acc, part, mean, tid);
    __syncthreads();
    stats_column(ctx, part, mean, true, tid);
  }
#else
  // Built for an architecture without cp.async / mma.sync: never launched there
  // (igemm_supported checks the device), but the symbol must exist.
  (void)q; (void)a; (void)b; (void)bias; (void)c; (void)stats;
  __trap();
#endif
}

// ---- weight gradient (IgemmWgradProblem): the same tiles, stage computes and
//      accumulator layouts; its own copies (A = grad_output rows, B = the input
//      gathered through the taps) and an epilogue into the split's float workspace.

template <typename T>
struct WCtx {
  IgemmWgradProblem q;
  const T* gy;
  const T* x;
  float* ws;
  int64_t g, split, m0, n0;
};

struct WState {
  float acc[64];
};

// The copies of thread tid for the stage of k in [k0, k0 + BK) into buffer buf.
template <typename T>
CNNEXT_HD void wgrad_load_stage(const WCtx<T>& ctx, Smem<T>& sm, int buf, int64_t k0, int tid) {
  constexpr int BK = Cfg<T>::BK;
  const IgemmWgradProblem& q = ctx.q;
IG_UNROLL
  for (int i = 0; i < Cfg<T>::kScalarSlots; ++i) {
    int row, kl;
    scalar_slot<BK>(tid, i, q.a_m_fast, &row, &kl);
    const int64_t o = ctx.m0 + row, k = k0 + kl;
    const T* src = nullptr;
    if (o < q.M && k < q.K) {
      int64_t n, oh, ow;
      igemm_wgrad_k(q, k, &n, &oh, &ow);
      src = ctx.gy + igemm_wgrad_a_offset(q, ctx.g, o, n, oh, ow);
    }
    copy_scalar(a_at(sm, buf, row, kl), src, ctx.gy);
  }
IG_UNROLL
  for (int i = 0; i < Cfg<T>::kScalarSlots; ++i) {
    int nl, kl;
    scalar_slot<BK>(tid, i, false, &nl, &kl);
    const int64_t col = ctx.n0 + nl, k = k0 + kl;
    const T* src = nullptr;
    if (col < q.Ncol && k < q.K) {
      int64_t n, oh, ow, c, kh, kw;
      igemm_wgrad_k(q, k, &n, &oh, &ow);
      igemm_wgrad_col(q, col, &c, &kh, &kw);
      const int64_t off = igemm_wgrad_b_offset(q, ctx.g, c, kh, kw, n, oh, ow);
      if (off >= 0) src = ctx.x + off;
    }
    copy_scalar(b_at(sm, buf, nl, kl), src, ctx.x);
  }
}

// Thread tid's accumulators into the split's workspace slice (G * Og, Ncol).
template <typename T, bool kMma>
CNNEXT_HD void wgrad_epilogue(const WCtx<T>& ctx, const float* acc, int tid) {
  const IgemmWgradProblem& q = ctx.q;
  float* out = ctx.ws + (ctx.split * q.G + ctx.g) * q.M * q.Ncol;
IG_UNROLL
  for (int i = 0; i < 64; ++i) {
    int row, col;
    if (kMma)
      mma_acc_rc(tid, i / 16, (i / 4) % 4, i % 4, &row, &col);
    else {
      row = simt_row(tid, i / 8);
      col = simt_col(tid, i % 8);
    }
    const int64_t o = ctx.m0 + row, c = ctx.n0 + col;
    if (o < q.M && c < q.Ncol) out[o * q.Ncol + c] = acc[i];
  }
}

// grad_weight element e = the splits' partial sums of e, added in split order.
template <typename T>
CNNEXT_HD void wgrad_reduce_element(const IgemmWgradProblem& q, const float* ws, T* gw, int64_t e) {
  const int64_t total = q.G * q.M * q.Ncol;
  float v = 0.f;
  for (int64_t s = 0; s < q.splits; ++s) v += ws[s * total + e];
  gw[e] = AccType<T>::from(v);
}

template <typename T, bool kMma>
__global__ void __launch_bounds__(kThreadsPerBlock)
    igemm_wgrad_kernel(const IgemmWgradProblem q, const T* __restrict__ gy, const T* __restrict__ x,
                       float* __restrict__ ws) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int BK = Cfg<T>::BK;
  __shared__ Smem<T> sm;
  const int64_t z = blockIdx.z;
  const WCtx<T> ctx{q, gy, x, ws, z % q.G, z / q.G, static_cast<int64_t>(blockIdx.x) * kBM,
                    static_cast<int64_t>(blockIdx.y) * kBN};
  const int tid = static_cast<int>(threadIdx.x);
  WState st;
IG_UNROLL
  for (int i = 0; i < 64; ++i) st.acc[i] = 0.f;
  const int64_t tiles = (q.K + BK - 1) / BK;
  const int64_t s0 = ctx.split * q.tiles_per_split;
  const int64_t s1 = s0 + q.tiles_per_split < tiles ? s0 + q.tiles_per_split : tiles;
  if (s0 < s1) {
    wgrad_load_stage(ctx, sm, 0, s0 * BK, tid);
    cp_async_commit();
  }
  for (int64_t s = s0; s < s1; ++s) {
    const int buf = static_cast<int>((s - s0) & 1);
    if (s + 1 < s1) {
      wgrad_load_stage(ctx, sm, buf ^ 1, (s + 1) * BK, tid);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if constexpr (kMma)
      mma_stage<T>(sm, buf, st.acc, tid);
    else
      simt_stage(sm, buf, st.acc, tid);
    __syncthreads();
  }
  wgrad_epilogue<T, kMma>(ctx, st.acc, tid);
#else
  (void)q; (void)gy; (void)x; (void)ws;
  __trap();
#endif
}

template <typename T>
__global__ void __launch_bounds__(kThreadsPerBlock)
    wgrad_reduce_kernel(const IgemmWgradProblem q, const float* __restrict__ ws, T* __restrict__ gw,
                        const int64_t total) {
  for (int64_t e = grid_first(); e < total; e += grid_step()) wgrad_reduce_element(q, ws, gw, e);
}

template <typename T, bool kMma>
cudaError_t launch_wgrad(const IgemmWgradProblem& q, const void* gy, const void* x, float* ws,
                         void* gw, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((q.M + kBM - 1) / kBM),
                  static_cast<unsigned>((q.Ncol + kBN - 1) / kBN),
                  static_cast<unsigned>(q.G * q.splits));
  igemm_wgrad_kernel<T, kMma><<<grid, kThreadsPerBlock, 0, stream>>>(
      q, static_cast<const T*>(gy), static_cast<const T*>(x), ws);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t total = q.G * q.M * q.Ncol;
  wgrad_reduce_kernel<T><<<grid_size(total), kThreads, 0, stream>>>(q, ws, static_cast<T*>(gw), total);
  return cudaGetLastError();
}

template <typename T, bool kMma, int kMap>
cudaError_t launch_map(const IgemmProblem& q, const void* a, const void* b, const void* bias,
                       void* c, float* stats, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((q.M + kBM - 1) / kBM),
                  static_cast<unsigned>((q.Ncol + kBN - 1) / kBN), static_cast<unsigned>(q.G));
  igemm_kernel<T, kMma, kMap><<<grid, kThreadsPerBlock, 0, stream>>>(
      q, static_cast<const T*>(a), static_cast<const T*>(b), static_cast<const T*>(bias),
      static_cast<T*>(c), stats);
  return cudaGetLastError();
}

template <typename T, bool kMma>
cudaError_t launch(const IgemmProblem& q, const void* a, const void* b, const void* bias, void* c,
                   float* stats, cudaStream_t stream) {
  switch (choose_map<T>(q, a, b)) {
    case kMapVec:
      if constexpr (sizeof(T) == 2)
        return launch_map<T, kMma, kMapVec>(q, a, b, bias, c, stats, stream);
      break;
    case kMapKFast:
      if constexpr (sizeof(T) == 4)
        return launch_map<T, kMma, kMapKFast>(q, a, b, bias, c, stats, stream);
      break;
    default: return launch_map<T, kMma, kMapMFast>(q, a, b, bias, c, stats, stream);
  }
  return cudaErrorInvalidValue;
}

// Rows of float statistics igemm_stats_floats reports (see conv2d_igemm.h).
CNNEXT_HD int64_t stats_floats(const IgemmProblem& q) { return ((q.M + kBM - 1) / kBM) * q.G * q.Ncol * 3; }

}  // namespace igemm
}  // namespace kernels
}  // namespace cuda
}  // namespace cnnext

// The launchers of one element type and math: EXTERN empty for the explicit
// instantiation definitions (conv2d_igemm_<type>.cu), `extern` for the declarations
// the entry points compile against (conv2d_igemm.cu).
#define CNNEXT_IGEMM_INSTANTIATE(EXTERN, T, MMA)                                                      \
  namespace cnnext {                                                                                  \
  namespace cuda {                                                                                    \
  namespace kernels {                                                                                 \
  namespace igemm {                                                                                   \
  EXTERN template cudaError_t launch<T, MMA>(const IgemmProblem&, const void*, const void*,           \
                                             const void*, void*, float*, cudaStream_t);               \
  EXTERN template cudaError_t launch_wgrad<T, MMA>(const IgemmWgradProblem&, const void*, const void*, \
                                                   float*, void*, cudaStream_t);                      \
  }                                                                                                   \
  }                                                                                                   \
  }                                                                                                   \
  }
