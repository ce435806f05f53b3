// Small loops the CPU kernels share: work items over the threads, a finiteness scan.
#pragma once

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

namespace cnnext {
namespace cpu {

// fn(i) for i in [0, count), over the threads when there are several items (each item is
// one call: which thread runs it never changes what it computes).
template <typename Fn>
void run_items(int64_t count, const Fn& fn) {
  if (count <= 0) return;
  if (count == 1 || at::get_num_threads() == 1) {
    for (int64_t i = 0; i < count; ++i) fn(i);
    return;
  }
  at::parallel_for(0, count, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) fn(i);
  });
}

// Whether v[0, n) holds no Inf or NaN (no early exit: the loop vectorises).
template <typename T>
bool all_finite(const T* v, int64_t n) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= std::isfinite(v[i]);
  return ok;
}

}  // namespace cpu
}  // namespace cnnext
