"""cnnext vs stock torch max_pool2d (with indices) and max_unpool2d on CPU.

Run: python -m pytest benchmarks/test_max_pool2d_bench.py --benchmark-json=out.json
"""
import pytest
import torch
import torch.nn.functional as F

import cnnext

# name: (N, C, H, W, kernel, stride, padding)
MAX_POOL2D = {
    "alexnet_3x3s2": (32, 96, 54, 54, 3, 2, 0),
    "vgg_2x2s2": (32, 64, 112, 112, 2, 2, 0),
    "googlenet_3x3s1p1": (32, 192, 28, 28, 3, 1, 1),
}
POOL = {"cnnext": cnnext.functional.max_pool2d, "torch": F.max_pool2d}
UNPOOL = {"cnnext": cnnext.functional.max_unpool2d, "torch": F.max_unpool2d}


def make(name, requires_grad=False):
    n, c, h, w, k, s, p = MAX_POOL2D[name]
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(0), requires_grad=requires_grad)
    return x, k, s, p


@pytest.mark.parametrize("impl", list(POOL))
@pytest.mark.parametrize("name", list(MAX_POOL2D))
def test_max_pool2d_forward(benchmark, name, impl):
    x, k, s, p = make(name)
    benchmark.group = f"max_pool2d forward with indices {name}"
    with torch.no_grad():
        out, idx = benchmark(POOL[impl], x, k, s, p, return_indices=True)
    assert idx.dtype == torch.int64


@pytest.mark.parametrize("impl", list(POOL))
@pytest.mark.parametrize("name", list(MAX_POOL2D))
def test_max_pool2d_train(benchmark, name, impl):
    x, k, s, p = make(name, True)
    grad = torch.randn_like(POOL[impl](x, k, s, p).detach())
    benchmark.group = f"max_pool2d forward+backward {name}"
    gx, = benchmark(lambda: torch.autograd.grad(POOL[impl](x, k, s, p), x, grad))
    assert gx.shape == x.shape


@pytest.mark.parametrize("impl", list(UNPOOL))
@pytest.mark.parametrize("name", list(MAX_POOL2D))
def test_max_unpool2d_forward(benchmark, name, impl):
    x, k, s, p = make(name)
    y, idx = F.max_pool2d(x, k, s, p, return_indices=True)
    benchmark.group = f"max_unpool2d forward {name}"
    with torch.no_grad():
        out = benchmark(UNPOOL[impl], y, idx, k, s, p, output_size=x.shape[-2:])
    assert out.shape == x.shape


# channels_last input (groups named "... channels_last"; the groups above are NCHW).
@pytest.mark.parametrize("impl", list(POOL))
@pytest.mark.parametrize("name", list(MAX_POOL2D))
def test_max_pool2d_forward_channels_last(benchmark, name, impl):
    x, k, s, p = make(name)
    x = x.contiguous(memory_format=torch.channels_last)
    benchmark.group = f"max_pool2d forward with indices {name} channels_last"
    with torch.no_grad():
        out, idx = benchmark(POOL[impl], x, k, s, p, return_indices=True)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("impl", list(POOL))
@pytest.mark.parametrize("name", list(MAX_POOL2D))
def test_max_pool2d_train_channels_last(benchmark, name, impl):
    x, k, s, p = make(name)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    grad = torch.randn_like(POOL[impl](x, k, s, p).detach())
    benchmark.group = f"max_pool2d forward+backward {name} channels_last"
    gx, = benchmark(lambda: torch.autograd.grad(POOL[impl](x, k, s, p), x, grad))
    assert gx.shape == x.shape
