#include "cpu/scratch.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#define CNNEXT_SCRATCH_MMAP 1
#endif

namespace cnnext {
namespace cpu {
namespace {

constexpr size_t kAlign = 64;
constexpr size_t kHugePage = size_t(2) << 20;

struct Buffer {
  char* base = nullptr;  // what was allocated (mapping start or malloc pointer)
  char* data = nullptr;  // 64-byte aligned start handed out
  size_t cap = 0;        // usable bytes from data
  size_t held = 0;       // bytes held (mapping length or malloc size)
  bool mapped = false;
};

void release(Buffer& b) {
  if (!b.base) return;
#ifdef CNNEXT_SCRATCH_MMAP
  if (b.mapped) {
    munmap(b.base, b.held);
  } else {
    std::free(b.base);
  }
#else
  std::free(b.base);
#endif
  b = Buffer{};
}

// A new zero-filled buffer of at least `bytes` usable bytes.
Buffer make(size_t bytes) {
  Buffer b;
#ifdef CNNEXT_SCRATCH_MMAP
  if (bytes >= kHugeBytes) {
    // Round up to whole huge pages and map one extra so that the start can be moved to a
    // 2 MiB boundary; the unused head and tail are unmapped again.
    const size_t len = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* p = mmap(nullptr, len + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p != MAP_FAILED) {
      char* raw = static_cast<char*>(p);
      const uintptr_t a = reinterpret_cast<uintptr_t>(raw);
      char* aligned = raw + ((kHugePage - a % kHugePage) % kHugePage);
      const size_t head = size_t(aligned - raw), tail = kHugePage - head;
      if (head) munmap(raw, head);
      if (tail) munmap(aligned + len, tail);
#ifdef MADV_HUGEPAGE
      madvise(aligned, len, MADV_HUGEPAGE);  // advice only: a refusal leaves 4 KiB pages
#endif
      b.base = b.data = aligned;
      b.cap = b.held = len;
      b.mapped = true;
      return b;
    }
    // No mapping: fall through to malloc, which reports the failure the same way.
  }
#endif
  const size_t held = bytes + kAlign;
  char* p = static_cast<char*>(std::calloc(held, 1));
  TORCH_CHECK(p != nullptr, "cnnext: out of memory allocating ", bytes, " bytes of scratch");
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  b.base = p;
  b.data = p + ((kAlign - a % kAlign) % kAlign);
  b.cap = bytes;
  b.held = held;
  return b;
}

struct ThreadScratch {
  Buffer buf[int(ScratchPool::Count)][kScratchSlots];
  ~ThreadScratch() {
    for (auto& pool : buf)
      for (auto& b : pool) release(b);
  }
};

ThreadScratch& mine() {
  thread_local ThreadScratch s;
  return s;
}

}  // namespace

void* thread_scratch_bytes(ScratchPool pool, int slot, size_t bytes) {
  TORCH_INTERNAL_ASSERT(int(pool) >= 0 && int(pool) < int(ScratchPool::Count) && slot >= 0 &&
                        slot < kScratchSlots);
  Buffer& b = mine().buf[int(pool)][slot];
  if (b.cap < bytes) {
    Buffer n = make(bytes);
    if (b.data) std::memcpy(n.data, b.data, b.cap);
    release(b);
    b = n;
  }
  return b.data;
}

size_t thread_scratch_held() {
  size_t s = 0;
  for (auto& pool : mine().buf)
    for (auto& b : pool) s += b.held;
  return s;
}

size_t thread_scratch_huge_held() {
  size_t s = 0;
  for (auto& pool : mine().buf)
    for (auto& b : pool)
      if (b.mapped) s += b.held;
  return s;
}

}  // namespace cpu
}  // namespace cnnext
