"""The AVX-512 max_pool2d forwards (csrc/cpu/max_pool2d_avx512.cpp: NCHW rows with column
stride 1 or 2; channels_last windows of at most 32 taps) against torch: values and indices
exactly, with ties, NaN, -inf, padding, dilation, ceil_mode, rows wider and narrower than a
vector (16 float / 8 double lanes, partial vectors at the row ends), strided rows and
planes, float32 and float64. Column stride 3 (the other loops) is checked alongside. Each
test asserts through the path counters (cnnext._paths) that the kernel it targets ran; on a
CPU without AVX-512 (or with CNNEXT_CPU_ISA capping it) the fallback loops are expected
instead, and test_isa_fallbacks runs them here in a subprocess."""
import itertools
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import cnnext
from cnnext import _C
from cnnext._paths import expect_path

AVX512 = _C._cpu_isa() == "avx512"
# The forward kernels: NCHW rows (column stride 1 or 2), the NCHW row loops (other strides
# or no AVX-512), channels_last pixels of at most 32 taps (AVX-512) or more (AVX2).
ROWS = "max_pool2d.fwd.avx512_rows" if AVX512 else "max_pool2d.fwd.nchw_rows"
ROW_LOOPS = "max_pool2d.fwd.nchw_rows"
CL_WIDE = "max_pool2d.fwd.channels_last_avx2" if _C._cpu_isa() != "scalar" else "max_pool2d.fwd.channels_last_scalar"
CL_PIXELS = "max_pool2d.fwd.channels_last_avx512" if AVX512 else CL_WIDE

NAN, INF = float("nan"), float("inf")


def values(shape, dtype, gen, special):
    """Small integers (many ties), with NaN / -inf / +inf sprinkled in when `special`."""
    x = torch.randint(-3, 4, shape, generator=gen).to(dtype)
    if special:
        u = torch.rand(shape, generator=gen)
        x[u < 0.04] = NAN
        x[(u >= 0.04) & (u < 0.10)] = -INF
        x[(u >= 0.10) & (u < 0.12)] = INF
    return x


def check(x, k, s, p, d, ceil_mode):
    y, i = cnnext.functional.max_pool2d(x, k, s, p, d, ceil_mode=ceil_mode, return_indices=True)
    ry, ri = F.max_pool2d(x, k, s, p, d, ceil_mode=ceil_mode, return_indices=True)
    assert y.shape == ry.shape and y.dtype == ry.dtype
    torch.testing.assert_close(y, ry, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(i, ri), (x.shape, k, s, p, d, ceil_mode)


def configs(sw, seed, count):
    rnd = random.Random(seed)
    out = []
    while len(out) < count:
        kh, kw = rnd.randint(1, 4), rnd.randint(1, 4)
        dh, dw = rnd.randint(1, 3), rnd.randint(1, 3)
        ph, pw = rnd.randint(0, kh // 2), rnd.randint(0, kw // 2)
        sh = rnd.randint(1, 3)
        h = rnd.randint(1, 12)
        w = rnd.choice([1, 2, 5, 8, 9, 15, 16, 17, 23, 31, 32, 33, 40, 47, 65])
        if h + 2 * ph < dh * (kh - 1) + 1 or w + 2 * pw < dw * (kw - 1) + 1:
            continue
        out.append(((kh, kw), (sh, sw), (ph, pw), (dh, dw), h, w))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sw", [1, 2, 3])
@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("special", [False, True])
def test_random_windows(dtype, sw, ceil_mode, special):
    gen = torch.Generator().manual_seed(sw * 10 + ceil_mode * 2 + special)
    with expect_path(ROWS if sw < 3 else ROW_LOOPS):
        for k, s, p, d, h, w in configs(sw, hash((sw, ceil_mode, special)) % 1000, 40):
            x = values((2, 3, h, w), dtype, gen, special)
            check(x, k, s, p, d, ceil_mode)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k,s,p", [(3, 2, 0), (2, 2, 0), (3, 1, 1), (3, 2, 1), (5, 2, 2), (1, 2, 0)])
def test_network_shapes_and_strided_rows(dtype, k, s, p):
    gen = torch.Generator().manual_seed(k * 100 + s * 10 + p)
    for w in (13, 27, 54, 55, 70):
        x = values((2, 4, 19, w + 5), dtype, gen, True)
        # rows contiguous, row stride > W (a column slice), and a channel slice
        for t in (x[..., :w].contiguous(), x[..., 2:w + 2], x[:, 1::2, :, :w]):
            assert t.stride(3) == 1
            # without AVX-512, rows with a stride other than W take the generic loop
            path = ROWS if AVX512 or t.stride(2) == t.size(3) else "max_pool2d.fwd.generic"
            for ceil_mode in (False, True):
                with expect_path(path):
                    check(t, k, s, p, 1, ceil_mode)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_distinct_values_alexnet_like(dtype):
    n = 2 * 3 * 54 * 54
    x = (torch.randperm(n, generator=torch.Generator().manual_seed(1)).to(dtype) - n / 2).reshape(2, 3, 54, 54)
    for k, s, p in ((3, 2, 0), (2, 2, 0), (3, 1, 1)):
        with expect_path(ROWS):
            check(x, k, s, p, 1, False)
            check(-x, k, s, p, 1, True)


def test_all_nan_all_neg_inf_rows():
    for dtype in (torch.float32, torch.float64):
        for fill in (NAN, -INF):
            x = torch.full((1, 2, 7, 37), fill, dtype=dtype)
            x[0, 1, 3, ::5] = 1.0
            for s, p in ((1, 1), (2, 0), (2, 1)):
                with expect_path(ROWS):
                    check(x, 3, s, p, 1, True)
                check(x, (2, 3), (1, s), (1, p), (2, 1), False)


def test_empty_windows_match_torch_forward():
    # dilation + padding: windows without a tap inside the input give -inf and torch's
    # index lo_h * W + lo_w (which may lie outside the window or the plane).
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(1, 2, 1, 1, dtype=dtype)
        check(x, 2, 1, 1, 2, False)
        x = torch.arange(2 * 3 * 20, dtype=dtype).reshape(1, 2, 3, 20)
        for s in (1, 2):
            check(x[..., :2], (1, 2), (1, s), (0, 1), (1, 3), False)
            check(x, (1, 2), (1, s), (0, 1), (1, 21), False)
            check(x, (2, 2), (1, s), (1, 1), (3, 21), True)


# The channels_last forward's AVX-512 pixel kernel (windows of at most 32 taps; blocks of
# 4 vectors, single vectors, a masked last vector) and the loops beside it (more taps).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [1, 3, 8, 15, 16, 17, 33, 64, 70, 129])
def test_channels_last_channel_tails(dtype, channels):
    gen = torch.Generator().manual_seed(channels)
    for special in (False, True):
        x = values((2, channels, 9, 11), dtype, gen, special).contiguous(memory_format=torch.channels_last)
        for k, s, p, d, ceil_mode in (((3, 3), 2, 1, 1, True), ((2, 2), 2, 0, 1, False),
                                      ((3, 2), (1, 2), (1, 0), (2, 1), True), ((1, 1), 1, 0, 1, False)):
            with expect_path(CL_PIXELS if channels > 1 else ROWS):  # one channel: NCHW too
                check(x, k, s, p, d, ceil_mode)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [(4, 8), (8, 4), (5, 6), (6, 6), (3, 11)])
def test_channels_last_many_taps(dtype, k):
    gen = torch.Generator().manual_seed(k[0] * 10 + k[1])
    x = values((2, 20, 13, 14), dtype, gen, True).contiguous(memory_format=torch.channels_last)
    for s, p, ceil_mode in ((1, 0, False), (2, 1, True), (3, (1, 2), False)):
        with expect_path(CL_PIXELS if k[0] * k[1] <= 32 else CL_WIDE):
            check(x, k, s, p, 1, ceil_mode)


# Each capped instruction-set level runs its own forward loops (csrc/cpu/cpu_features.h
# reads CNNEXT_CPU_ISA once, hence a subprocess), checked against torch.
FALLBACK_SCRIPT = """
import torch, torch.nn.functional as F
import cnnext
from cnnext._paths import expect_path
paths = {paths!r}
for dtype in (torch.float32, torch.float64):
    x = torch.randint(-3, 4, (2, 19, 9, 23)).to(dtype)
    x[0, 0, 0, :5] = float("nan")
    for t, path in ((x, paths[0]), (x.contiguous(memory_format=torch.channels_last), paths[1])):
        for k, s, p in ((3, 2, 1), (2, 1, 0), (3, 3, 0)):
            with expect_path(path):
                y, i = cnnext.functional.max_pool2d(t, k, s, p, return_indices=True)
            ry, ri = F.max_pool2d(t, k, s, p, return_indices=True)
            torch.testing.assert_close(y, ry, rtol=0, atol=0, equal_nan=True)
            assert torch.equal(i, ri)
print(cnnext._C._cpu_isa())
"""


@pytest.mark.parametrize("isa,paths", [
    ("avx2", ("max_pool2d.fwd.nchw_rows", "max_pool2d.fwd.channels_last_avx2")),
    ("scalar", ("max_pool2d.fwd.nchw_rows", "max_pool2d.fwd.channels_last_scalar")),
])
def test_isa_fallbacks(isa, paths):
    if isa == "avx2" and _C._cpu_isa() == "scalar":
        pytest.skip("this CPU has no AVX2")
    env = dict(os.environ, CNNEXT_CPU_ISA=isa)
    out = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT.format(paths=paths)], env=env,
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(cnnext.__file__))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == isa
