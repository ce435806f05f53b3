// conv_bn_relu2d's batch-norm sweeps for bfloat16 planes on AVX-512 (csrc/cpu/bn_bf16.cpp):
// what csrc/cpu/conv_bn_relu2d.cpp's generic loops compute over one contiguous run of n
// values of one channel, 16 lanes at a time. Values are widened to float; sums are taken
// in float over chunks of 256 values and added up in double, as the generic loops do;
// each output is rounded to bfloat16 once (round to nearest even, vcvtneps2bf16).
// Called only where available() (AVX512_BF16; CNNEXT_CPU_ISA caps it).
#pragma once

#include <cstdint>

namespace cnnext {
namespace cpu {
namespace bn_bf16 {

bool available();

// *mean = the mean of v[0, n), *m2 = the sum of squared deviations from it (two sweeps).
void moments(const uint16_t* v, int64_t n, double* mean, double* m2);

// out = [relu]((v - m) * s + t).
void normalize(const uint16_t* v, uint16_t* out, int64_t n, float m, float s, float t, bool relu);

// gm = g, or 0 where o <= 0 when o is given (the ReLU's gradient; a NaN o passes g):
// *s0 = sum gm, *s1 = sum gm * (y - m).
void sums(const uint16_t* g, const uint16_t* o, const uint16_t* y, int64_t n, float m, double* s0,
          double* s1);

// dy = k * gm + shift - coef * (y - m); returns the sum of the rounded dy.
double apply(const uint16_t* g, const uint16_t* o, const uint16_t* y, int64_t n, float m, float k,
             float shift, float coef, uint16_t* dy);

}  // namespace bn_bf16
}  // namespace cpu
}  // namespace cnnext
