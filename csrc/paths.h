// Kernel-path counters: a registry of named counters, each bumped (one relaxed atomic
// increment) once per kernel call where a distinct kernel path is chosen, never per
// element. Always compiled in. Python reads them as cnnext._C._path_counts() and
// cnnext._paths.expect_path() lets a test assert that the path it targets ran.
//
//   CNNEXT_PATH(kConvImplicit, "conv2d.sgemm.implicit");   // namespace scope, once
//   kConvImplicit.hit();                                    // where the path is chosen
//
// Names: "<op>.<path>", lower case; a test names the same string.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <string>

namespace cnnext {
namespace paths {

class Counter {
 public:
  explicit Counter(const char* name);  // registers itself (static initialisation)
  void hit() { count_.fetch_add(1, std::memory_order_relaxed); }
  const char* name() const { return name_; }
  int64_t count() const { return count_.load(std::memory_order_relaxed); }
  void reset() { count_.store(0, std::memory_order_relaxed); }

 private:
  const char* name_;
  std::atomic<int64_t> count_{0};
};

// Every registered counter by name (counters sharing a name are added up).
std::map<std::string, int64_t> counts();
void reset();

}  // namespace paths
}  // namespace cnnext

// Defines a counter with internal linkage at namespace scope.
#define CNNEXT_PATH(var, name) static ::cnnext::paths::Counter var(name)
