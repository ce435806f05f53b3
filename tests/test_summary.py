"""cnnext.summary and the command line: rows account for every parameter at every depth,
fused blocks are rows, the time columns, tables fit 100 columns, CLI usage errors."""
import io
import subprocess
import sys

import pytest
import torch
from torch import nn

import cnnext
from cnnext.__main__ import main
from cnnext.models import MODELS


@pytest.mark.parametrize("name", list(MODELS))
def test_rows_account_for_every_parameter_at_every_depth(name):
    spec = MODELS[name]
    net = spec.build(in_channels=1)
    total = sum(p.numel() for p in net.parameters())
    for depth in (1, 2, 3, 4):
        buf = io.StringIO()
        rows = cnnext.summary(net, (1, spec.input_size, spec.input_size), depth=depth, parts=depth == 4, file=buf)
        assert sum(r.params for r in rows if not r.part) == total, f"{name} depth {depth}"
        assert max(len(line) for line in buf.getvalue().splitlines()) <= 100
        if depth == 4 and any(isinstance(m, cnnext.nn.ConvBNReLU2d) for m in net.modules()):
            blocks = [r for r in rows if r.layer == "ConvBNReLU2d"]
            parts = [r for r in rows if r.part]
            assert blocks and len(parts) >= 2 * len(blocks)
            assert sum(r.params for r in parts) == sum(r.params for r in blocks)


def test_resnet18_depth_3_shows_fused_blocks():
    """The issue: at depth 3 the table started at `0.1 MaxPool2d` (the stem block was lost)."""
    rows = cnnext.summary(MODELS["resnet18"].build(in_channels=1), (1, 96, 96), depth=3, file=io.StringIO())
    assert (rows[0].name, rows[0].layer, rows[0].output_shape) == ("0.0", "ConvBNReLU2d", (1, 64, 48, 48))


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))           # a parameter of its own
        self.conv = nn.Conv2d(3, 3, 3, padding=1)          # called twice
        self.unused = nn.Linear(4, 4)                       # never called
        self.inner = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU())

    def forward(self, x):
        return self.inner(self.conv(self.conv(x)) * self.scale.view(1, 3, 1, 1))


def test_own_parameters_repeated_and_unused_modules():
    m = Odd()
    for depth in (1, 2):
        rows = cnnext.summary(m, (3, 5, 5), depth=depth, file=io.StringIO())
        assert sum(r.params for r in rows) == sum(p.numel() for p in m.parameters())
        conv = [r for r in rows if r.name == "conv"]
        assert [(r.calls, r.params) for r in conv] == [(1, 84), (2, 0)]
        assert [r for r in rows if r.name == "unused"][0].output_shape == ()
    rows = cnnext.summary(m, (3, 5, 5), depth=1, file=io.StringIO())
    assert ("", "Odd (own)", 3) in [(r.name, r.layer, r.params) for r in rows]


def test_time_columns_for_cnnext_and_stock():
    net = MODELS["lenet"].build(in_channels=1)
    buf = io.StringIO()
    rows = cnnext.summary(net, (1, 32, 32), time=True, runs=2, file=buf)
    assert all(r.cnnext_ms is not None and r.cnnext_ms >= 0 and r.torch_ms is not None for r in rows)
    head = buf.getvalue().splitlines()[1]
    assert "cnnext ms" in head and "torch ms" in head
    assert "time of the rows" in buf.getvalue()
    assert all(type(m).__module__.startswith("cnnext") for m in net.modules() if isinstance(m, nn.Conv2d))


def test_summary_bad_arguments():
    net = nn.Conv2d(1, 1, 1)
    with pytest.raises(ValueError, match="expected depth to be an int of at least 1, got 0"):
        cnnext.summary(net, (1, 4, 4), depth=0)
    with pytest.raises(ValueError, match="expected input_size"):
        cnnext.summary(net, (1, 4))


@pytest.mark.parametrize("argv, message", [
    (["summary", "lenet", "--depth", "-1"], "argument --depth: expected a positive integer, got -1"),
    (["summary", "lenet", "--in-channels", "0"], "argument --in-channels: expected a positive integer, got 0"),
    (["summary", "lenet", "--depth", "x"], "argument --depth: expected a positive integer, got 'x'"),
    (["summary", "nope"], "unknown network 'nope'"),
    ([], "expected a command"),
])
def test_cli_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m cnnext") and message in err


def test_cli_version_and_summary_time():
    out = subprocess.run([sys.executable, "-m", "cnnext", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"cnnext {cnnext.__version__} (torch {torch.__version__})"
    out = subprocess.run([sys.executable, "-m", "cnnext", "summary", "lenet", "--depth", "2", "--time"],
                         capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert "cnnext ms" in lines[1] and max(map(len, lines)) <= 100
