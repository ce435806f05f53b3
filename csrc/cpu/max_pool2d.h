// Entry points of the CPU max-pooling backend (csrc/cpu/max_pool2d_*.cpp,
// csrc/cpu/max_unpool2d.cpp), of the types and contract in csrc/backend_api/max_pool2d.h.
#pragma once

#include "backend_api/max_pool2d.h"

namespace cnnext {
namespace cpu {

backend_api::max_pool2d_forward max_pool2d_forward;
backend_api::max_pool2d_backward max_pool2d_backward;
backend_api::max_pool2d_select max_pool2d_select;
backend_api::max_unpool2d_forward max_unpool2d_forward;
backend_api::max_unpool2d_backward max_unpool2d_backward;

}  // namespace cpu
}  // namespace cnnext
