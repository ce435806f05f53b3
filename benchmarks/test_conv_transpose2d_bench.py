"""cnnext vs stock torch conv_transpose2d on CPU, forward and forward+backward.

Run: python -m pytest benchmarks/test_conv_transpose2d_bench.py --benchmark-json=benchmarks/results/raw/cpu.json
then python benchmarks/report.py benchmarks/results/raw/cpu.json to print the ratios.
"""
import pytest
import torch
import torch.nn.functional as F

import cnnext
from shapes import CONV_TRANSPOSE2D

IMPLS = {"cnnext": cnnext.functional.conv_transpose2d, "torch": F.conv_transpose2d}


def make(shape, requires_grad):
    n, c, h, w, o, k, s, p, op = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=g, requires_grad=requires_grad)
    wt = torch.randn(c, o, k, k, generator=g, requires_grad=requires_grad)
    b = torch.randn(o, generator=g, requires_grad=requires_grad)
    return x, wt, b, s, p, op


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("name", list(CONV_TRANSPOSE2D))
def test_conv_transpose2d_forward(benchmark, name, impl):
    x, w, b, s, p, op = make(CONV_TRANSPOSE2D[name], False)
    fn = IMPLS[impl]
    benchmark.group = f"conv_transpose2d forward {name}"
    with torch.no_grad():
        out = benchmark(fn, x, w, b, s, p, op)
    assert out.shape[1] == w.shape[1] and out.shape[2] == 2 * x.shape[2]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("name", list(CONV_TRANSPOSE2D))
def test_conv_transpose2d_train(benchmark, name, impl):
    x, w, b, s, p, op = make(CONV_TRANSPOSE2D[name], True)
    fn = IMPLS[impl]
    grad = torch.randn_like(fn(x, w, b, s, p, op).detach())

    def step():
        y = fn(x, w, b, s, p, op)
        return torch.autograd.grad(y, (x, w, b), grad)

    benchmark.group = f"conv_transpose2d forward+backward {name}"
    grads = benchmark(step)
    assert grads[1].shape == w.shape
