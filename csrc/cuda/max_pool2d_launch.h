// Entry points of the CUDA max-pooling backend (csrc/cuda/max_pool2d_launch.cpp: the torch
// side of the kernels in csrc/cuda/max_pool2d.cu), of the types and contract in
// csrc/backend_api/max_pool2d.h. Compiled only in CUDA builds; never included by a .cu file.
#pragma once

#include "backend_api/max_pool2d.h"

namespace cnnext {
namespace cuda {

backend_api::max_pool2d_forward max_pool2d_forward;
backend_api::max_pool2d_backward max_pool2d_backward;
backend_api::max_pool2d_select max_pool2d_select;
backend_api::max_unpool2d_forward max_unpool2d_forward;
backend_api::max_unpool2d_backward max_unpool2d_backward;

}  // namespace cuda
}  // namespace cnnext
