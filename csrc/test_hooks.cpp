// Test-only entries of cnnext._C (underscore names, no stability promise): the kernel-path
// counters (csrc/paths.h), the CPU instruction-set level (csrc/cpu/cpu_features.h) and the
// bfloat16 / float16 conversions and dot product of the vector layer (csrc/cpu/vec.h),
// which tests compare with torch bit for bit, the op table (csrc/ops/op_table.h) and the
// calling thread's kernel scratch (csrc/cpu/scratch.h).
#include "test_hooks.h"

#include "cpu/conv2d_bf16.h"
#include "cpu/cpu_features.h"
#include "cpu/scratch.h"
#include "cpu/vec.h"
#include "ops/handles.h"
#include "paths.h"

namespace cnnext {
namespace {

void check_cpu(const at::Tensor& t, at::ScalarType want, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == want && t.dim() == 1, name,
              ": expected a 1-D CPU tensor of ", want, ", got ", t.scalar_type(), " of ",
              t.dim(), " dims on ", t.device());
}

// float32 -> bfloat16 / float16 through the vector layer's narrowing.
at::Tensor vec_narrow(const at::Tensor& x, at::ScalarType to) {
  check_cpu(x, at::kFloat, "_vec_narrow");
  TORCH_CHECK(to == at::kBFloat16 || to == at::kHalf, "_vec_narrow: expected bfloat16 or float16");
  const at::Tensor in = x.contiguous();
  at::Tensor out = at::empty({x.numel()}, x.options().dtype(to));
  auto* o = reinterpret_cast<uint16_t*>(out.data_ptr());
  if (to == at::kBFloat16)
    cpu::vec::float_to_bf16(in.const_data_ptr<float>(), o, in.numel());
  else
    cpu::vec::float_to_fp16(in.const_data_ptr<float>(), o, in.numel());
  return out;
}

// bfloat16 / float16 -> float32 through the vector layer's widening.
at::Tensor vec_widen(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "_vec_widen: expected bfloat16 or float16, got ", x.scalar_type());
  check_cpu(x, x.scalar_type(), "_vec_widen");
  const at::Tensor in = x.contiguous();
  at::Tensor out = at::empty({x.numel()}, x.options().dtype(at::kFloat));
  const auto* i = reinterpret_cast<const uint16_t*>(in.const_data_ptr());
  if (x.scalar_type() == at::kBFloat16)
    cpu::vec::bf16_to_float(i, out.mutable_data_ptr<float>(), in.numel());
  else
    cpu::vec::fp16_to_float(i, out.mutable_data_ptr<float>(), in.numel());
  return out;
}

double vec_dot_bf16(const at::Tensor& a, const at::Tensor& b) {
  check_cpu(a, at::kBFloat16, "_vec_dot_bf16");
  check_cpu(b, at::kBFloat16, "_vec_dot_bf16");
  TORCH_CHECK(a.numel() == b.numel(), "_vec_dot_bf16: expected equal sizes");
  const at::Tensor x = a.contiguous(), y = b.contiguous();
  return cpu::vec::dot_bf16(reinterpret_cast<const uint16_t*>(x.const_data_ptr()),
                            reinterpret_cast<const uint16_t*>(y.const_data_ptr()), x.numel());
}

// The op table: (qualified name, schema, entry) per op. Looks up every typed handle
// first, so a signature in the table that disagrees with the op's kernels raises here.
pybind11::list op_table() {
  pybind11::list rows;
#define CNNEXT_ROW(name, entry, schema, ...) \
  (void)op::name();                          \
  rows.append(pybind11::make_tuple("cnnext::" #name, "cnnext::" #name schema, #entry));
  CNNEXT_OPS(CNNEXT_ROW)
#undef CNNEXT_ROW
  return rows;
}

// Each kernel path's requirement (csrc/paths.h): name -> (what it needs, whether this CPU,
// under the CNNEXT_CPU_ISA cap, offers it).
pybind11::dict path_needs() {
  const cpu::CpuFeatures& f = cpu::cpu_features();
  pybind11::dict out;
  for (const auto& [name, needs] : paths::needs()) {
    const char* what = "nothing";
    bool ok = true;
    switch (needs) {
      case paths::Needs::kNothing: break;
      case paths::Needs::kAvx2: what = "avx2"; ok = f.has(cpu::Isa::kAvx2); break;
      case paths::Needs::kAvx512F: what = "avx512f"; ok = f.avx512f_fma(); break;
      case paths::Needs::kAvx512: what = "avx512"; ok = f.has(cpu::Isa::kAvx512); break;
      case paths::Needs::kAvx512Bf16:
        what = "avx512_bf16";
        ok = f.avx512_bf16 && f.has(cpu::Isa::kAvx512);
        break;
    }
    out[pybind11::str(name)] = pybind11::make_tuple(what, ok);
  }
  return out;
}

}  // namespace

void bind_test_hooks(pybind11::module_& m) {
  m.def("_path_counts", &paths::counts,
        "Kernel-path counters (csrc/paths.h): name -> kernel calls that took the path since "
        "load or the last reset. For tests; see cnnext/_paths.py.");
  m.def("_path_needs", &path_needs,
        "Kernel paths' requirements (csrc/paths.h): name -> (instruction set the path needs, "
        "or 'nothing'; whether this CPU under CNNEXT_CPU_ISA offers it). For tests.");
  m.def("_reset_path_counts", &paths::reset, "Sets every kernel-path counter to 0.");
  m.def("_cpu_isa", &cpu::cpu_isa_name,
        "The CPU instruction-set level the kernels use: avx512, avx2 or scalar "
        "(csrc/cpu/cpu_features.h; capped by the environment variable CNNEXT_CPU_ISA).");
  m.def("_vec_narrow", &vec_narrow, "float32 1-D -> bfloat16 / float16 via csrc/cpu/vec.h (tests).");
  m.def("_vec_widen", &vec_widen, "bfloat16 / float16 1-D -> float32 via csrc/cpu/vec.h (tests).");
  m.def("_vec_dot_bf16", &vec_dot_bf16, "dot product of two bfloat16 1-D tensors via csrc/cpu/vec.h (tests).");
  m.def("_set_bf16_direct", &cpu::bf16::set_direct_enabled,
        "Turns the bfloat16 direct forward (AVX512_BF16) on or off (tests: the GEMM path's results).");
  m.def("_get_bf16_direct", &cpu::bf16::direct_enabled);
  m.def("_scratch_held", [] { return pybind11::make_tuple(cpu::thread_scratch_held(), cpu::thread_scratch_huge_held()); },
        "(bytes, bytes in huge-page-advised mappings) of kernel scratch the calling thread "
        "holds (csrc/cpu/scratch.h; tests).");
  m.def("_op_table", &op_table,
        "The op table (csrc/ops/op_table.h): (name, schema, entry) per op, entry 'eager' or "
        "'internal'; every typed handle is looked up (and its signature checked) first.");
}

}  // namespace cnnext
