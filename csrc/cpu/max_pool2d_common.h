// What the CPU max-pooling files share (csrc/cpu/max_pool2d_forward.cpp,
// max_pool2d_backward.cpp, max_unpool2d.cpp): the bad-index report, the windows without a
// tap inside the input, flat plane offsets and the gather both backward ops use.
// Internal to csrc/cpu.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <limits>
#include <vector>

#include "common/conv2d.h"
#include "common/pool2d.h"

namespace cnnext {
namespace cpu {

// The first bad index any thread met, reported after the parallel loop.
struct BadIndex {
  std::atomic<bool> found{false};
  int64_t value = 0;
  void record(int64_t v) {
    bool expected = false;
    if (found.compare_exchange_strong(expected, true)) value = v;
  }
  void check(const char* op, int64_t H, int64_t W) const {
    TORCH_CHECK(!found.load(), op, ": found an invalid index ", value,
                " in indices: the plane it indexes is ", H, " x ", W,
                ", so indices must lie in [0, ", H * W, ")");
  }
};

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// Output rows / columns whose window has no tap inside the input: torch outputs -inf
// there, with index lo_h * W + lo_w.
struct EmptyWindows {
  std::vector<int64_t> row_lo, col_lo;  // lo of each output row / column
  std::vector<char> row_empty, col_empty;
  bool any_col = false;
  explicit EmptyWindows(const Pool2dParams& p)
      : row_lo(p.OH), col_lo(p.OW), row_empty(p.OH), col_empty(p.OW) {
    for (int64_t o = 0; o < p.OH; ++o) {
      int64_t lo, hi;
      max_window(o, p.H, p.KH, p.SH, p.PH, p.DH, &lo, &hi);
      row_lo[o] = lo;
      row_empty[o] = lo >= hi;
    }
    for (int64_t o = 0; o < p.OW; ++o) {
      int64_t lo, hi;
      max_window(o, p.W, p.KW, p.SW, p.PW, p.DW, &lo, &hi);
      col_lo[o] = lo;
      col_empty[o] = lo >= hi;
      any_col |= lo >= hi;
    }
  }
};

// Element offset of flat plane index i in a tensor whose (h, w) dims flatten
// (stride h == W * stride w; true of every tensor allocated here).
inline int64_t flat_offset(const Strides4& s, int64_t W, int64_t i) {
  return (i / W) * s.h + (i % W) * s.w;
}

// out (N, C, h, w) = src (N, C, Hs, Ws) at indices (N, C, h, w); with `pool`, zero for
// the windows without a tap inside the input (csrc/cpu/max_pool2d_backward.cpp).
at::Tensor max_pool2d_gather(const char* op, const at::Tensor& src, const at::Tensor& indices,
                             const Pool2dParams* pool, at::MemoryFormat out_format);

}  // namespace cpu
}  // namespace cnnext
