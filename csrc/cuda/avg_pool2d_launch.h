// Entry points of the CUDA average-pooling backend (csrc/cuda/avg_pool2d_launch.cpp: the
// torch side of the kernels in csrc/cuda/avg_pool2d.cu), of the types and contract in
// csrc/backend_api/avg_pool2d.h. Compiled only in CUDA builds; never included by a .cu file.
#pragma once

#include "backend_api/avg_pool2d.h"

namespace cnnext {
namespace cuda {

backend_api::avg_pool2d_forward avg_pool2d_forward;
backend_api::avg_pool2d_backward avg_pool2d_backward;

}  // namespace cuda
}  // namespace cnnext
