#include "cpu/derived_cache.h"

#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <atomic>
#include <cstring>

namespace cnnext {
namespace cpu {

namespace {

using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

// The outputs of every cache's entries: tensors no user code can reach, so a cache whose
// source is one of them needs no snapshot of it.
struct Derived {
  std::mutex mu;
  std::vector<std::pair<WeakImpl, const c10::TensorImpl*>> outputs;
};

Derived& derived() {
  static Derived* d = new Derived();  // never destroyed: no order problems at exit
  return *d;
}

void register_outputs(const std::vector<at::Tensor>& values) {
  if (std::any_of(values.begin(), values.end(), [](const at::Tensor& v) { return v.defined() && v.is_inference(); }))
    return;
  Derived& d = derived();
  std::lock_guard<std::mutex> lock(d.mu);
  d.outputs.erase(std::remove_if(d.outputs.begin(), d.outputs.end(), [](const auto& o) { return o.first.expired(); }),
                  d.outputs.end());
  for (const at::Tensor& v : values)
    if (v.defined()) d.outputs.emplace_back(WeakImpl(v.getIntrusivePtr()), v.unsafeGetTensorImpl());
}

bool is_derived(const at::Tensor& t) {
  Derived& d = derived();
  std::lock_guard<std::mutex> lock(d.mu);
  for (const auto& o : d.outputs)
    if (o.second == t.unsafeGetTensorImpl() && !o.first.expired()) return true;
  return false;
}

bool cacheable(const at::Tensor& t) {
  return !t.defined() || (!t.is_inference() && t.is_cpu() && t.layout() == at::kStrided && t.has_storage() &&
                          t.is_non_overlapping_and_dense());
}

uint32_t version_of(const at::Tensor& t) { return t.unsafeGetTensorImpl()->version_counter().current_version(); }

// Whether the dense spans of a and b (same dtype, sizes and strides) hold the same bytes.
bool same_bytes(const at::Tensor& a, const at::Tensor& b) {
  const auto* pa = static_cast<const unsigned char*>(a.const_data_ptr());
  const auto* pb = static_cast<const unsigned char*>(b.const_data_ptr());
  const int64_t n = a.numel() * int64_t(a.element_size());
  if (pa == pb) return true;
  constexpr int64_t kChunk = int64_t(1) << 18;
  if (n <= 4 * kChunk) return std::memcmp(pa, pb, size_t(n)) == 0;
  std::atomic<bool> same{true};
  at::parallel_for(0, (n + kChunk - 1) / kChunk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end && same.load(std::memory_order_relaxed); ++c) {
      const int64_t off = c * kChunk, len = std::min(kChunk, n - off);
      if (std::memcmp(pa + off, pb + off, size_t(len)) != 0) same.store(false, std::memory_order_relaxed);
    }
  });
  return same.load();
}

int64_t nbytes(const at::Tensor& t) { return t.defined() ? t.numel() * int64_t(t.element_size()) : 0; }

}  // namespace

std::vector<at::Tensor> DerivedCache::get(const std::vector<at::Tensor>& sources, const std::vector<int64_t>& tag,
                                          const Make& make, bool* hit) {
  if (hit) *hit = false;
  if (!std::all_of(sources.begin(), sources.end(), cacheable)) {
    // Not kept, but still private: a cache taking one as its source needs no snapshot.
    std::vector<at::Tensor> values = make({});
    register_outputs(values);
    return values;
  }

  // The entry of these sources (by identity) and tag, if any.
  auto same_identity = [&](const Entry& e) {
    if (e.tag != tag || e.sources.size() != sources.size()) return false;
    for (size_t i = 0; i < sources.size(); ++i) {
      const at::Tensor& s = sources[i];
      const Source& r = e.sources[i];
      if (r.key != (s.defined() ? s.unsafeGetTensorImpl() : nullptr)) return false;
      if (r.key && r.impl->expired()) return false;
    }
    return true;
  };
  std::shared_ptr<Entry> found;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = entries_.begin(); it != entries_.end();) {
      const bool gone = std::any_of((*it)->sources.begin(), (*it)->sources.end(),
                                    [](const Source& r) { return r.key && r.impl->expired(); });
      if (gone) {  // a source freed: the entry can never match again
        bytes_ -= (*it)->bytes;
        it = entries_.erase(it);
        continue;
      }
      if (!found && same_identity(**it)) {
        found = *it;
        entries_.splice(entries_.begin(), entries_, it++);
        continue;
      }
      ++it;
    }
  }
  auto unchanged = [&](const Entry& e) {
    for (size_t i = 0; i < sources.size(); ++i) {
      const at::Tensor& s = sources[i];
      const Source& r = e.sources[i];
      if (!s.defined()) continue;
      if (r.version != version_of(s)) return false;
      if (!r.snapshot.defined()) continue;  // a derived source: identity and version suffice
      if (r.snapshot.scalar_type() != s.scalar_type() || r.snapshot.sizes() != s.sizes() ||
          r.snapshot.strides() != s.strides() || !same_bytes(r.snapshot, s))
        return false;
    }
    return true;
  };
  auto same_versions = [&](const Entry& e) {
    for (size_t i = 0; i < sources.size(); ++i)
      if (sources[i].defined() && e.sources[i].version != version_of(sources[i])) return false;
    return true;
  };
  // Under the entry's own lock: a concurrent call that finds the entry stale takes its
  // buffers to overwrite (below) only under the same lock, after marking it dead.
  std::vector<at::Tensor> reuse, old_snapshots;
  bool seen_this_version = false;  // a pending entry of these very versions: a second sighting
  if (found) {
    std::lock_guard<std::mutex> entry_lock(found->mu);
    if (!found->dead && !found->pending && unchanged(*found)) {
      if (hit) *hit = true;
      return found->values;
    }
    if (!found->dead) {
      found->dead = true;
      seen_this_version = found->pending && same_versions(*found);
      reuse = std::move(found->values);
      for (Source& r : found->sources) old_snapshots.push_back(std::move(r.snapshot));
    }
  }
  if (found) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = std::find(entries_.begin(), entries_.end(), found);
    if (it != entries_.end()) {
      bytes_ -= found->bytes;
      entries_.erase(it);
    }
  }
  // A buffer some caller still holds (a hit's copy) is not overwritten.
  if (!std::all_of(reuse.begin(), reuse.end(), [](const at::Tensor& t) { return t.use_count() == 1; }))
    reuse.clear();

  // Snapshots are taken only on the second sighting of the same source versions. A source
  // whose version moves on between calls (a weight in training: every optimizer step bumps
  // it) then never costs a copy; the entry stays pending (its buffers kept for reuse, never
  // returned as a hit) until two calls in a row see the same versions (evaluation), and the
  // second of them recomputes the value and snapshots the sources it was computed from.
  const bool needs_snapshot = std::any_of(sources.begin(), sources.end(),
                                          [](const at::Tensor& s) { return s.defined() && !is_derived(s); });
  auto e = std::make_shared<Entry>();
  e->tag = tag;
  e->pending = needs_snapshot && !seen_this_version;
  for (size_t i = 0; i < sources.size(); ++i) {
    const at::Tensor& s = sources[i];
    Source r;
    if (s.defined()) {
      r.impl = WeakImpl(s.getIntrusivePtr());
      r.key = s.unsafeGetTensorImpl();
      r.version = version_of(s);
      if (!e->pending && !is_derived(s)) {
        const at::Tensor old = i < old_snapshots.size() ? old_snapshots[i] : at::Tensor();
        const bool fits = old.defined() && old.use_count() == 2  /* old_snapshots and old */ && old.scalar_type() == s.scalar_type() &&
                          old.sizes() == s.sizes() && old.strides() == s.strides();
        r.snapshot = fits ? old : empty_strided(s.sizes(), s.strides(), s.options());
        if (nbytes(s) > 0) std::memcpy(r.snapshot.mutable_data_ptr(), s.const_data_ptr(), size_t(nbytes(s)));
        e->bytes += nbytes(r.snapshot);
      }
    }
    e->sources.push_back(std::move(r));
  }
  old_snapshots.clear();
  const std::vector<at::Tensor> values = make(reuse);
  // A reused buffer now holds a new value: its version moves on, so that a cache holding it
  // as a (derived, unsnapshotted) source sees the change.
  for (const at::Tensor& v : values)
    if (v.defined() && !v.is_inference()) v.unsafeGetTensorImpl()->bump_version();
  for (const at::Tensor& v : values) e->bytes += nbytes(v);
  if (e->bytes > budget_ / 2 ||
      std::any_of(values.begin(), values.end(), [](const at::Tensor& v) { return v.defined() && v.is_inference(); }))
    return values;
  e->values = values;
  register_outputs(values);
  std::lock_guard<std::mutex> lock(mu_);
  entries_.push_front(std::move(e));
  bytes_ += entries_.front()->bytes;
  while (bytes_ > budget_ && !entries_.empty()) {
    bytes_ -= entries_.back()->bytes;
    entries_.pop_back();
  }
  return values;
}

at::Tensor DerivedCache::empty_strided(at::IntArrayRef sizes, at::IntArrayRef strides,
                                       const at::TensorOptions& options) {
  c10::InferenceMode normal_tensors(false);
  return at::empty_strided(sizes, strides, options);
}

at::Tensor DerivedCache::empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  c10::InferenceMode normal_tensors(false);
  return at::empty(sizes, options);
}

DerivedCache& weight_cache() {
  static DerivedCache* c = new DerivedCache(int64_t(512) << 20);  // never destroyed
  return *c;
}

int64_t DerivedCache::entries() {
  std::lock_guard<std::mutex> lock(mu_);
  return int64_t(entries_.size());
}

int64_t DerivedCache::bytes() {
  std::lock_guard<std::mutex> lock(mu_);
  return bytes_;
}

void DerivedCache::clear() {
  std::lock_guard<std::mutex> lock(mu_);
  entries_.clear();
  bytes_ = 0;
}

}  // namespace cpu
}  // namespace cnnext
