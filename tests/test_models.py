"""The classic networks: both backends from one definition, the same state_dict keys,
and the cnnext backend equal to stock torch.nn (outputs, every gradient, parameters and
BN buffers after an SGD step). The heavy full-size float32 runs are benchmarks, not tests."""
import io

import pytest
import torch
from torch import nn

import cnnext
import cnnext.nn as cnn
from cnnext.models import MODELS, vgg
from cnnext.models.parity import TOL, compare

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


@pytest.mark.parametrize("name", ["lenet", "nin", "googlenet", "resnet18", "densenet"])
def test_parity_float32(name):
    r = compare(name, torch.float32, batch=2, seed=1)
    for what, (err, where) in r.errors.items():
        assert err <= TOL[torch.float32], f"{name} {what}: {err:.2e} at {where}"


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
