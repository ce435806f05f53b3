// The Python extension module cnnext._C. Loading it registers the ops (TORCH_LIBRARY
// in csrc/ops/*.cpp); the module itself reports how it was built and holds the direct
// eager entries to the ops (cnnext._C.eager, csrc/eager.cpp) and the test-only entries
// (csrc/test_hooks.cpp: kernel-path counters, the CPU vector layer).
#include <torch/extension.h>
#include <pybind11/stl.h>
#include <torch/version.h>

#include "cpu/conv2d_winograd.h"
#include "cpu/derived_cache.h"
#include "cpu/output_alloc.h"
#include "eager.h"
#include "test_hooks.h"

#ifdef CNNEXT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict d;
#ifdef CNNEXT_WITH_CUDA
  d["cuda"] = true;
  d["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." +
                      std::to_string((CUDART_VERSION % 1000) / 10);
#else
  d["cuda"] = false;
  d["cuda_version"] = pybind11::none();
#endif
  d["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." +
                       std::to_string(TORCH_VERSION_MINOR) + "." +
                       std::to_string(TORCH_VERSION_PATCH);
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  d["compiler"] = "msvc " + std::to_string(_MSC_VER);
#endif
  d["cxx11_abi"] = bool(_GLIBCXX_USE_CXX11_ABI);
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "cnnext kernels; the ops live in torch.ops.cnnext";
  m.def("build_info", &build_info, "How this extension was built.");
  // The CPU Winograd switch and the weight cache (cnnext.backends.cpu).
  namespace wino = cnnext::cpu::winograd;
  m.def("_set_winograd", &wino::set_enabled);
  m.def("_get_winograd", &wino::enabled);
  m.def("_set_winograd_tile", &wino::set_forced_tile);
  m.def("_get_winograd_tile", &wino::forced_tile);
  m.def("_weight_cache_info", [] {
    return std::make_pair(cnnext::cpu::weight_cache().entries(), cnnext::cpu::weight_cache().bytes());
  });
  m.def("_clear_weight_cache", [] { cnnext::cpu::weight_cache().clear(); });
  m.def("_winograd_available", &wino::available);
  // Huge pages for large output tensors (cnnext.backends.cpu.huge_pages).
  m.def("_set_huge_pages", &cnnext::cpu::set_huge_pages);
  m.def("_get_huge_pages", &cnnext::cpu::huge_pages);
  m.def("_winograd_allowed_tiles", &wino::allowed_tiles);
  cnnext::bind_eager(m);
  cnnext::bind_test_hooks(m);
}
