"""The classic networks: both backends from one definition, the same state_dict keys,
and the cnnext backend equal to stock torch.nn (outputs, every gradient, parameters and
BN buffers after an SGD step). The heavy full-size float32 runs are benchmarks, not tests."""
import io

import pytest
import torch
from torch import nn

import cnnext
import cnnext.backends.cpu as cpu_backend
import cnnext.nn as cnn
from cnnext.models import MODELS, vgg
from cnnext.models.parity import F64_REF_TOL, TIE_TOL, TOL, _flips, compare, compare_float64

NAMES = list(MODELS)
# VGG-11 at full width in float64 would take a minute here: the parity tests use the
# book's small training variant (width / 4), the same code at a quarter of the channels.
SMALL = {"vgg11": {"width_divisor": 4}}


def build_both(name, **kw):
    torch.manual_seed(0)
    spec = MODELS[name]
    return spec.build(backend="cnnext", **kw), spec.build(backend="torch", **kw)


@pytest.mark.parametrize("name", NAMES)
def test_same_state_dict_keys_and_shapes(name):
    net, ref = build_both(name, **SMALL.get(name, {}))
    a, b = net.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)


@pytest.mark.parametrize("name", NAMES)
def test_cnnext_backend_computes_with_cnnext_layers(name):
    """Every convolution, pooling and conv+BN pair of the cnnext backend is a cnnext module;
    the stock backend has none."""
    net, ref = build_both(name, **SMALL.get(name, {}))
    heavy = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
    mods = list(net.modules())
    fused = [m for m in mods if isinstance(m, cnn.ConvBNReLU2d)]
    inside_fused = {id(c) for f in fused for c in f.modules() if c is not f}
    for m in mods:
        if isinstance(m, heavy) and id(m) not in inside_fused:
            assert type(m).__module__.startswith("cnnext."), f"{name}: stock {type(m).__name__} in the cnnext backend"
    assert not any(type(m).__module__.startswith("cnnext.nn") for m in ref.modules())
    if MODELS[name].has_batchnorm:
        assert fused, f"{name}: no fused conv+BN in the cnnext backend"


@pytest.mark.parametrize("name", NAMES)
def test_parity_float64(name):
    """float64, batch 2 (BatchNorm nets) or 1: within TOL[float64] of stock everywhere."""
    batch = 2 if MODELS[name].has_batchnorm else 1
    r = compare(name, torch.float64, batch=batch, build_kwargs=SMALL.get(name))
    for what, (err, where) in r.errors.items():
        assert err <= TOL[torch.float64], f"{name} {what}: {err:.2e} at {where}"


@pytest.mark.parametrize("winograd", [False, True], ids=["gemm", "winograd"])
@pytest.mark.parametrize("name", ["lenet", "nin", "googlenet", "resnet18", "densenet"])
def test_parity_float32(name, winograd):
    """float32, cnnext's and stock's alike, against float64 (parity.compare_float64): each run
    within F64_REF_TOL of a float64 run that takes its ReLU and max-pool branches, and every
    branch it took unlike float64 a near tie there (TIE_TOL). Comparing cnnext with stock
    directly fails on such ties: ResNet-18 seed 1 with Winograd on flips two ReLU inputs of
    -1.1e-5 and -8.8e-7 (layer maxima ~8) and moves layer3.0.conv2.weight's gradient by
    4e-2 -- as much as stock torch with oneDNN differs from stock torch without it there
    (scripts/float32_branch_flips.py; docs/DESIGN.md)."""
    with cpu_backend.flags(winograd=winograd):
        r = compare_float64(name, torch.float32, batch=2, seed=1)
    for who in ("cnnext", "stock"):
        for what, (err, where) in r.errors[who].items():
            assert err <= F64_REF_TOL[what], f"{name} {who} {what}: {err:.2e} at {where}"
        assert r.worst_tie(who) <= TIE_TOL, f"{name} {who}: branches unlike float64 {r.flips[who]}"


class _GradTimes(torch.autograd.Function):
    """Identity forward; the gradient times a factor (a planted backward error)."""

    @staticmethod
    def forward(ctx, y, factor):
        ctx.factor = factor
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_parity_float32_catches_a_planted_error(monkeypatch, where):
    """compare_float64 is not blind: a conv2d 1e-3 off in its output or in its gradients
    (what a stale weight transform or a partial-tile bug would give) fails it, and only on
    the cnnext side."""
    conv2d = cnnext.functional.conv2d

    def wrong(*args, **kwargs):
        y = conv2d(*args, **kwargs)
        return y * (1 + 1e-3) if where == "forward" else _GradTimes.apply(y, 1 + 1e-3)

    monkeypatch.setattr(cnnext.functional, "conv2d", wrong)
    r = compare_float64("lenet", torch.float32, batch=2, seed=1)
    assert r.ok("stock")
    assert not r.ok("cnnext")
    errs = {what: e for what, (e, _) in r.errors["cnnext"].items()}
    assert errs["gradients"] > F64_REF_TOL["gradients"]
    assert (errs["output"] > F64_REF_TOL["output"]) == (where == "forward")


def test_branch_flip_gaps():
    """_flips: a ReLU or pool branch taken unlike float64 is reported with its float64 gap
    relative to the layer's largest input; equal branches are not reported."""
    x64 = torch.tensor([[[[-2e-3, 0.5], [1.0, -0.25]]]], dtype=torch.float64)
    mask64 = x64 > 0
    flipped = mask64.clone()
    flipped[0, 0, 0, 0] = True
    assert _flips({("r", 0): ("relu", x64.float(), mask64)}, {("r", 0): ("relu", x64, mask64)}) == []
    [(layer, count, gap)] = _flips({("r", 0): ("relu", x64.float(), flipped)}, {("r", 0): ("relu", x64, mask64)})
    assert (layer, count) == ("r", 1) and gap == pytest.approx(2e-3)
    idx64 = torch.tensor([[[[2]]]])  # the window's maximum, 1.0
    idx32 = torch.tensor([[[[1]]]])  # float32 chose 0.5: a gap of 0.5 / 1.0
    [(layer, count, gap)] = _flips({("p", 1): ("pool", x64.float(), idx32)}, {("p", 1): ("pool", x64, idx64)})
    assert (layer, count) == ("p#1", 1) and gap == pytest.approx(0.5)


def test_weights_load_both_ways():
    net, ref = build_both("resnet18")
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    buf.seek(0)
    ref.load_state_dict(torch.load(buf), strict=True)
    net.eval(), ref.eval()
    x = torch.randn(1, 1, 96, 96, dtype=torch.float64)
    net.double(), ref.double()
    torch.testing.assert_close(net(x), ref(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_builder_arguments(name):
    spec = MODELS[name]
    net = spec.build(in_channels=3, num_classes=7, **SMALL.get(name, {})).eval()
    with torch.no_grad():
        y = net(torch.randn(spec.input_shape(batch=2, in_channels=3)))
    assert y.shape == (2, 7)


def test_bad_arguments():
    with pytest.raises(ValueError, match="backend"):
        cnnext.models.lenet(backend="cudnn")
    with pytest.raises(ValueError, match="width_divisor"):
        vgg(width_divisor=0)


# Output shapes printed by "Dive into Deep Learning" for one 1-channel image.
BOOK_SHAPES = {
    "lenet": [(1, 6, 28, 28), (1, 6, 28, 28), (1, 6, 14, 14), (1, 16, 10, 10), (1, 16, 10, 10), (1, 16, 5, 5),
              (1, 400), (1, 120), (1, 120), (1, 84), (1, 84), (1, 10)],
    "resnet18": [(1, 64, 24, 24), (1, 64, 24, 24), (1, 128, 12, 12), (1, 256, 6, 6), (1, 512, 3, 3),
                 (1, 512, 1, 1), (1, 512), (1, 10)],
    "densenet": [(1, 64, 24, 24), (1, 192, 24, 24), (1, 96, 12, 12), (1, 224, 12, 12), (1, 112, 6, 6),
                 (1, 240, 6, 6), (1, 120, 3, 3), (1, 248, 3, 3), (1, 248, 3, 3), (1, 248, 3, 3), (1, 248, 1, 1),
                 (1, 248), (1, 10)],
}


@pytest.mark.parametrize("name", list(BOOK_SHAPES))
def test_summary_matches_the_book(name, capsys):
    net = MODELS[name].build()
    rows = cnnext.summary(net, (1, MODELS[name].input_size, MODELS[name].input_size))
    assert [r.output_shape for r in rows] == BOOK_SHAPES[name]
    assert sum(r.params for r in rows) == sum(p.numel() for p in net.parameters())
    printed = capsys.readouterr().out
    assert "output shape" in printed and f"{sum(p.numel() for p in net.parameters()):,} parameters" in printed
    assert net.training  # put back in the mode it was in


def test_summary_depth_and_errors(capsys):
    net = MODELS["googlenet"].build()
    rows = cnnext.summary(net, (1, 1, 96, 96), depth=2)
    assert [r.layer for r in rows].count("Inception") == 9
    assert rows[-1].output_shape == (1, 10)
    with pytest.raises(ValueError, match="input_size"):
        cnnext.summary(net, (96, 96))
    with pytest.raises(ValueError, match="depth"):
        cnnext.summary(net, (1, 96, 96), depth=0)
