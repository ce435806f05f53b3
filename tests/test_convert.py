"""cnnext.convert, revert, fuse and enable on architectures nobody here wrote (torchvision's)
and a hand-written U-Net: outputs, gradients and running statistics equal stock in float64,
train and eval; no stock layer left; state_dict keys unchanged."""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

import cnnext
from cnnext._convert import STOCK_TO_CNNEXT
from cnnext._enable import _routes
from conftest import import_torchvision


class UNet(nn.Module):
    """A small U-Net: ConvTranspose2d, MaxPool2d with indices and MaxUnpool2d, average and
    functional pooling, skip connections, nn.ReLU(inplace), F.relu, torch.relu."""

    def __init__(self, c=4, classes=3):
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.enc2 = nn.Conv2d(c, 2 * c, 3, padding=1)
        self.enc2_bn = nn.BatchNorm2d(2 * c)
        self.down = nn.AvgPool2d(2)
        self.mid = nn.Conv2d(2 * c, 2 * c, 3, padding=1, padding_mode="reflect")
        self.mid_bn = nn.BatchNorm2d(2 * c, momentum=None)
        self.up = nn.ConvTranspose2d(2 * c, 2 * c, 2, stride=2)
        self.dec = nn.Conv2d(4 * c, c, 3, padding=1)
        self.dec_bn = nn.BatchNorm2d(c)
        self.unpool = nn.MaxUnpool2d(2)
        self.head = nn.Conv2d(2 * c, classes, 1)
        self.gate = nn.AdaptiveAvgPool2d((1, 1))

    def forward(self, x):
        e1 = self.enc1(x)
        p, idx = self.pool(e1)
        e2 = F.relu(self.enc2_bn(self.enc2(p)))
        m = torch.relu(self.mid_bn(self.mid(self.down(e2))))
        d = torch.cat([self.up(m), e2], 1)
        d = F.relu(self.dec_bn(self.dec(d)), inplace=True)
        d = torch.cat([self.unpool(d, idx, output_size=e1.shape[-2:]), e1], 1)
        y = self.head(d)
        side = F.avg_pool2d(F.max_pool2d(y, 2), 2, ceil_mode=True)
        return y * torch.sigmoid(self.gate(y)) + F.interpolate(side, size=y.shape[-2:])


def _small_head(model, width=32):
    """vgg / alexnet with 4096-wide classifiers shrunk (Linear is not what is tested; the
    full ones hold 0.1-1 GB of float64 parameters)."""
    first = model.classifier[1] if isinstance(model.classifier[0], nn.Dropout) else model.classifier[0]
    model.classifier = nn.Sequential(nn.Dropout(), nn.Linear(first.in_features, width), nn.ReLU(True),
                                     nn.Dropout(), nn.Linear(width, 10))
    return model


def _torchvision(name):
    M = import_torchvision().models
    if name == "googlenet":
        return M.googlenet(num_classes=10, aux_logits=False, init_weights=True)
    if name == "mobilenet_v2":  # half width: stock float64 depthwise convolutions are slow on CPU
        return M.mobilenet_v2(num_classes=10, width_mult=0.5)
    model = getattr(M, name)(num_classes=10)
    return _small_head(model) if name in ("vgg11_bn", "alexnet") else model


# name: (builder, input size, batch): small inputs the networks accept, to keep these fast.
# Batch 4 where the last batch norms see 1x1 maps: with 2 values per channel their
# input gradients cancel to the rounding level of their terms (nothing to compare).
NETS = {
    "resnet18": (lambda: _torchvision("resnet18"), 32, 4),
    "vgg11_bn": (lambda: _torchvision("vgg11_bn"), 32, 4),
    "googlenet": (lambda: _torchvision("googlenet"), 32, 4),
    "densenet121": (lambda: _torchvision("densenet121"), 32, 4),
    "mobilenet_v2": (lambda: _torchvision("mobilenet_v2"), 32, 4),
    "squeezenet1_0": (lambda: _torchvision("squeezenet1_0"), 48, 2),
    "alexnet": (lambda: _torchvision("alexnet"), 64, 2),
    "unet": (UNet, 16, 2),
}


def build(name):
    torch.manual_seed(0)
    model = NETS[name][0]().double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return model


def stock_layers(model):
    return [n for n, m in model.named_modules() if type(m) in STOCK_TO_CNNEXT]


def cnnext_layers(model):
    return [n for n, m in model.named_modules() if type(m).__module__.startswith("cnnext")]


def step(model, x, train):
    """Output, input gradient, parameter gradients and buffers after one forward/backward."""
    model.train(train)
    for p in model.parameters():
        p.grad = None
    x = x.clone().requires_grad_()
    torch.manual_seed(1)  # dropout
    y = model(x)
    weight = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(2))
    (y * weight).sum().backward()
    return (y.detach(), x.grad, {k: p.grad for k, p in model.named_parameters()},
            {k: b.clone() for k, b in model.named_buffers()})


def assert_same_step(got, ref, what, rtol=1e-9):
    (y, gx, g, b), (y_r, gx_r, g_r, b_r) = got, ref

    def close(a, e, name, scale=None):
        scale = max(e.abs().max().item(), 1e-300) if scale is None else scale
        err = (a - e).abs().max().item()
        assert err <= rtol * scale, f"{what}: {name}: error {err:.3e} > {rtol} * {scale:.3e}"

    close(y, y_r, "output")
    close(gx, gx_r, "grad_input")
    assert list(g) == list(g_r)
    # A conv bias before a batch norm in training has true gradient 0: rounding noise,
    # measured against the largest gradient of the step.
    overall = max(t.abs().max().item() for t in g_r.values() if t is not None)
    for k in g_r:
        if g_r[k] is None:
            assert g[k] is None, k
            continue
        close(g[k], g_r[k], f"grad {k}", max(g_r[k].abs().max().item(), 1e-3 * overall))
    assert list(b) == list(b_r)
    for k in b_r:
        if b_r[k].dtype == torch.long:
            assert torch.equal(b[k], b_r[k]), k
        else:
            close(b[k], b_r[k], f"buffer {k}")


class _Calls(TorchFunctionMode):
    """Counts the stock conv/pooling functions and the cnnext ops that run beneath it."""

    def __init__(self):
        super().__init__()
        self.stock, self.cnnext = [], 0
        self.routes = _routes()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.routes:
            self.stock.append(getattr(func, "__name__", str(func)))
        elif "cnnext" in str(getattr(func, "__module__", "")) or str(func).startswith("cnnext."):
            self.cnnext += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", list(NETS))
def test_convert_fuse_enable_revert(name):
    if name != "unet":
        import_torchvision()
    ref = build(name)
    keys = list(ref.state_dict())
    _, size, batch = NETS[name]
    x = torch.randn(batch, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert stock_layers(ref)

    converted = cnnext.convert(copy.deepcopy(ref))
    assert stock_layers(converted) == [] and list(converted.state_dict()) == keys
    fused, report = cnnext.fuse(copy.deepcopy(ref), report=True, warn=False)
    assert list(fused.state_dict()) == keys
    fused.load_state_dict(ref.state_dict(), strict=True)
    ref_bns = sum(isinstance(m, nn.BatchNorm2d) for m in ref.modules())
    assert len(report.fused) == sum(isinstance(m, cnnext.nn.FusedConv2d) for m in fused.modules())
    if ref_bns:
        assert report.fused, f"{name}: nothing fused ({report.unfused[:3]})"

    # Stock again: revert of convert+fuse gives the stock classes and bitwise the stock output.
    back = cnnext.revert(cnnext.fuse(cnnext.convert(copy.deepcopy(ref)), warn=False))
    assert cnnext_layers(back) == [] and list(back.state_dict()) == keys

    for train in (False, True):  # eval first: the running statistics are the initial ones
        expected = step(ref, x, train)
        if not train:
            back.eval()
            with torch.no_grad():
                assert torch.equal(back(x), expected[0])
        calls = _Calls() if train else None  # (counting takes cnnext's slower torch.ops path)
        with calls or cnnext.enable(), cnnext.enable():
            got = step(converted, x, train)
        if train:
            assert calls.stock == [], f"{name}: stock calls under enable(): {sorted(set(calls.stock))}"
            assert calls.cnnext > 0
        assert_same_step(got, expected, f"{name} convert+enable train={train}")
        assert_same_step(step(fused, x, train), expected, f"{name} fuse train={train}")


def test_enable_alone_runs_stock_model_on_cnnext():
    """enable() with no conversion: every conv/pool call of a stock U-Net runs on cnnext."""
    ref = build("unet")
    twin = copy.deepcopy(ref)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    expected = step(ref, x, True)
    calls = _Calls()
    with calls, cnnext.enable():
        got = step(twin, x, True)
    assert calls.stock == [] and calls.cnnext >= 12
    assert_same_step(got, expected, "enable")


def test_convert_shares_parameters_hooks_and_mode():
    conv = nn.Conv2d(3, 3, 3, padding=1)
    seen = []
    conv.register_forward_hook(lambda m, a, o: seen.append(type(m).__name__))
    model = nn.Sequential(conv, nn.ReLU(), conv, nn.MaxPool2d(2)).eval()  # the conv registered twice
    out = cnnext.convert(model)
    assert type(model[0]) is nn.Conv2d  # inplace=False leaves the model as it was
    assert type(out[0]) is cnnext.nn.Conv2d and out[0] is out[2] and out[0].weight is conv.weight
    assert not out.training and not out[0].training
    out(torch.randn(1, 3, 8, 8))
    assert seen == ["Conv2d", "Conv2d"] and type(out[3]) is cnnext.nn.MaxPool2d
    same = cnnext.convert(model, inplace=True)
    assert same is model and type(conv) is cnnext.nn.Conv2d
    cnnext.revert(model, inplace=True)
    assert type(conv) is nn.Conv2d and type(model[3]) is nn.MaxPool2d


@pytest.mark.filterwarnings("ignore:Complex modules")
def test_convert_reports_what_cnnext_cannot_run():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3).to(torch.complex64))
    with pytest.warns(cnnext.ConvertWarning, match=r"1 layer\(s\) left stock.*1 \(Conv2d\): dtype torch.complex64"):
        out = cnnext.convert(model)
    assert type(out[0]) is cnnext.nn.Conv2d and type(out[1]) is nn.Conv2d
    with pytest.raises(TypeError, match=r"1 \(Conv2d\): dtype torch.complex64 on CPU"):
        cnnext.convert(model, strict=True)


def test_convert_takes_half_models():
    """float16 / bfloat16 layers are converted (cnnext runs them on the CPU)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2)).to(torch.bfloat16)
    out = cnnext.convert(model)
    assert type(out[0]) is cnnext.nn.Conv2d and type(out[1]) is cnnext.nn.MaxPool2d


def test_convert_subclasses_only_when_asked():
    class MyConv(nn.Conv2d):
        pass

    model = nn.Sequential(MyConv(3, 4, 3))
    assert type(cnnext.convert(model)[0]) is MyConv
    assert type(cnnext.convert(model, types={MyConv: cnnext.nn.Conv2d})[0]) is cnnext.nn.Conv2d
    with pytest.raises(TypeError, match="expected types to map module classes"):
        cnnext.convert(model, types={MyConv: 3})


def test_convert_sync_batchnorm_and_revert():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4))
    out = cnnext.convert(model)
    assert type(out[1]) is cnnext.nn.SyncBatchNorm and out[1].weight is model[1].weight
    x = torch.randn(2, 3, 6, 6)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    ref.load_state_dict(model.state_dict())
    assert torch.equal(out[1](x[:, :1].expand(2, 4, 6, 6).contiguous()),
                       ref[1](x[:, :1].expand(2, 4, 6, 6).contiguous()))  # no process group: BatchNorm2d
    assert type(cnnext.revert(out)[1]) is nn.SyncBatchNorm


def test_enable_strict_and_fallback():
    x = torch.randn(1, 2, 6, 6, dtype=torch.complex64)
    w = torch.randn(2, 2, 3, 3, dtype=torch.complex64)
    with cnnext.enable():
        assert torch.equal(F.conv2d(x, w), torch.conv2d(x, w))  # falls back to stock
    with pytest.raises(TypeError, match=r"cnnext cannot run conv2d on dtype torch.complex64 on CPU"):
        with cnnext.enable(strict=True):
            F.conv2d(x, w)


def test_enable_nests_decorates_and_routes_every_spelling():
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    calls = _Calls()

    @cnnext.enable()
    def run():
        with cnnext.enable():  # nested
            out = [F.conv2d(x, w, padding="same"), torch.conv2d(x, w), F.conv_transpose2d(x, w.transpose(0, 1)),
                   F.max_pool2d(x, 3, 2), torch.max_pool2d(x, 2), F.avg_pool2d(x, 2, ceil_mode=True),
                   F.adaptive_avg_pool2d(x, (2, None)), torch._C._nn.adaptive_avg_pool2d(x, [3, 3])]
            y, idx = F.max_pool2d(x, 2, return_indices=True)
            out += [y, idx, F.max_unpool2d(y, idx, 2, output_size=(9, 9)), torch._C._nn.max_unpool2d(y, idx, [9, 9])]
            out += list(F.max_pool2d_with_indices(x, 3, 1, 1))
        return out

    with calls:
        got = run()
    assert calls.stock == [] and calls.cnnext == 12  # one op per call (y, idx: one)
    y, idx = F.max_pool2d(x, 2, return_indices=True)
    expected = [F.conv2d(x, w, padding="same"), torch.conv2d(x, w), F.conv_transpose2d(x, w.transpose(0, 1)),
                F.max_pool2d(x, 3, 2), torch.max_pool2d(x, 2), F.avg_pool2d(x, 2, ceil_mode=True),
                F.adaptive_avg_pool2d(x, (2, None)), torch._C._nn.adaptive_avg_pool2d(x, [3, 3]),
                y, idx, F.max_unpool2d(y, idx, 2, output_size=(9, 9)), torch._C._nn.max_unpool2d(y, idx, [9, 9]),
                *F.max_pool2d_with_indices(x, 3, 1, 1)]
    assert len(got) == len(expected)
    for i, (a, e) in enumerate(zip(got, expected)):
        assert a.shape == e.shape and a.dtype == e.dtype, i
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=f"result {i}")
    with calls:  # outside enable(): stock
        F.conv2d(x, w)
    assert calls.stock == ["conv2d"]


def test_enable_in_other_thread_is_not_active():
    import threading

    seen = []
    x, w = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 3, 3)

    def other():
        calls = _Calls()
        with calls:
            F.conv2d(x, w)
        seen.append(calls.stock)

    with cnnext.enable():
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert seen == [["conv2d"]]


def test_enable_keeps_the_fast_eager_entry(monkeypatch):
    """Inside the mode's handler the mode is off: cnnext.functional takes its direct eager
    entry (cnnext._C.eager), not torch.ops, and nothing recurses."""
    eager = cnnext._C.eager
    calls = []
    original = eager.conv2d
    monkeypatch.setattr(eager, "conv2d", lambda *a: calls.append(1) or original(*a))
    x, w = torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3)
    with cnnext.enable():
        F.conv2d(x, w)
        nn.Conv2d(2, 2, 3)(x)
    assert len(calls) == 2
