#pragma once
// Output tensors of the CPU kernels (outputs, indices, input gradients): at::empty, and
// where the tensor is 4 MiB or more, its memory advised for transparent huge pages before
// anything touches it.
//
// A fresh tensor of many megabytes comes from malloc as newly mapped memory, and its first
// write faults in one 4 KiB page at a time: on this project's 2-core Zen 3 VM, allocating
// and filling 103 MB (a VGG max-pool gradient at batch 32) took 69 ms, of which the fill
// alone was 10 ms. Advised for huge pages (Linux, THP "madvise" or "always"), the same took
// 13 ms: 2 MiB a fault (its channels_last backward: 42 -> 13 ms, its forward's output and
// indices: 24-33 -> 11-12 ms). ResNet-18's training step (outputs of 6-26 MB) did not
// change beyond the noise (440-475 ms either way). Stock torch does the same where
// THP_MEM_ALLOC_ENABLE=1 is set (c10's allocator then advises its own allocations). The advice covers the whole 2 MiB pages inside the tensor only; it
// changes no value and nothing in the tensor's storage (a plain CPU allocation, freed as
// any). Where the kernel refuses it (THP "never", no THP) pages stay 4 KiB.
//
// Switch: cnnext.backends.cpu.huge_pages (default True).
#include <ATen/ATen.h>

namespace cnnext {
namespace cpu {

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

void set_huge_pages(bool on);
bool huge_pages();

}  // namespace cpu
}  // namespace cnnext
