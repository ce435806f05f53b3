"""Large CPU outputs advised for transparent huge pages (csrc/cpu/output_alloc.cpp): the
switch cnnext.backends.cpu.huge_pages, which outputs are advised (4 MiB and more: outputs,
indices, input gradients), and that the advice changes no value. Whether the kernel then
backs the memory with huge pages depends on the system (THP "never" refuses); the path
counter counts the advice given."""
import sys

import pytest
import torch
import torch.nn.functional as F

import cnnext
import cnnext.backends.cpu as cpu_backend
from cnnext._paths import counts, expect_path

PATH = "cpu.output.huge_pages"
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_HUGEPAGE) is Linux's")


def test_switch():
    assert cpu_backend.huge_pages is True
    with cpu_backend.flags(huge_pages=False):
        assert cpu_backend.huge_pages is False
    assert cpu_backend.huge_pages is True
    cpu_backend.huge_pages = False
    try:
        assert cpu_backend.huge_pages is False
    finally:
        cpu_backend.huge_pages = True
    with pytest.raises(TypeError, match="huge_pages must be a bool, got int"):
        cpu_backend.huge_pages = 1


def _ops():
    # (name, fn, whether its outputs reach 4 MiB): a 5 MB input through each kind of op.
    gen = torch.Generator().manual_seed(0)
    big = torch.randn(4, 16, 144, 144, generator=gen)  # 5.3 MB
    small = torch.randn(2, 4, 16, 16, generator=gen)
    w = torch.randn(16, 16, 3, 3, generator=gen)
    return [
        ("conv2d", lambda x: cnnext.functional.conv2d(x, w[:, : x.shape[1]], None, 1, 1)),
        ("conv2d_input_grad", lambda x: torch.autograd.grad(
            cnnext.functional.conv2d(x.requires_grad_(), w[:, : x.shape[1]], None, 2, 1).sum(), x)[0]),
        ("max_pool2d", lambda x: cnnext.functional.max_pool2d(x, 1, 1, return_indices=True)),
        ("max_pool2d_backward", lambda x: torch.autograd.grad(cnnext.functional.max_pool2d(x.requires_grad_(), 2).sum(), x)[0]),
        ("avg_pool2d", lambda x: cnnext.functional.avg_pool2d(x, 1)),
        ("avg_pool2d_backward", lambda x: torch.autograd.grad(cnnext.functional.avg_pool2d(x.requires_grad_(), 2).sum(), x)[0]),
        ("max_unpool2d", lambda x: cnnext.functional.max_unpool2d(*F.max_pool2d(x, 2, return_indices=True), 2)),
    ], big, small


@linux
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_outputs_are_advised_and_unchanged(layout):
    ops, big, small = _ops()
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    big = big.contiguous(memory_format=fmt)
    for name, fn in ops:
        with expect_path(PATH):
            on = fn(big.detach().clone())
        with cpu_backend.flags(huge_pages=False):
            before = counts()[PATH]
            off = fn(big.detach().clone())
            assert counts()[PATH] == before, name
        for a, b in zip(on if isinstance(on, tuple) else (on,), off if isinstance(off, tuple) else (off,)):
            assert torch.equal(a, b), name
            assert a.stride() == b.stride(), name


@linux
def test_small_outputs_are_not_advised():
    ops, big, small = _ops()
    for name, fn in ops:
        before = counts()[PATH]
        fn(small.clone())
        assert counts()[PATH] == before, name


@linux
def test_training_step_with_and_without():
    # A small network's step is the same bit for bit with the advice on and off.
    from cnnext import models
    torch.manual_seed(0)
    x = torch.randn(2, 3, 96, 96)
    grads = []
    for hp in (True, False):
        torch.manual_seed(0)
        net = models.resnet18(in_channels=3, num_classes=10, backend="cnnext")
        with cpu_backend.flags(huge_pages=hp):
            net(x).sum().backward()
        grads.append([p.grad for p in net.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
