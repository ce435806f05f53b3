// Kernel-path counters: a registry of named counters, each bumped (one relaxed atomic
// increment) once per kernel call where a distinct kernel path is chosen, never per
// element. Always compiled in. Python reads them as cnnext._C._path_counts() and
// cnnext._paths.expect_path() lets a test assert that the path it targets ran.
//
//   CNNEXT_PATH(kConvImplicit, "conv2d.sgemm.implicit");   // namespace scope, once
//   kConvImplicit.hit();                                    // where the path is chosen
//
// Names: "<op>.<path>", lower case; a test names the same string.
//
// A path that only a CPU with some instruction set can take says so, so that a test which
// targets it is skipped on a CPU without it (cnnext._paths.expect_path) instead of failing
// or passing untested:
//
//   CNNEXT_PATH_NEEDS(kGemm, "sgemm.gemm", kAvx512F);
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <string>

namespace cnnext {
namespace paths {

// What a CPU must offer (under the CNNEXT_CPU_ISA cap, csrc/cpu/cpu_features.h) for a
// path to run; csrc/test_hooks.cpp answers whether this one does.
enum class Needs {
  kNothing,
  kAvx2,        // AVX2 and FMA
  kAvx512F,     // AVX-512F and FMA: the float32 GEMM (cpu/sgemm.h) and what runs on it
  kAvx512,      // AVX-512F, AVX-512BW, AVX2, FMA: Vec<T, Isa::kAvx512> (cpu/vec.h)
  kAvx512Bf16,  // AVX512_BF16 with AVX-512F and AVX-512BW: the bfloat16 GEMM
};

class Counter {
 public:
  // Registers itself (static initialisation).
  explicit Counter(const char* name, Needs needs = Needs::kNothing);
  void hit() { count_.fetch_add(1, std::memory_order_relaxed); }
  const char* name() const { return name_; }
  Needs needs() const { return needs_; }
  int64_t count() const { return count_.load(std::memory_order_relaxed); }
  void reset() { count_.store(0, std::memory_order_relaxed); }

 private:
  const char* name_;
  Needs needs_;
  std::atomic<int64_t> count_{0};
};

// Every registered counter by name (counters sharing a name are added up).
std::map<std::string, int64_t> counts();
// Every registered counter's requirement by name.
std::map<std::string, Needs> needs();
void reset();

}  // namespace paths
}  // namespace cnnext

// Defines a counter with internal linkage at namespace scope.
#define CNNEXT_PATH(var, name) static ::cnnext::paths::Counter var(name)
// The same for a path that only runs where the CPU offers `needs` (a Needs enumerator).
#define CNNEXT_PATH_NEEDS(var, name, needs) \
  static ::cnnext::paths::Counter var(name, ::cnnext::paths::Needs::needs)
