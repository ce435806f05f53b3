"""cnnext.fuse: Conv2d -> BatchNorm2d (-> ReLU) runs of a model replaced by ConvBNReLU2d,
keeping outputs in both modes, gradients, running statistics and training trajectories."""
import copy

import pytest
import torch
from torch import nn

import cnnext
from cnnext.nn import ConvBNReLU2d
from conftest import assert_close_scaled


class Block(nn.Module):
    """torchvision BasicBlock-like: children conv1, bn1, relu (called twice), conv2, bn2."""

    def __init__(self, ch, conv=nn.Conv2d):
        super().__init__()
        self.conv1 = conv(ch, ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv(ch, ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + x)


def network(conv=nn.Conv2d):
    return nn.Sequential(
        conv(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),          # run inside a Sequential
        nn.Sequential(conv(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8, momentum=None), nn.ReLU()),  # whole block
        Block(8, conv),                                                    # children of a module
        conv(8, 6, 1), nn.BatchNorm2d(6),                                  # no ReLU after
        nn.Sequential(conv(6, 6, 3, stride=2), nn.BatchNorm2d(6, affine=False)),
        nn.Flatten(), nn.Linear(6 * 3 * 3, 5),
    )


def randomise_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)


@pytest.mark.parametrize("conv", [nn.Conv2d, cnnext.nn.Conv2d], ids=["stock", "cnnext"])
def test_fuse_keeps_training_trajectory(conv):
    torch.manual_seed(0)
    ref = network(conv).double()
    randomise_bn(ref)
    model = copy.deepcopy(ref)
    params_before = [id(p) for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)  # built before fusing
    fused = cnnext.fuse(model)
    assert fused is model
    assert [id(p) for p in fused.parameters()] == params_before
    kinds = [(type(m).__name__, m.relu) for m in fused.modules() if isinstance(m, ConvBNReLU2d)]
    assert kinds == [("ConvBNReLU2d", True), ("ConvBNReLU2d", True), ("ConvBNReLU2d", False),
                     ("ConvBNReLU2d", False), ("ConvBNReLU2d", False), ("ConvBNReLU2d", False)]
    fused_bns = [f.bn for f in fused.modules() if isinstance(f, ConvBNReLU2d)]
    assert all(any(m is b for b in fused_bns) for m in fused.modules() if isinstance(m, nn.BatchNorm2d))
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        train = step < 3
        ref.train(train), fused.train(train)
        x0 = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=gen)
        outs = []
        for m, o in ((ref, opt_ref), (fused, opt)):
            x = x0.clone().requires_grad_()
            o.zero_grad()
            y = m(x)
            y.pow(2).sum().backward()
            outs.append((y.detach(), x.grad, [p.grad for p in m.parameters()]))
            if train:
                o.step()
        (y_r, gx_r, g_r), (y_f, gx_f, g_f) = outs
        assert_close_scaled(y_f, y_r, 1e-9, f"output step {step}")
        assert_close_scaled(gx_f, gx_r, 1e-9, f"grad_input step {step}")
        # Conv biases before batch norm in training get rounding noise (their true gradient is
        # 0): errors are measured against the largest gradient of the step as well.
        overall = max(b.abs().max().item() for b in g_r)
        for (k, _), a, b in zip(ref.named_parameters(), g_f, g_r):
            err = (a - b).abs().max().item()
            assert err <= 1e-9 * max(b.abs().max().item(), 1e-3 * overall), f"grad {k} step {step}: {err:.3e}"
        for (k, a), b in zip(ref.named_buffers(), fused.buffers()):
            if a.dtype == torch.long:
                assert torch.equal(a, b), k
            else:
                assert_close_scaled(b, a, 1e-9, f"{k} step {step}")


def test_whole_block_keeps_keys():
    """A Sequential that is exactly (Conv2d, BatchNorm2d, ReLU) becomes a ConvBNReLU2d with
    the same state_dict keys, inside a model and as the model itself."""
    block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    keys = list(block.state_dict())
    fused = cnnext.fuse(block)
    assert isinstance(fused, ConvBNReLU2d) and fused.relu and list(fused.state_dict()) == keys
    outer = nn.Sequential(nn.Identity(), nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    keys = list(outer.state_dict())
    cnnext.fuse(outer)
    assert isinstance(outer[1], ConvBNReLU2d) and not outer[1].relu and list(outer.state_dict()) == keys


def test_key_mapping_inside_longer_sequential():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1))
    state = model.state_dict()
    cnnext.fuse(model)
    assert isinstance(model[0], ConvBNReLU2d) and isinstance(model[1], nn.Identity) and isinstance(model[2], nn.Identity)
    mapped = {k.replace("1.", "0.1.", 1) if k.startswith("1.") else ("0.0." + k[2:] if k.startswith("0.") else k): v
              for k, v in state.items()}
    assert set(model.state_dict()) == set(mapped)
    model.load_state_dict(mapped)


def test_fuse_leaves_other_modules_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 5, 3), nn.BatchNorm2d(4))
    cnnext.fuse(model)
    assert not any(isinstance(m, ConvBNReLU2d) for m in model.modules())
    fused = ConvBNReLU2d(3, 4, 3)
    assert cnnext.fuse(fused) is fused and isinstance(fused[0], nn.Conv2d)
