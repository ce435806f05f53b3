// See output_alloc.h.
#include "cpu/output_alloc.h"

#include <atomic>
#include <cstdint>

#include "paths.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace cnnext {
namespace cpu {
namespace {

// One count per output advised for huge pages (whatever the kernel then does with it).
CNNEXT_PATH(kHugeOutput, "cpu.output.huge_pages");

std::atomic<bool> g_huge{true};

// Outputs of at least this many bytes are advised (one whole 2 MiB page or more inside).
constexpr size_t kHugeOutputBytes = size_t(4) << 20;

}  // namespace

void set_huge_pages(bool on) { g_huge.store(on); }
bool huge_pages() { return g_huge.load(); }

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t bytes = size_t(t.nbytes());
  if (bytes >= kHugeOutputBytes && t.device().is_cpu() && g_huge.load(std::memory_order_relaxed)) {
    constexpr uintptr_t kPage = uintptr_t(1) << 21;
    const uintptr_t a = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t lo = (a + kPage - 1) & ~(kPage - 1), hi = (a + bytes) & ~(kPage - 1);
    if (hi > lo) {
      // Advice only: a refusal (EINVAL without THP) leaves 4 KiB pages, nothing else.
      madvise(reinterpret_cast<void*>(lo), size_t(hi - lo), MADV_HUGEPAGE);
      kHugeOutput.hit();
    }
  }
#endif
  return t;
}

}  // namespace cpu
}  // namespace cnnext
