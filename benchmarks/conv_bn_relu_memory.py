"""Peak memory of one training step (forward + backward) of the ResNet layer
(8, 64, 56, 56), 64 -> 64 3x3: cnnext's ConvBNReLU2d against the stock torch triple.

    python benchmarks/conv_bn_relu_memory.py

Method: torch.profiler with profile_memory=True records every allocation and free of
torch's CPU allocator (kineto [memory] events, with their sizes and times). Summing them
in time order gives the bytes held by tensors allocated during the step; the peak of that
running sum is reported, along with what is held when the forward pass ends (the tensors
saved for backward plus the output; a 4-byte marker allocation finds that moment). Inputs and parameters, allocated before the step, are
not counted. Not seen by the profiler: cnnext's per-thread scratch buffers of the CPU
convolution (column and packed-panel buffers, allocated once per thread and kept between
calls, about 4 MiB per thread here), and torch's oneDNN scratchpads.
"""
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cnnext  # noqa: E402


def measure(model, x, grad):
    """(peak bytes during the step, bytes held between forward and backward)."""
    y = model(x)  # warm-up: thread-local buffers, lazy initialisation
    y.backward(grad)
    del y
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y = model(x)
        mark = torch.empty(1)  # a 4-byte allocation marking the end of the forward pass
        y.backward(grad)
        del y, mark
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    total = peak = after_forward = 0
    for _, nbytes in events:
        total += nbytes
        peak = max(peak, total)
        if nbytes == 4 and after_forward == 0 and total > 4:
            after_forward = total - 4
    return peak, after_forward


def main():
    torch.manual_seed(0)
    n, c, h, w = 8, 64, 56, 56
    x = torch.randn(n, c, h, w, requires_grad=True)
    grad = torch.randn(n, c, h, w)
    act = n * c * h * w * 4
    print(f"one activation (8, 64, 56, 56) float32 = {act / 2**20:.2f} MiB")
    for name, relu_inplace in (("torch triple (ReLU inplace=False)", False), ("torch triple (ReLU inplace=True)", True)):
        torch.manual_seed(0)
        ref = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=relu_inplace))
        peak, held = measure(ref, x, grad)
        print(f"{name:40s} peak {peak / 2**20:7.2f} MiB ({peak / act:.2f} activations), "
              f"held after forward {held / 2**20:7.2f} MiB ({held / act:.2f})")
    torch.manual_seed(0)
    ours = cnnext.nn.ConvBNReLU2d(c, c, 3, padding=1, bias=False)
    peak, held = measure(ours, x, grad)
    print(f"{'cnnext ConvBNReLU2d':40s} peak {peak / 2**20:7.2f} MiB ({peak / act:.2f} activations), "
          f"held after forward {held / 2**20:7.2f} MiB ({held / act:.2f})")


if __name__ == "__main__":
    main()
