"""cnnext vs stock torch avg_pool2d / adaptive_avg_pool2d on CPU, forward and
forward+backward, NCHW and channels_last, on the pooling layers of the classic networks.

Run: python -m pytest benchmarks/test_avg_pool2d_bench.py --benchmark-json=benchmarks/results/raw/cpu.json
then python benchmarks/report.py benchmarks/results/raw/cpu.json to print the ratios.
"""
import functools

import pytest
import torch
import torch.nn.functional as F

import cnnext

# name: (input shape, kind, arguments); batch 32.
SHAPES = {
    # DenseNet-121 transition layers: avg_pool2d(2, 2) after the 1x1 convolution.
    "densenet_transition1": ((32, 128, 56, 56), "avg", dict(kernel_size=2, stride=2)),
    "densenet_transition2": ((32, 256, 28, 28), "avg", dict(kernel_size=2, stride=2)),
    # Inception branch pooling: avg_pool2d(3, stride=1, padding=1).
    "inception_branch": ((32, 192, 28, 28), "avg", dict(kernel_size=3, stride=1, padding=1)),
    # Global average pooling heads.
    "resnet_global": ((32, 512, 7, 7), "adaptive", dict(output_size=1)),
    "googlenet96_global": ((32, 1024, 3, 3), "adaptive", dict(output_size=1)),
    "nin_global": ((32, 10, 5, 5), "adaptive", dict(output_size=1)),
    "densenet_global_avg7": ((32, 1024, 7, 7), "avg", dict(kernel_size=7)),
}
IMPLS = {
    "cnnext": {"avg": cnnext.functional.avg_pool2d, "adaptive": cnnext.functional.adaptive_avg_pool2d},
    "torch": {"avg": F.avg_pool2d, "adaptive": F.adaptive_avg_pool2d},
}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


@functools.lru_cache(maxsize=None)
def make(name, layout, requires_grad):
    """The input of one shape and layout, made once and shared by the cnnext and the
    torch benchmark: both read the same memory. These pooling layers are bound by
    memory, and on this VM a separately allocated copy of the same tensor can run
    1.5-2x slower or faster than another (where its pages land in the shared L3), which
    otherwise shows up in the ratio."""
    shape, kind, kw = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).contiguous(memory_format=LAYOUTS[layout]).requires_grad_(requires_grad)
    return x, kind, kw


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(SHAPES))
def test_avg_pool2d_forward(benchmark, name, layout, impl):
    x, kind, kw = make(name, layout, False)
    fn = IMPLS[impl][kind]
    benchmark.group = f"{kind} avg_pool2d forward {name} {layout}"
    with torch.no_grad():
        out = benchmark(fn, x, **kw)
    assert out.shape[:2] == x.shape[:2]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(SHAPES))
def test_avg_pool2d_train(benchmark, name, layout, impl):
    x, kind, kw = make(name, layout, True)
    fn = IMPLS[impl][kind]
    grad = torch.randn_like(fn(x, **kw).detach())

    def step():
        return torch.autograd.grad(fn(x, **kw), x, grad)

    benchmark.group = f"{kind} avg_pool2d forward+backward {name} {layout}"
    (gx,) = benchmark(step)
    assert gx.shape == x.shape
