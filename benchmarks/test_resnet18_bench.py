"""Issue 15's network goals: ResNet-18 at 224x224, batch 8, 3 input channels, 10 classes,
cnnext against stock torch.nn with the same weights:

- evaluation (no grad), NCHW: cnnext, stock, and stock compiled by torch.compile
  (``torch_compile``; compiled once in the benchmark's setup);
- evaluation with model and input in channels_last, both sides (stock's best eager layout);
- a training step (forward, cross-entropy, backward, SGD with momentum);
- the convolutions of ResNet-18 in channels_last (batch 8, forward), both sides.

Run: python -m pytest benchmarks/test_resnet18_bench.py --benchmark-json=benchmarks/results/raw/resnet18.json
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import cnnext
from cnnext import models

BATCH, SIZE = 8, 224
CL = torch.channels_last

# The convolutions of ResNet-18 at 224x224, batch 8: name: (N, C, H, W, O, kernel, stride, padding)
RESNET18_CONVS = {
    "stem_7x7s2": (8, 3, 224, 224, 64, 7, 2, 3),
    "l1_3x3": (8, 64, 56, 56, 64, 3, 1, 1),
    "l2_down_3x3s2": (8, 64, 56, 56, 128, 3, 2, 1),
    "l2_3x3": (8, 128, 28, 28, 128, 3, 1, 1),
    "l2_shortcut_1x1s2": (8, 64, 56, 56, 128, 1, 2, 0),
    "l3_3x3": (8, 256, 14, 14, 256, 3, 1, 1),
    "l4_3x3": (8, 512, 7, 7, 512, 3, 1, 1),
}


def networks():
    torch.manual_seed(0)
    ref = models.resnet18(in_channels=3, num_classes=10, backend="torch")
    net = models.resnet18(in_channels=3, num_classes=10, backend="cnnext")
    net.load_state_dict(ref.state_dict())
    x = torch.randn(BATCH, 3, SIZE, SIZE)
    return net, ref, x


@pytest.mark.parametrize("impl", ["cnnext", "torch", "torch_compile"])
def test_resnet18_eval(benchmark, impl):
    net, ref, x = networks()
    model = {"cnnext": net, "torch": ref, "torch_compile": ref}[impl].eval()
    if impl == "torch_compile":
        model = torch.compile(model)
    benchmark.group = f"resnet18 224² batch {BATCH} eval"
    with torch.no_grad():
        model(x)  # compiles (torch_compile); warms the weight caches (cnnext)
        y = benchmark(model, x)
    assert y.shape == (BATCH, 10)


@pytest.mark.parametrize("impl", ["cnnext", "torch"])
def test_resnet18_eval_channels_last(benchmark, impl):
    net, ref, x = networks()
    model = copy.deepcopy({"cnnext": net, "torch": ref}[impl]).eval().to(memory_format=CL)
    x = x.contiguous(memory_format=CL)
    benchmark.group = f"resnet18 224² batch {BATCH} eval channels_last"
    with torch.no_grad():
        model(x)
        y = benchmark(model, x)
    assert y.shape == (BATCH, 10)


@pytest.mark.parametrize("impl", ["cnnext", "torch"])
def test_resnet18_train_step(benchmark, impl):
    net, ref, x = networks()
    model = {"cnnext": net, "torch": ref}[impl].train()
    target = torch.randint(0, 10, (BATCH,), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        return loss.detach()

    benchmark.group = f"resnet18 224² batch {BATCH} train step"
    loss = benchmark(step)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("impl", ["cnnext", "torch"])
@pytest.mark.parametrize("name", list(RESNET18_CONVS))
def test_conv2d_channels_last(benchmark, name, impl):
    n, c, h, w, o, k, s, p = RESNET18_CONVS[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=CL)
    wt = (torch.randn(o, c, k, k, generator=g) * math.sqrt(2.0 / (c * k * k))).contiguous(memory_format=CL)
    b = torch.randn(o, generator=g)
    conv = cnnext.functional.conv2d if impl == "cnnext" else F.conv2d
    benchmark.group = f"conv2d forward channels_last resnet18_{name}"
    with torch.no_grad():
        y = benchmark(conv, x, wt, b, s, p)
    assert y.is_contiguous(memory_format=CL)
