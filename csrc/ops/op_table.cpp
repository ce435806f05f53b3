// The schemas of every cnnext op, from the table (csrc/ops/op_table.h). The one
// TORCH_LIBRARY block of the namespace: a second definition of an op anywhere fails at load.
#include <torch/library.h>

#include "ops/op_table.h"

TORCH_LIBRARY(cnnext, m) {
#define CNNEXT_DEF(name, entry, schema, ...) m.def(#name schema);
  CNNEXT_OPS(CNNEXT_DEF)
#undef CNNEXT_DEF
}
