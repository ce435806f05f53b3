// The implicit-GEMM launchers for float32, strict (SIMT, fmaf in a fixed order): forward / input
// backward and weight backward (csrc/cuda/conv2d_igemm_kernels.cuh), in a translation unit of
// their own.
#include "conv2d_igemm_kernels.cuh"

CNNEXT_IGEMM_INSTANTIATE(, float, false)
