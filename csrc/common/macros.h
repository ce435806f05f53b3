// Host/device qualifiers shared by the CPU (.cpp) and CUDA (.cu) sources.
// Nothing in csrc/common may include a torch header: these files are compiled by
// nvcc on machines that have no CUDA build of torch.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define CNNEXT_HD __host__ __device__ __forceinline__
#else
#define CNNEXT_HD inline
#endif
