// cnnext._C's test-only entries (csrc/test_hooks.cpp).
#pragma once

#include <torch/extension.h>

namespace cnnext {

void bind_test_hooks(pybind11::module_& m);

}  // namespace cnnext
