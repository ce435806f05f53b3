// Entry points of the CPU average-pooling backend (csrc/cpu/avg_pool2d.cpp), of the types
// and contract in csrc/backend_api/avg_pool2d.h.
#pragma once

#include "backend_api/avg_pool2d.h"

namespace cnnext {
namespace cpu {

backend_api::avg_pool2d_forward avg_pool2d_forward;
backend_api::avg_pool2d_backward avg_pool2d_backward;

}  // namespace cpu
}  // namespace cnnext
