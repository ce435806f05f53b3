// max_pool2d forward with indices on NCHW rows, AVX-512 (csrc/cpu/max_pool2d_avx512.cpp).
#pragma once

#include <cstdint>

#include "common/pool2d.h"

namespace cnnext {
namespace cpu {

// Whether max_pool2d_nchw_avx512 handles p on this CPU: AVX-512F present, column stride
// 1 or 2, and (float32, whose indices ride in int32 lanes) planes below 2^31 elements.
bool max_pool2d_nchw_avx512_ok(const Pool2dParams& p, bool is_float);

// x: input whose rows are contiguous (element (n, c, h, w) at n * xn + c * xc + h * xh + w);
// y, yi: contiguous (N, C, OH, OW) outputs. Parallel over the planes.
void max_pool2d_nchw_avx512(const float* x, int64_t xn, int64_t xc, int64_t xh,
                            const Pool2dParams& p, float* y, int64_t* yi);
void max_pool2d_nchw_avx512(const double* x, int64_t xn, int64_t xc, int64_t xh,
                            const Pool2dParams& p, double* y, int64_t* yi);

}  // namespace cpu
}  // namespace cnnext
