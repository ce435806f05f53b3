// cnnext._C.eager (csrc/eager.cpp): direct Python entries to the ops for eager calls.
#pragma once

#include <torch/extension.h>

namespace cnnext {

// Adds the submodule "eager" to the extension module.
void bind_eager(pybind11::module_& parent);

}  // namespace cnnext
