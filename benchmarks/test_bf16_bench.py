"""cnnext vs stock torch in bfloat16 on the CPU, and stock float32 as the second yardstick:
conv2d forward and forward+backward on the ResNet / VGG 3x3 layers at batch 8, max pooling
with indices (forward, backward), and a ResNet-18 training step under torch.autocast.

Run: python -m pytest benchmarks/test_bf16_bench.py --benchmark-json=out.json
then python benchmarks/report.py out.json. Issue 16's targets: cnnext bf16 conv forward
<= 1.0 x stock bf16 and <= 0.55 x stock float32 (geomean over the 3x3 layers); forward +
backward <= 1.1 x stock bf16; pooling <= 1.0 x stock bf16; the autocast ResNet-18 step
<= 1.0 x stock's.
"""
import pytest
import torch
import torch.nn.functional as F

import cnnext
from shapes import CONV2D

# The 3x3 layers of ResNet / VGG at batch 8.
CONV3X3 = {k: CONV2D[k] for k in ("vgg_conv3", "resnet_conv", "resnet_down", "alexnet_conv3")}
# (implementation, dtype): cnnext and stock in bfloat16, stock in float32.
CONV_IMPLS = {
    "cnnext-bf16": (cnnext.functional.conv2d, torch.bfloat16),
    "torch-bf16": (F.conv2d, torch.bfloat16),
    "torch-fp32": (F.conv2d, torch.float32),
}


def make(shape, dtype, requires_grad):
    n, c, h, w, o, k, s, p = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=g).to(dtype).requires_grad_(requires_grad)
    wt = torch.randn(o, c, k, k, generator=g).to(dtype).requires_grad_(requires_grad)
    b = torch.randn(o, generator=g).to(dtype).requires_grad_(requires_grad)
    return x, wt, b, s, p


@pytest.mark.parametrize("impl", list(CONV_IMPLS))
@pytest.mark.parametrize("name", list(CONV3X3))
def test_bf16_conv2d_forward(benchmark, name, impl):
    fn, dtype = CONV_IMPLS[impl]
    x, w, b, s, p = make(CONV3X3[name], dtype, False)
    benchmark.group = f"bf16 conv2d forward {name}"
    with torch.no_grad():
        out = benchmark(fn, x, w, b, s, p)
    assert out.dtype == dtype


@pytest.mark.parametrize("impl", list(CONV_IMPLS))
@pytest.mark.parametrize("name", list(CONV3X3))
def test_bf16_conv2d_train(benchmark, name, impl):
    fn, dtype = CONV_IMPLS[impl]
    x, w, b, s, p = make(CONV3X3[name], dtype, True)
    grad = torch.randn_like(fn(x, w, b, s, p).detach())

    def step():
        return torch.autograd.grad(fn(x, w, b, s, p), (x, w, b), grad)

    benchmark.group = f"bf16 conv2d forward+backward {name}"
    grads = benchmark(step)
    assert grads[1].dtype == dtype


POOL_SHAPES = {"vgg_2x2s2": (8, 64, 112, 112, 2, 2, 0), "resnet_3x3s2p1": (8, 64, 112, 112, 3, 2, 1)}
POOL_IMPLS = {"cnnext-bf16": cnnext.functional.max_pool2d, "torch-bf16": F.max_pool2d}


@pytest.mark.parametrize("impl", list(POOL_IMPLS))
@pytest.mark.parametrize("name", list(POOL_SHAPES))
def test_bf16_max_pool2d_forward(benchmark, name, impl):
    n, c, h, w, k, s, p = POOL_SHAPES[name]
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(0)).bfloat16()
    benchmark.group = f"bf16 max_pool2d forward with indices {name}"
    with torch.no_grad():
        out, idx = benchmark(POOL_IMPLS[impl], x, k, s, p, return_indices=True)
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("impl", list(POOL_IMPLS))
@pytest.mark.parametrize("name", list(POOL_SHAPES))
def test_bf16_max_pool2d_train(benchmark, name, impl):
    n, c, h, w, k, s, p = POOL_SHAPES[name]
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(0)).bfloat16().requires_grad_()
    fn = POOL_IMPLS[impl]
    grad = torch.randn_like(fn(x, k, s, p).detach())
    benchmark.group = f"bf16 max_pool2d forward+backward {name}"
    gx, = benchmark(lambda: torch.autograd.grad(fn(x, k, s, p), (x,), grad))
    assert gx.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", ["cnnext", "torch"])
def test_autocast_resnet18_step(benchmark, backend):
    """One SGD step of ResNet-18 (224x224, batch 8) under torch.autocast('cpu', bfloat16)."""
    torch.manual_seed(0)
    model = cnnext.models.resnet18(in_channels=3, num_classes=10, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 3, 224, 224)
    y = torch.randint(0, 10, (8,))

    def step():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    benchmark.group = "bf16 autocast resnet18 224 batch 8 training step"
    loss = benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    assert torch.isfinite(loss)
