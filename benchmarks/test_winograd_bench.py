"""The 3x3 stride-1 layers of issue 15's table (batch 8), side by side: cnnext as chosen
(Winograd where the shape pays), cnnext's GEMM path (cnnext.backends.cpu.winograd off) and
stock torch; forward, and forward + backward.

Run: python -m pytest benchmarks/test_winograd_bench.py --benchmark-json=benchmarks/results/raw/wino.json
"""
import math

import pytest
import torch
import torch.nn.functional as F

import cnnext
import cnnext.backends.cpu as cpu_backend

# name: (N, C, H, W, out_channels)
WINOGRAD_LAYERS = {
    "3x3_64x56": (8, 64, 56, 56, 64),
    "3x3_128x28": (8, 128, 28, 28, 128),
    "3x3_256x14": (8, 256, 14, 14, 256),
    "3x3_512x7": (8, 512, 7, 7, 512),
    "3x3_256x56": (8, 256, 56, 56, 256),
}
IMPLS = ["cnnext", "cnnext_gemm", "torch"]


def make(shape, requires_grad):
    n, c, h, w, o = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=g).requires_grad_(requires_grad)
    wt = (torch.randn(o, c, 3, 3, generator=g) * math.sqrt(2.0 / (9 * c))).requires_grad_(requires_grad)
    b = torch.randn(o, generator=g).requires_grad_(requires_grad)
    return x, wt, b


def call(impl, x, w, b):
    if impl == "torch":
        return F.conv2d(x, w, b, 1, 1)
    with cpu_backend.flags(winograd=impl == "cnnext"):
        return cnnext.functional.conv2d(x, w, b, 1, 1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(WINOGRAD_LAYERS))
def test_winograd_forward(benchmark, name, impl):
    x, w, b = make(WINOGRAD_LAYERS[name], False)
    benchmark.group = f"winograd forward {name}"
    with torch.no_grad():
        out = benchmark(call, impl, x, w, b)
    assert out.shape[1] == w.shape[0]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(WINOGRAD_LAYERS))
def test_winograd_train(benchmark, name, impl):
    x, w, b = make(WINOGRAD_LAYERS[name], True)
    gy = torch.randn_like(call("torch", x, w, b).detach())

    def step():
        # The switch around the backward too: cnnext_gemm's gradients are the GEMM's.
        with cpu_backend.flags(winograd=impl == "cnnext"):
            return torch.autograd.grad(call(impl, x, w, b), (x, w, b), gy)

    benchmark.group = f"winograd forward+backward {name}"
    grads = benchmark(step)
    assert grads[1].shape == w.shape
