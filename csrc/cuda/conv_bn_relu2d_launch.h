// Entry points of the CUDA conv_bn_relu2d backend (csrc/cuda/conv_bn_relu2d_launch.cpp):
// training mode, of the types and contract in csrc/backend_api/conv_bn_relu2d.h (inference
// folds the batch norm with at:: ops and runs conv2d_forward). Compiled only in CUDA
// builds; never included by a .cu file.
#pragma once

#include "backend_api/conv_bn_relu2d.h"

namespace cnnext {
namespace cuda {

backend_api::conv_bn_relu2d_train conv_bn_relu2d_train;
backend_api::conv_bn_relu2d_train_backward conv_bn_relu2d_train_backward;

}  // namespace cuda
}  // namespace cnnext
