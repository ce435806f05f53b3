// Argument checks and argument shaping shared by every op. Each failure names the op,
// the argument, what was expected and what came in.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <sstream>
#include <string>
#include <utility>

namespace cnnext {

inline std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < sizes.size(); ++i) os << (i ? ", " : "") << sizes[i];
  os << "]";
  return os.str();
}

// Floating dtypes both backends compute in (float16 / bfloat16 accumulate in float).
inline bool backend_supports(const at::Tensor& t) {
  const auto st = t.scalar_type();
  return st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16;
}

// A dtype the backend has no kernel for: NotImplementedError, as torch's dtype dispatch raises.
inline void check_dtype_supported(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_NOT_IMPLEMENTED(backend_supports(t), op, ": expected ", name,
                              " to be float16, bfloat16, float32 or float64, got ", t.scalar_type(), " on ",
                              t.device());
}

// `other` must match `ref` (named ref_name) in dtype and device (RuntimeError, as torch's
// "expected scalar type Float but found Double").
inline void check_same_dtype_device(const char* op, const char* ref_name, const at::Tensor& ref,
                                    const char* name, const at::Tensor& other) {
  TORCH_CHECK(other.device() == ref.device(), op, ": expected ", name,
              " to be on the same device as ", ref_name, " (", ref.device(), "), got ",
              other.device());
  TORCH_CHECK(other.scalar_type() == ref.scalar_type(), op, ": expected ", name,
              " to have the same dtype as ", ref_name, " (", ref.scalar_type(), "), got ",
              other.scalar_type());
}

// A list argument of exactly two entries, each at least `min_value`.
inline void check_pair(const char* op, const char* name, at::IntArrayRef v, int64_t min_value) {
  TORCH_CHECK(v.size() == 2, op, ": expected ", name, " to be a single integer or a pair, got ",
              v.size(), " values ", shape_str(v));
  for (int64_t x : v) {
    TORCH_CHECK(x >= min_value, op, ": expected ", name, " to be ",
                min_value == 0 ? "non-negative" : "at least 1", ", got ", shape_str(v));
  }
}

// Accepts (C, H, W) as a batch of one; returns the 4-D view and whether it was batched.
inline std::pair<at::Tensor, bool> as_batch(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 3 || t.dim() == 4, op, ": expected ", name,
              " to be 3-D (C, H, W) or 4-D (N, C, H, W), got ", t.dim(), "-D tensor of shape ",
              shape_str(t.sizes()));
  return {t.dim() == 3 ? t.unsqueeze(0) : t, t.dim() == 4};
}

// Output layout: channels_last when a 4-D operand's strides suggest channels_last, as
// torch decides (Tensor::suggest_memory_format: a sliced or otherwise non-dense channels_last
// tensor counts, and so does a channels_last one that is also plain contiguous, e.g. one
// channel); cnnext/_shapes.py states the same rule for fake kernels. Unbatched input counts
// only through the weight. A tensor batched by torch.vmap has no memory format of its own
// (its samples are views): it counts as contiguous (the autograd nodes ask on vmap's
// tensors under jacrev).
inline at::MemoryFormat layout_of(std::initializer_list<at::Tensor> operands) {
  for (const at::Tensor& t : operands) {
    if (t.key_set().has(c10::DispatchKey::FuncTorchBatched)) continue;
    if (t.dim() == 4 && t.suggest_memory_format() == at::MemoryFormat::ChannelsLast)
      return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

inline at::Tensor unbatch(const at::Tensor& t, bool batched) { return batched ? t : t.squeeze(0); }

}  // namespace cnnext
