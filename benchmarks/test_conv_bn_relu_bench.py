"""cnnext ConvBNReLU2d vs the stock torch triple Conv2d -> BatchNorm2d -> ReLU on CPU:
inference (eval mode, no grad) and a training step (train mode, forward + backward).

Run: python -m pytest benchmarks/test_conv_bn_relu_bench.py --benchmark-json=benchmarks/results/raw/cpu.json
then python benchmarks/report.py benchmarks/results/raw/cpu.json to print the ratios.
"""
import pytest
import torch
from torch import nn

import cnnext

# name: (N, C, H, W, out_channels, kernel, stride, padding)
SHAPES = {
    "resnet_layer": (8, 64, 56, 56, 64, 3, 1, 1),
    # a small layer (NiN's late sizes): the per-call costs (Python, autograd, fold) show
    "small_layer": (32, 16, 5, 5, 16, 3, 1, 1),
}


def make(name, impl, train):
    n, c, h, w, o, k, s, p = SHAPES[name]
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(c, o, k, s, p, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))
    model = cnnext.fuse(ref) if impl == "cnnext" else ref
    model.train(train)
    x = torch.randn(n, c, h, w, requires_grad=train)
    return model, x


@pytest.mark.parametrize("impl", ["cnnext", "torch"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_conv_bn_relu_inference(benchmark, name, impl):
    model, x = make(name, impl, False)
    benchmark.group = f"conv_bn_relu inference {name}"
    with torch.no_grad():
        out = benchmark(model, x)
    assert out.shape[1] == SHAPES[name][4]


@pytest.mark.parametrize("impl", ["cnnext", "torch"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_conv_bn_relu_train(benchmark, name, impl):
    model, x = make(name, impl, True)
    params = [x, *model.parameters()]
    grad = torch.randn_like(model(x).detach())

    def step():
        y = model(x)
        return torch.autograd.grad(y, params, grad)

    benchmark.group = f"conv_bn_relu train step {name}"
    grads = benchmark(step)
    assert grads[1].shape == params[1].shape
