// A cache of tensors derived from other tensors (csrc/cpu/derived_cache.cpp): a weight with
// batch norm folded in, a Winograd-transformed weight. An entry is reused only while its
// sources are provably the ones it was made from, unchanged:
//   - the same tensors, alive (the entry holds weak references, so a freed tensor's address
//     cannot be reused by a new one while the entry exists), with the same dtype, sizes,
//     strides and data pointer;
//   - the same version counter value;
//   - the same bytes as a snapshot taken when the entry was made. Version counters miss
//     writes made through `.data` (`w.data.copy_(...)`, old-style EMA updates), so the
//     version alone proves nothing; the byte comparison is exact (NaN payloads included).
// The snapshot is taken on the second call that sees the same source versions: the first
// call's entry is pending (its value kept only as a buffer to overwrite, never returned as a
// hit). A weight in training, whose version every optimizer step moves on, so never costs a
// copy; a weight in evaluation is recomputed once more on the second call, then hits.
// A source that is itself a cached derived tensor (an output of some entry, which no user
// code can reach) is checked by identity and version only: it cannot change behind the
// cache's back.
//
// Sources may be undefined (an absent bias): absence is part of the key. Nothing is cached
// when a defined source is an inference tensor (no version counter), not a dense strided
// CPU tensor, or when the entry would take more than half the cache's budget; `get` then
// computes the value each call. Entries are dropped least recently used first past the
// budget, and when a source is freed.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

namespace cnnext {
namespace cpu {

class DerivedCache {
 public:
  // Computes the derived tensors; `reuse` holds the stale entry's tensors when the same
  // sources changed and no caller still holds them (to be overwritten in place), else is
  // empty.
  using Make = std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>& reuse)>;

  explicit DerivedCache(int64_t budget_bytes) : budget_(budget_bytes) {}

  // The derived tensors of `sources` under `tag` (the derivation's parameters: shapes,
  // tile, eps bits...): cached if valid, else made by `make` (and cached if cacheable).
  // The returned tensors must be treated as read-only. `hit`, if given, tells which.
  std::vector<at::Tensor> get(const std::vector<at::Tensor>& sources, const std::vector<int64_t>& tag,
                              const Make& make, bool* hit = nullptr);

  // Allocation for `make`: an ordinary tensor (with a version counter) even under
  // inference mode, so that the value can be cached and be another cache's source.
  static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options);
  static at::Tensor empty_strided(at::IntArrayRef sizes, at::IntArrayRef strides,
                                  const at::TensorOptions& options);

  int64_t entries();
  int64_t bytes();  // derived tensors and snapshots
  void clear();

 private:
  struct Source {
    std::optional<c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>> impl;
    const c10::TensorImpl* key = nullptr;  // null (and no impl): an undefined source
    uint32_t version = 0;
    at::Tensor snapshot;  // undefined for an undefined or derived source
  };
  struct Entry {
    std::vector<Source> sources;
    std::vector<int64_t> tag;
    std::vector<at::Tensor> values;
    int64_t bytes = 0;
    std::mutex mu;      // guards the checks against sources and `dead`
    bool dead = false;  // found stale: its buffers taken for reuse
    bool pending = false;  // sources seen once at these versions: no snapshot, never a hit
  };

  std::mutex mu_;
  std::list<std::shared_ptr<Entry>> entries_;  // most recently used first
  int64_t bytes_ = 0;
  const int64_t budget_;
};

// The process's cache of derived weights (512 MiB): the first element of each tag names
// the derivation.
enum WeightCacheTag : int64_t {
  kBnFoldTag = 1,             // (weight * scale, shift) of the fused op's inference
  kTransformedWeightTag = 2,  // Winograd's G g G^T in packed panels
  kFlippedTransformedWeightTag = 3,  // the same of the flipped, transposed weight (input gradient)
  kSplit5TransformedWeightTag = 4,   // a 5x5 weight split into four 3x3 ones, then transformed
  kSplit5FlippedTransformedWeightTag = 5,  // the same of its flipped, transposed weight
  kBf16DirectWeightTag = 6,  // the bfloat16 direct forward's weight in channel pairs, 32 channels a row
  kBf16DirectFlippedWeightTag = 7,  // the same of the flipped, transposed weight (input gradient)
};
DerivedCache& weight_cache();

}  // namespace cpu
}  // namespace cnnext
