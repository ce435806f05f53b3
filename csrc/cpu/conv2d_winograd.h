// Winograd convolution F(m x m, 3 x 3) for float32 on AVX-512F CPUs, and on AVX2 + FMA CPUs with
// 8-lane transforms and sgemm's AVX2 kernel (csrc/cpu/conv2d_winograd.cpp; bfloat16 too):
// 3 x 3 kernels, stride 1, dilation 1, one group; input and output through any strides
// (NCHW or channels_last: the input is copied into zero-padded planes, the output
// scattered). m = 2, 4 or 6 (tile of m x m outputs, (m + 2)^2 products per tile and
// channel pair instead of 9 m^2).
//
// Steps per chunk of tiles (each a work item, with a block of output channels):
//   V[xi] (C x tiles)  = B^T d B of each input tile, gathered from a zero-padded copy of
//                        the input straight into sgemm's packed-B panels
//   M[xi] (O x tiles)  = U[xi] (O x C) * V[xi]           (m+2)^2 GEMMs on sgemm's micro-kernel
//   y tile             = A^T M A + bias (then ReLU), scattered into the output
// with U[xi] = G g G^T the transformed weight in sgemm's packed-A panels.
//
// Every output element is computed in one work item in an order fixed by the shape, so
// results do not depend on the thread count. A non-finite output (an Inf or NaN input, an
// overflow in the transforms) makes the call return false: the caller then runs its GEMM
// path, which gives the direct convolution's Inf / NaN pattern.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <vector>

#include "common/conv2d.h"

namespace cnnext {
namespace cpu {
namespace winograd {

// The switch (cnnext.backends.cpu.winograd); on by default.
bool enabled();
void set_enabled(bool on);

// A tile override for tests and measurements: 0 = chosen by shape (the default), 2 / 4 / 6
// forces that tile wherever Winograd applies at all (3 x 3, stride 1, dilation 1, one
// group, float32), whatever the shape's choice says.
void set_forced_tile(int m);
int forced_tile();

// Whether this CPU and build run Winograd at all (AVX-512F, or AVX2 + FMA).
bool available();

// The tiles the choice by shape may pick (F(6x6) only if it keeps the accuracy bound).
std::vector<int> allowed_tiles();

// The tile m chosen for this convolution (2, 4 or 6), or 0 when Winograd does not apply
// (not 3 x 3 / stride 1 / dilation 1 / one group, too small to pay, or switched off). On
// AVX2 the forward's (and the input gradient's, a forward) F(2x2) / F(4x4) pick counts the
// GEMM columns in the AVX2 kernel's 16-column halves; the weight gradient's (weight_grad)
// and every AVX-512 choice in whole panels of 32.
int choose_tile(const Conv2dParams& p, bool weight_grad = false);

// y = conv(x, w) (+ bias) (then ReLU) by Winograd with tile m. The weight element
// (o, c, kh, kw) is at w[o * wso + c * wsc + (kh * 3 + kw) * wst]. `u` (may be null) is
// the transformed weight of transform_weight for the same weight and m. Returns false
// (y then holds garbage) when an output is not finite or the sizes do not fit 32-bit
// indices; the caller must then compute y another way.
bool forward(const float* x, const Strides4& xs, const float* w, int64_t wso, int64_t wsc,
             int64_t wst, const float* u, const float* bias, float* y, const Strides4& ys,
             const Conv2dParams& p, bool relu, int m);

// Floats of the transformed weight of an O x C weight for tile m.
int64_t transformed_weight_size(int64_t O, int64_t C, int m);
void transform_weight(const float* w, int64_t wso, int64_t wsc, int64_t wst, int64_t O, int64_t C,
                      int m, float* u);

// bfloat16 3 x 3 forward by the float32 Winograd (input, weight, bias and out bfloat16, any
// strides): bfloat16 values are exact in float, so the float Winograd's error (<= 2e-5 of
// the largest output) stays far inside the one rounding to bfloat16 of each output. The
// input is converted while it is gathered into the padded float planes and each output
// is rounded as the output transform writes it (no whole-tensor conversion passes). Runs
// where choose_tile(p) picks a tile (the switch, the shape rules) and bf16_pays(p) (with
// AVX512_BF16: wide layers on wide maps, where it beats the vdpbf16ps GEMM; without it,
// every shape choose_tile takes, where the alternative is the float path on float copies;
// any shape when a tile is forced); returns false otherwise or when an output is not
// finite (out then holds garbage: the caller runs its own path).
bool bf16_pays(const Conv2dParams& p);
bool forward_bf16_tensor(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         at::Tensor& out, const Conv2dParams& p, bool relu);
// The bfloat16 input gradient the same way (N x C x H x W in out_format): the flipped
// forward of input_backward_tensor, where choose_tile and bf16_pays say so for that
// forward; an undefined tensor where it does not run (or meets a non-finite value).
at::Tensor input_backward_bf16_tensor(const at::Tensor& grad_output, const at::Tensor& weight,
                                      const Conv2dParams& p, at::MemoryFormat out_format);

// The forward of conv2d.cpp's float32 path when choose_tile(p) says so: the transformed
// weight comes from the weight cache (csrc/cpu/derived_cache.h), so in evaluation it is
// computed once per weight value; any change of the weight (an optimizer step, a write
// through .data) makes the next call recompute it. rows_done
// (may be empty) is called per sample once its rows are final. Returns false when the
// caller must run its own path.
bool forward_tensor(const at::Tensor& input, const at::Tensor& weight, const float* bias,
                    at::Tensor& out, const Conv2dParams& p, bool relu,
                    const std::function<void(int64_t, int64_t, int64_t)>& rows_done);

// gx = the input gradient of the convolution p (weight O x C x 3 x 3 float32) for gy, by
// Winograd when choose_tile(conv_input_grad_as_forward(p)) says so (the same switch and shape rules
// as the forward) and the padding is at most 2 per side (the forward's then is 2 - p). gx
// and gy may have any strides: unlike the forward's, a channels_last gx is written here
// too (the scatter is 1.5-3x faster than the GEMM path's channels_last input gradient);
// gx is overwritten. The flipped weight's transform is in the weight cache like the
// forward's, under its own tag. Returns false (gx then holds garbage
// or nothing) when the caller must compute gx itself: not applicable, or a non-finite
// value (counted by conv2d.winograd.nonfinite_fallback).
bool input_backward_tensor(const at::Tensor& grad_output, const at::Tensor& weight, at::Tensor& gx,
                           const Conv2dParams& p);

// gw (O x C x 3 x 3, or 5 x 5 by the split, contiguous) = the weight gradient of the convolution p for gy and the
// input x, by Winograd with the tile choose_tile(p, true) picks (the switch, the shape rules):
// sum over tiles of G^T (A gy A^T (.) B^T d B) G, the sums over tiles run as (m + 2)^2
// GEMMs. Returns false (gw then holds garbage) when the caller must compute gw itself: not
// applicable, or a value not finite (counted by conv2d.winograd.nonfinite_fallback).
bool weight_backward_tensor(const at::Tensor& grad_output, const at::Tensor& input, at::Tensor& gw,
                            const Conv2dParams& p);

}  // namespace winograd
}  // namespace cpu
}  // namespace cnnext
