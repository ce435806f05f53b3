// csrc/cpu/cpu_features.h: the hardware query and the CNNEXT_CPU_ISA cap.
#include "cpu/cpu_features.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace cnnext {
namespace cpu {
namespace {

Isa read_cap() {
  const char* v = std::getenv("CNNEXT_CPU_ISA");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "avx512") == 0) return Isa::kAvx512;
  if (std::strcmp(v, "avx2") == 0) return Isa::kAvx2;
  if (std::strcmp(v, "scalar") == 0) return Isa::kScalar;
  std::fprintf(stderr,
               "cnnext: ignoring CNNEXT_CPU_ISA=%s (expected avx512, avx2 or scalar)\n", v);
  return Isa::kAvx512;
}

CpuFeatures detect() {
  CpuFeatures f;
  f.cap = read_cap();
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (f.cap >= Isa::kAvx2) {
    f.avx2 = __builtin_cpu_supports("avx2");
    f.fma = __builtin_cpu_supports("fma");
    f.f16c = __builtin_cpu_supports("f16c");
  }
  if (f.cap >= Isa::kAvx512) {
    f.avx512f = __builtin_cpu_supports("avx512f");
    f.avx512bw = __builtin_cpu_supports("avx512bw");
    // Its instructions come with AVX512VL forms the conversions use.
    f.avx512_bf16 = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vl");
  }
#endif
  return f;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

const char* cpu_isa_name() {
  const CpuFeatures& f = cpu_features();
  if (f.has(Isa::kAvx512)) return "avx512";
  if (f.has(Isa::kAvx2)) return "avx2";
  return "scalar";
}

}  // namespace cpu
}  // namespace cnnext
