// The one runtime CPU-feature check of the CPU backend: every kernel that has code for
// an instruction set asks here (never __builtin_cpu_supports or cpuid itself).
//
// The hardware is queried once (cached). The environment variable CNNEXT_CPU_ISA, read
// at that first query, caps the level the kernels may use, to test the fallback paths:
//   CNNEXT_CPU_ISA=avx512   everything the CPU has (the default)
//   CNNEXT_CPU_ISA=avx2     no AVX-512 feature (avx512f, avx512bw, avx512_bf16)
//   CNNEXT_CPU_ISA=scalar   no AVX2-level feature either (avx2, fma, f16c): baseline x86-64
// Any other value is ignored with a warning on stderr.
#pragma once

// Per-instruction-set code is compiled one way: GCC / clang target options on the
// functions that use the instruction set, CNNEXT_TARGET("avx512f") on each function, or
// `#pragma GCC target` around a header of kernels included once per instruction set
// (csrc/cpu/avg_pool2d.cpp: lambdas do not inherit a function's target attribute). The
// extension itself is built for baseline x86-64, and these functions run only where
// cpu_features() says so.
#if defined(__GNUC__) || defined(__clang__)
#define CNNEXT_TARGET(isa) __attribute__((target(isa)))
#else
#define CNNEXT_TARGET(isa)
#endif

namespace cnnext {
namespace cpu {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

struct CpuFeatures {
  // What the kernels may use: the hardware's features under the CNNEXT_CPU_ISA cap.
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512_bf16 = false;
  Isa cap = Isa::kAvx512;  // the CNNEXT_CPU_ISA cap

  bool avx2_fma() const { return avx2 && fma; }
  bool avx512f_fma() const { return avx512f && fma; }
  // Whether code for i may run: every feature its Vec<T, i> (csrc/cpu/vec.h) is
  // compiled for.
  bool has(Isa i) const {
    switch (i) {
      case Isa::kAvx512: return avx512f && avx512bw && avx2_fma();
      case Isa::kAvx2: return avx2_fma();
      default: return true;
    }
  }
};

// Cached after the first call; thread-safe.
const CpuFeatures& cpu_features();

// "avx512", "avx2" or "scalar": the widest level every feature of which is usable.
const char* cpu_isa_name();

}  // namespace cpu
}  // namespace cnnext
