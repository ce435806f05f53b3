"""The classic networks, cnnext backend vs stock torch.nn, on CPU: a forward pass (eval
mode, no grad) and a training step (train mode, forward + backward + SGD step).

Batch 64 for LeNet and 4 for the others, at their input sizes; VGG-11 at a quarter of
its width (the book's training variant). Both backends hold the same weights.
"""
import pytest
import torch

from cnnext.models import MODELS

BATCH = {"lenet": 64}
BUILD = {"vgg11": {"width_divisor": 4}}
IMPLS = ("cnnext", "torch")


def setup(name, impl):
    spec = MODELS[name]
    torch.manual_seed(0)
    net = spec.build(backend=impl, **BUILD.get(name, {}))
    x = torch.randn(spec.input_shape(batch=BATCH.get(name, 4)))
    target = torch.randint(0, 10, (x.shape[0],))
    return net, x, target


def label(name):
    return name + "".join(f" ({k}={v})" for k, v in BUILD.get(name, {}).items()) + f" batch {BATCH.get(name, 4)}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(MODELS))
def test_network_forward(benchmark, name, impl):
    net, x, _ = setup(name, impl)
    net.eval()
    benchmark.group = f"network forward {label(name)}"
    with torch.no_grad():
        y = benchmark(net, x)
    assert y.shape == (x.shape[0], 10)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(MODELS))
def test_network_train_step(benchmark, name, impl):
    net, x, target = setup(name, impl)
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), target)
        loss.backward()
        opt.step()
        return loss.detach()

    benchmark.group = f"network train step {label(name)}"
    loss = benchmark(step)
    assert torch.isfinite(loss)
