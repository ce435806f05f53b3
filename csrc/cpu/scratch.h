#pragma once
// Scratch memory of the calling thread, kept between calls and grown as needed.
//
// Buffers of megabytes allocated afresh on every call cost page faults comparable to the
// arithmetic of a small layer, so the kernels keep one buffer per (pool, slot) per thread.
// Each kernel file owns a pool (its slots are its own numbering). Growing a buffer keeps
// its old bytes and zero-fills the new ones (what std::vector<char>::resize did here
// before), so no caller sees a change in what the memory holds.
//
// Buffers of kHugeBytes or more are mapped on their own, on 2 MiB boundaries, and advised
// for transparent huge pages (Linux, where THP is "madvise" or "always"): they do not sit
// in malloc's heap at an address that depends on what the process allocated and freed
// before, and one TLB entry covers 2 MiB of them.
#include <cstddef>
#include <cstdint>

namespace cnnext {
namespace cpu {

enum class ScratchPool : int { Conv2d = 0, Sgemm = 1, Winograd = 2, TinyC = 3, Bf16 = 4, Count = 5 };
constexpr int kScratchSlots = 8;
constexpr size_t kHugeBytes = size_t(1) << 20;

// At least `bytes` bytes, 64-byte aligned, valid until the same thread asks the same
// (pool, slot) for more. slot must be in [0, kScratchSlots).
void* thread_scratch_bytes(ScratchPool pool, int slot, size_t bytes);

template <typename T = float>
T* thread_scratch(ScratchPool pool, int slot, int64_t elems) {
  const size_t n = elems > 0 ? size_t(elems) : size_t(1);
  return static_cast<T*>(thread_scratch_bytes(pool, slot, n * sizeof(T)));
}

// Bytes of scratch the calling thread holds (all pools), and how many of them are in
// regions advised for huge pages: for tests.
size_t thread_scratch_held();
size_t thread_scratch_huge_held();

}  // namespace cpu
}  // namespace cnnext
