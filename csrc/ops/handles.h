// Typed dispatcher handles of the cnnext ops, one accessor per op of the table
// (csrc/ops/op_table.h): cnnext::op::conv2d().call(...) calls the op through every
// dispatch key, as torch.ops.cnnext.conv2d does, without parsing its arguments.
// Each handle is looked up once, on first use (the schemas are registered at load), and
// typed() checks the signature against the op's registered kernels.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include "ops/op_table.h"

namespace cnnext {
namespace op {

// sig::<name>: the function type of the op's handle.
namespace sig {
using namespace types;
#define CNNEXT_SIG(name, entry, schema, ...) using name = __VA_ARGS__;
CNNEXT_OPS(CNNEXT_SIG)
#undef CNNEXT_SIG
}  // namespace sig

#define CNNEXT_HANDLE(name, entry, schema, ...)                                               \
  inline const c10::TypedOperatorHandle<sig::name>& name() {                                 \
    static const auto h =                                                                    \
        c10::Dispatcher::singleton().findSchemaOrThrow("cnnext::" #name, "").typed<sig::name>(); \
    return h;                                                                                \
  }
CNNEXT_OPS(CNNEXT_HANDLE)
#undef CNNEXT_HANDLE

}  // namespace op
}  // namespace cnnext
