"""cnnext vs stock torch conv2d on CPU, forward and forward+backward.

Run: python -m pytest benchmarks --benchmark-json=benchmarks/results/raw/cpu.json
then python benchmarks/report.py benchmarks/results/raw/cpu.json to print the ratios.
"""
import functools

import pytest
import torch
import torch.nn.functional as F

import cnnext
from shapes import CONV2D, CONV2D_NETWORKS

IMPLS = {"cnnext": cnnext.functional.conv2d, "torch": F.conv2d}


@functools.lru_cache(maxsize=None)
def make(shape, requires_grad):
    """The input, weight and bias of one shape, made once and shared by the cnnext and the
    torch benchmark, so that both read the same memory, as the pooling benchmarks do: on
    this VM a separately allocated copy of the same tensor can run slower or faster than
    another, depending on where its pages land (test_avg_pool2d_bench.py), which would
    otherwise show up in the ratio of the memory-bound layers (a ResNet's deep layers on
    small maps stream a weight of up to 9 MiB per call). Nothing writes to them: forwards
    run under no_grad and the backward benchmarks take gradients with torch.autograd.grad."""
    n, c, h, w, o, k, s, p = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=g, requires_grad=requires_grad)
    wt = torch.randn(o, c, k, k, generator=g, requires_grad=requires_grad)
    b = torch.randn(o, generator=g, requires_grad=requires_grad)
    return x, wt, b, s, p


def run_forward(benchmark, spec, group, impl):
    x, w, b, s, p = make(spec, False)
    fn = IMPLS[impl]
    benchmark.group = group
    with torch.no_grad():
        out = benchmark(fn, x, w, b, s, p)
    assert out.shape[1] == w.shape[0]


def run_train(benchmark, spec, group, impl):
    x, w, b, s, p = make(spec, True)
    fn = IMPLS[impl]
    grad = torch.randn_like(fn(x, w, b, s, p).detach())

    def step():
        y = fn(x, w, b, s, p)
        return torch.autograd.grad(y, (x, w, b), grad)

    benchmark.group = group
    grads = benchmark(step)
    assert grads[1].shape == w.shape


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("name", list(CONV2D))
def test_conv2d_forward(benchmark, name, impl):
    run_forward(benchmark, CONV2D[name], f"conv2d forward {name}", impl)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("name", list(CONV2D))
def test_conv2d_train(benchmark, name, impl):
    run_train(benchmark, CONV2D[name], f"conv2d forward+backward {name}", impl)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("name", list(CONV2D_NETWORKS))
def test_conv2d_network_forward(benchmark, name, impl):
    run_forward(benchmark, CONV2D_NETWORKS[name], f"conv2d network forward {name}", impl)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("name", list(CONV2D_NETWORKS))
def test_conv2d_network_train(benchmark, name, impl):
    run_train(benchmark, CONV2D_NETWORKS[name], f"conv2d network forward+backward {name}", impl)
