// max_pool2d forward with indices on AVX-512 (csrc/cpu/max_pool2d_avx512.cpp).
#pragma once

#include <cstdint>

#include "common/pool2d.h"

namespace cnnext {
namespace cpu {

// Whether max_pool2d_nchw_avx512 handles p on this CPU: AVX-512 usable
// (cpu_features().has(Isa::kAvx512)), column stride
// 1 or 2, and (float32, whose indices ride in int32 lanes) planes below 2^31 elements.
bool max_pool2d_nchw_avx512_ok(const Pool2dParams& p, bool is_float);

// x: input whose rows are contiguous (element (n, c, h, w) at n * xn + c * xc + h * xh + w);
// y, yi: contiguous (N, C, OH, OW) outputs. Parallel over the planes.
void max_pool2d_nchw_avx512(const float* x, int64_t xn, int64_t xc, int64_t xh,
                            const Pool2dParams& p, float* y, int64_t* yi);
void max_pool2d_nchw_avx512(const double* x, int64_t xn, int64_t xc, int64_t xh,
                            const Pool2dParams& p, double* y, int64_t* yi);
// bfloat16 (the raw 16-bit values), under max_pool2d_nchw_avx512_ok(p, true): bit-exact.
void max_pool2d_nchw_avx512_bf16(const uint16_t* x, int64_t xn, int64_t xc, int64_t xh,
                                 const Pool2dParams& p, uint16_t* y, int64_t* yi);

// channels_last forward, one output pixel (AVX-512, windows of at most 32 taps, planes
// below 2^31 elements): y[c], yi[c] for c < C = the maximum (torch's scan order) over the
// taps t < nt (1 <= nt <= 32) at xp + off[t] + c, and the flat index tidx[t] of the
// winning tap; tidx holds 32 entries (unused ones any value).
bool max_pool2d_cl_avx512_ok(const Pool2dParams& p);
void max_pool2d_cl_pixel_avx512(const float* xp, int64_t C, const int64_t* off,
                                const int32_t* tidx, int64_t nt, float* y, int64_t* yi);
void max_pool2d_cl_pixel_avx512(const double* xp, int64_t C, const int64_t* off,
                                const int32_t* tidx, int64_t nt, double* y, int64_t* yi);

}  // namespace cpu
}  // namespace cnnext
