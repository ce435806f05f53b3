// The implicit-GEMM launchers for float16 on tensor cores: forward / input
// backward and weight backward (csrc/cuda/conv2d_igemm_kernels.cuh), in a translation unit of
// their own.
#include "conv2d_igemm_kernels.cuh"

CNNEXT_IGEMM_INSTANTIATE(, __half, true)
