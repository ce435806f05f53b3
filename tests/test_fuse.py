"""cnnext.fuse: the Conv2d -> BatchNorm2d (-> ReLU) chains a model's traced data flow proves
run fused (FusedConv2d), keeping state_dict keys, outputs in both modes, gradients,
running statistics and training trajectories; nothing else changes."""
import copy
import io
import warnings

import pytest
import torch
from torch import nn

import cnnext
from cnnext.nn import ConvBNReLU2d, FusedBatchNorm2d, FusedConv2d, FusedReLU
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
    keys = list(model.state_dict())
    fused = cnnext.fuse(model)
    assert fused is model and list(fused.state_dict()) == keys
    assert [id(p) for p in fused.parameters()] == params_before
    kinds = [m.fused_relu for m in fused.modules() if isinstance(m, FusedConv2d)]
    # relu: in a Sequential run, in a whole block; not the Block's ReLU (called twice), not
    # where a batch norm's output goes elsewhere.
    assert kinds == [True, True, False, False, False, False]
    assert sum(isinstance(m, FusedReLU) for m in fused.modules()) == 2
    fused_bns = [f.fused_bn for f in fused.modules() if isinstance(f, FusedConv2d)]
    assert all(any(m is b for b in fused_bns) for m in fused.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(type(b) is FusedBatchNorm2d for b in fused_bns)
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


def test_whole_block_keeps_keys_and_object():
    """A Sequential that is exactly (Conv2d, BatchNorm2d, ReLU) is fused in place, keys kept."""
    block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    keys = list(block.state_dict())
    fused = cnnext.fuse(block)
    assert fused is block and type(block[0]) is FusedConv2d and block[0].fused_relu
    assert type(block[1]) is FusedBatchNorm2d and type(block[2]) is FusedReLU and list(block.state_dict()) == keys
    outer = nn.Sequential(nn.Identity(), nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    keys = list(outer.state_dict())
    cnnext.fuse(outer)
    assert type(outer[1][0]) is FusedConv2d and not outer[1][0].fused_relu and list(outer.state_dict()) == keys


def test_keys_unchanged_checkpoints_load_both_ways():
    """Before: fuse moved keys (i.* to i.0.*, (i+1).* to i.1.*). Now every key stays."""
    torch.manual_seed(0)
    stock = network().double()
    randomise_bn(stock)
    fused = cnnext.fuse(copy.deepcopy(network().double()))
    assert list(fused.state_dict()) == list(stock.state_dict())
    buf = io.BytesIO()
    torch.save(stock.state_dict(), buf)
    buf.seek(0)
    fused.load_state_dict(torch.load(buf), strict=True)  # stock checkpoint into the fused model
    fused.train()
    fused(torch.randn(2, 3, 8, 8, dtype=torch.float64))  # moves its running statistics
    back = network().double()
    back.load_state_dict(fused.state_dict(), strict=True)  # and back
    for (k, a), b in zip(back.state_dict().items(), fused.state_dict().values()):
        assert torch.equal(a, b), k
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    back.eval(), fused.eval()
    assert_close_scaled(fused(x).detach(), back(x).detach(), 1e-12, "eval output")


def test_fuse_leaves_other_modules_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 5, 3), nn.BatchNorm2d(4))
    _, report = cnnext.fuse(model, report=True, warn=False)
    assert not any(isinstance(m, FusedConv2d) for m in model.modules())
    assert ("4", "not fused with 3: the batch norm has 4 features, the Conv2d 5 output channels") in report.unfused
    fused = ConvBNReLU2d(3, 4, 3)
    assert cnnext.fuse(fused) is fused and type(fused[0]) is cnnext.nn.Conv2d


class TrapUsesConvTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class TrapBnOnInput(TrapUsesConvTwice):
    def forward(self, x):
        return self.conv(x) + self.bn(x)


@pytest.mark.parametrize("cls", [TrapUsesConvTwice, TrapBnOnInput])
def test_registration_order_traps_leave_outputs_unchanged(cls):
    """The issue's two models: a Conv2d registered right before a BatchNorm2d that does not
    feed it only. Fusing them changed outputs by 1.86 before; now they are not fused."""
    torch.manual_seed(0)
    m = cls().eval()
    m.bn.running_mean.fill_(.5)
    m.bn.running_var.fill_(4)
    m.bn.weight.data.fill_(3)
    x = torch.randn(2, 4, 6, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        f = cnnext.fuse(copy.deepcopy(m))
    assert not any(isinstance(t, (FusedConv2d, FusedBatchNorm2d)) for t in f.modules())
    for train in (False, True):
        m.train(train), f.train(train)
        assert torch.equal(f(x), m(x))
    near = [w for w in caught if issubclass(w.category, cnnext.FuseWarning)]
    if cls is TrapUsesConvTwice:  # the conv feeds the batch norm, and more: a near miss, said
        assert len(near) == 1 and "output of conv is also used elsewhere (2 uses)" in str(near[0].message)
    else:
        assert not near


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.head = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.inner = Block(4)

    def forward(self, x):
        x = self.head(x)
        if x.sum() > 0:
            x = x * 2
        return self.inner(self.bn(self.conv(x)))


def test_untraceable_model_fuses_only_what_is_proven():
    torch.manual_seed(0)
    ref = Untraceable().double()
    randomise_bn(ref)
    model = copy.deepcopy(ref)
    with pytest.warns(cnnext.FuseWarning, match=r"\(model\): could not be traced \(TraceError"):
        _, report = cnnext.fuse(model, report=True)
    # head: a plain Sequential run; inner: traces on its own; conv -> bn of the untraceable
    # forward: registration order only, so not fused.
    assert sorted(report.fused) == [("head.0", "head.1", "head.2"), ("inner.conv1", "inner.bn1", None),
                                    ("inner.conv2", "inner.bn2", None)]
    assert type(model.conv) is nn.Conv2d and type(model.bn) is nn.BatchNorm2d
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    for train in (True, False):
        ref.train(train), model.train(train)
        assert_close_scaled(model(x).detach(), ref(x).detach(), 1e-12, f"train={train}")


def test_shared_hooked_and_functional_relu():
    conv = nn.Conv2d(3, 3, 3, padding=1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = conv, nn.BatchNorm2d(3), conv                 # conv registered twice
            self.d, self.e = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)                 # hooked below
            self.f, self.g = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)                 # then F.relu(inplace)

        def forward(self, x):
            x = self.b(self.a(x))
            x = self.e(self.d(x))
            return nn.functional.relu(self.g(self.f(x)), inplace=True)

    net = Net().double()
    net.d.register_forward_hook(lambda *a: None)
    ref = copy.deepcopy(net)
    _, report = cnnext.fuse(net, report=True, warn=False)
    assert report.fused == [("f", "g", None)]
    notes = dict(report.unfused)
    assert "registered at 2 places" in notes["b"] and "has hooks" in notes["e"]
    assert notes["g"].startswith("fused without its ReLU")
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    for train in (True, False):
        net.train(train), ref.train(train)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, y_r = net(a), ref(b)
        y.sum().backward(), y_r.sum().backward()  # the in-place relu after the fused op
        assert_close_scaled(y.detach(), y_r.detach(), 1e-12, "output")
        assert_close_scaled(a.grad, b.grad, 1e-10, "grad_input")


def test_fused_model_copies_moves_switches_modes_and_reverts():
    torch.manual_seed(0)
    model = network()
    randomise_bn(model)
    model[4].bn1.eval()  # a frozen batch norm inside a training model keeps its mode
    keys = list(model.state_dict())
    stock = copy.deepcopy(model)
    cnnext.fuse(model)
    assert not model[4].bn1.training and model[6].training
    twin = copy.deepcopy(model)
    assert twin[0].fused_bn is twin[1] and twin[0].fused_bn is not model[1]
    model.double()
    assert model[1].weight.dtype == torch.float64 and model[0].fused_bn.running_mean.dtype == torch.float64
    model.eval()
    assert not model[0].fused_bn.training
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    y = model(x)
    back = cnnext.revert(model)
    assert not any(type(m).__module__.startswith("cnnext") for m in back.modules())
    assert type(back[0]) is nn.Conv2d and type(back[1]) is nn.BatchNorm2d and type(back[2]) is nn.ReLU
    assert list(back.state_dict()) == keys and back[0].weight is model[0].weight
    assert_close_scaled(y.detach(), back(x).detach(), 1e-12, "reverted")
    stock.double().eval()
    assert torch.equal(back(x), stock(x))
