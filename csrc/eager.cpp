// cnnext._C.eager: direct Python entries to the ops of torch.ops.cnnext, for eager calls.
//
// Each entry calls its op through the typed dispatcher handle of csrc/ops/handles.h, so
// the call still goes through every dispatch key (Autograd, Python modes, fake tensors,
// tracing, CPU / CUDA). What it skips is torch.ops' per-call parse of the arguments
// against the schema: about 2.5 us of the 4.5 us a torch.ops call costs on a tiny
// tensor. cnnext/functional.py uses these entries only outside torch.compile and when no
// argument or mode asks for __torch_function__ (there it calls torch.ops.cnnext, which
// handles both). Errors and warnings are translated as torch's own bindings do, and the
// GIL is released while the op runs.
//
// The entries are the ops marked `eager` in csrc/ops/op_table.h, with the handles'
// signatures; `ops` (a tuple of their names) tells cnnext.functional which there are.
#include <torch/extension.h>

#include <cstdint>
#include <vector>

#include "eager.h"
#include "ops/handles.h"

namespace cnnext {
namespace {

// How a Python argument reaches a handle's parameter type T: as is, except int lists,
// which pybind11 reads into a std::vector<int64_t> (any sequence of ints).
template <class T>
struct Arg {
  using py = T;
  static T to_op(T v) { return v; }
};
template <>
struct Arg<c10::IntArrayRef> {
  using py = const std::vector<int64_t>&;
  static c10::IntArrayRef to_op(py v) { return v; }
};
template <>
struct Arg<c10::SymIntArrayRef> {
  using py = const std::vector<int64_t>&;
  static c10::SymIntArrayRef to_op(py v) { return c10::fromIntArrayRefSlow(v); }
};

// The entry of the op whose handle Handle() returns, of signature R(A...).
template <class Sig, const c10::TypedOperatorHandle<Sig>& (*Handle)()>
struct Entry;
template <class R, class... A, const c10::TypedOperatorHandle<R(A...)>& (*Handle)()>
struct Entry<R(A...), Handle> {
  static R call(typename Arg<A>::py... args) { return Handle().call(Arg<A>::to_op(args)...); }
};

}  // namespace

void bind_eager(pybind11::module_& parent) {
  auto m = parent.def_submodule(
      "eager", "Direct entries to torch.ops.cnnext's ops for eager calls (see csrc/eager.cpp).");
  pybind11::list names;
#define CNNEXT_ENTRY_internal(name)
#define CNNEXT_ENTRY_eager(name)                                                                    \
  m.def(#name, torch::wrap_pybind_function_no_gil(&Entry<op::sig::name, &op::name>::call)); \
  names.append(#name);
#define CNNEXT_ENTRY(name, entry, schema, ...) CNNEXT_ENTRY_##entry(name)
  CNNEXT_OPS(CNNEXT_ENTRY)
#undef CNNEXT_ENTRY
#undef CNNEXT_ENTRY_eager
#undef CNNEXT_ENTRY_internal
  m.attr("ops") = pybind11::tuple(names);
}

}  // namespace cnnext
