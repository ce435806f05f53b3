"""The arithmetic of the CUDA max-pooling kernels, run on the CPU: no GPU needed, only nvcc.

csrc/cuda/max_pool2d.cu writes each kernel as a thin loop around a __host__ __device__
body: max_pool_forward_element (torch's scan: first maximum, last NaN, an all -inf window
keeps its first tap), max_pool_backward_element (the gather: each input element sums the
grads of the windows that chose it), gather_element (max_pool2d_select /
max_unpool2d_backward, with the bad-index report) and unpool_element (the scatter, with
the bad-index report). tests/cuda_host/max_pool2d_host.cu includes that file and calls
those bodies on the host over tensors this module writes, for float32/float64/float16/
bfloat16, contiguous, channels_last and gapped strides, padding, dilation, ceil_mode and
windows without a tap inside the input. Outputs start out all ones (NaN / -1) and inputs
sit between guards, so a missed element or a write outside an output fails.

Not covered here (tests/test_max_pool2d.py covers them on a GPU): the __global__
wrappers, the launch configuration and the device flag (report_bad's atomicCAS).

The values are small integers, NaN and +-inf, and the grads small integers, so every
expected result is exact in every dtype and compared exactly.
"""
import itertools
import struct
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from cnnext.testing import (DTYPE_CODE, host_layout as to_layout, needs_nvcc, run_host_harness,
                            span, strided_record)

pytestmark = needs_nvcc

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
OPS = ("forward", "backward", "gather", "unpool")
NAN, INF = float("nan"), float("inf")


@dataclass(frozen=True)
class Pool:
    x_shape: tuple
    k: tuple
    s: tuple
    p: tuple
    d: tuple
    ceil: bool

    def out_hw(self):
        res = []
        for i in range(2):
            size, k, s, p, d = self.x_shape[2 + i], self.k[i], self.s[i], self.p[i], self.d[i]
            span_ = size + 2 * p - d * (k - 1) - 1
            o = -(-span_ // s) + 1 if self.ceil else span_ // s + 1
            if self.ceil and (o - 1) * s >= size + p:
                o -= 1
            res.append(o)
        return tuple(res)

    def y_shape(self):
        return (*self.x_shape[:2], *self.out_hw())

    def kw(self):
        return dict(kernel_size=self.k, stride=self.s, padding=self.p, dilation=self.d, ceil_mode=self.ceil)

    def params(self):
        n, c, h, w = self.x_shape
        return (n, c, h, w, *self.out_hw(), *self.k, *self.s, *self.p, *self.d)

    def nonempty(self):
        """(OH, OW) mask of the windows with a tap inside the input."""
        masks = []
        for i in range(2):
            size, k, s, p, d = self.x_shape[2 + i], self.k[i], self.s[i], self.p[i], self.d[i]
            keep = []
            for o in range(self.out_hw()[i]):
                start = o * s - p
                end = min(start + (k - 1) * d + 1, size)
                while start < 0:
                    start += d
                keep.append(start < end)
            masks.append(torch.tensor(keep))
        return masks[0][:, None] & masks[1][None, :]

    def __str__(self):
        j = lambda v: "x".join(map(str, v))  # noqa: E731
        return (f"x{j(self.x_shape)}-k{j(self.k)}-s{j(self.s)}-p{j(self.p)}-d{j(self.d)}"
                f"{'-ceil' if self.ceil else ''}")


POOLS = [
    Pool((2, 3, 7, 8), (3, 3), (2, 2), (0, 0), (1, 1), False),   # AlexNet-like, overlapping
    Pool((2, 3, 6, 6), (2, 2), (2, 2), (0, 0), (1, 1), False),   # VGG-like
    Pool((1, 4, 5, 6), (3, 3), (1, 1), (1, 1), (1, 1), False),   # GoogLeNet-like, padding
    Pool((2, 2, 7, 9), (3, 2), (2, 3), (1, 1), (2, 1), True),    # dilation, ceil_mode
    Pool((1, 2, 8, 5), (2, 3), (3, 1), (1, 1), (1, 2), True),    # ceil_mode drops a window
    Pool((1, 2, 1, 2), (2, 2), (1, 1), (1, 1), (2, 3), False),   # windows without taps
]
LAYOUTS = [("contiguous", "contiguous"), ("channels_last", "channels_last"),
           ("sliced", "contiguous"), ("contiguous", "sliced")]


@dataclass(frozen=True)
class Case:
    op: str
    pool: Pool
    dtype: torch.dtype
    layouts: tuple       # (inputs, output)
    flag: int = 0        # gather: with the pooling windows
    bad: bool = False    # gather / unpool: one index out of range

    def __str__(self):
        return "-".join([self.op, str(self.pool), str(self.dtype).replace("torch.", ""), *self.layouts] +
                        (["pool"] if self.flag else []) + (["bad"] if self.bad else []))


def cases():
    out = []
    for pool, dt, ls in itertools.product(POOLS, DTYPES, LAYOUTS):
        out += [Case("forward", pool, dt, ls), Case("backward", pool, dt, ls),
                Case("gather", pool, dt, ls, flag=1), Case("gather", pool, dt, ls),
                Case("unpool", pool, dt, ls)]
    for dt in DTYPES:
        out += [Case("gather", POOLS[0], dt, LAYOUTS[1], bad=True),
                Case("unpool", POOLS[0], dt, LAYOUTS[0], bad=True)]
    return out


ALL_CASES = cases()


def special_values(shape, gen):
    """Small integers (ties), NaN, -inf, +inf, in float64 (exact in every dtype)."""
    x = torch.randint(-3, 4, shape, generator=gen).double()
    x[x == 3] = NAN
    x[x == -3] = -INF
    x[(x == 2) & (torch.rand(shape, generator=gen) < 0.3)] = INF
    return x


QUIET_NAN = {torch.float16: (torch.int16, 0x7E00), torch.bfloat16: (torch.int16, 0x7FC0),
             torch.float32: (torch.int32, 0x7FC00000), torch.float64: (torch.int64, 0x7FF8000000000000)}


def cast(x, dtype):
    """x in dtype, every NaN the positive quiet NaN (torch's conversion may give all ones,
    the harness's mark of an unwritten element)."""
    y = x.to(dtype)
    bits, nan = QUIET_NAN[dtype]
    y.view(bits)[y.isnan()] = nan
    return y


def make(case, seed):
    """The case's inputs {name: tensor in its dtype and layout}, the float64 / int64
    originals, and the output templates (dtype, shape, layout)."""
    g = torch.Generator().manual_seed(seed)
    pl, dt, (lin, lout) = case.pool, case.dtype, case.layouts
    x64 = special_values(pl.x_shape, g)
    y_shape = pl.y_shape()
    _, idx = F.max_pool2d(x64, return_indices=True, **pl.kw())
    idx = torch.where(pl.nonempty(), idx, torch.zeros_like(idx))  # torch's may lie outside the plane
    if case.op == "forward":
        ins = dict(x=to_layout(cast(x64, dt), lin))
        outs = [(dt, y_shape, lout), (torch.int64, y_shape, lout)]
    elif case.op == "backward":
        gy = torch.randint(-4, 5, y_shape, generator=g).double()
        ins = dict(gy=to_layout(cast(gy, dt), lin), idx=to_layout(idx, lin))
        outs = [(dt, pl.x_shape, lout)]
    elif case.op == "gather":
        if case.bad:
            idx = idx.clone()
            idx.view(-1)[5] = pl.x_shape[2] * pl.x_shape[3]
        ins = dict(src=to_layout(cast(x64, dt), lin), idx=to_layout(idx, lin))
        outs = [(dt, y_shape, lout)]
    else:  # unpool: pooled-shaped x, its indices, into an (H, W) output of zeros
        xs = special_values(y_shape, g)
        if case.bad:
            idx = idx.clone()
            idx.view(-1)[3] = -2
        ins = dict(x=to_layout(cast(xs, dt), lin), idx=to_layout(idx, lin),
                   out=to_layout(torch.zeros(pl.x_shape, dtype=dt), lout))
        outs = [(dt, pl.x_shape, lout)]
    return ins, outs


def record(case, ins, outs):
    pl = case.pool
    if case.op == "unpool":  # x / idx (N, C, OH, OW) of the pooling: the unpooling's (H, W) input
        n, c, h, w = pl.x_shape
        oh, ow = pl.out_hw()
        params = (n, c, oh, ow, h, w) + pl.params()[6:]
    else:
        params = pl.params()
    parts = [struct.pack("<17q", OPS.index(case.op), DTYPE_CODE[case.dtype], case.flag, *params)]
    parts += [strided_record(t) for t in ins.values()]
    for dt, shape, layout in outs if case.op != "unpool" else ():  # unpool's output is an input
        parts.append(strided_record(to_layout(torch.zeros(shape, dtype=dt), layout), data=False))
    return b"".join(parts)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    made = [make(c, seed) for seed, c in enumerate(ALL_CASES)]
    data = run_host_harness(tmp_path_factory, "max_pool2d_host.cu", [record(c, *m) for c, m in zip(ALL_CASES, made)],
                            ALL_CASES, opt="-O1")
    pos, out = 0, {}
    for case, (ins, outs) in zip(ALL_CASES, made):
        got = []
        for dt, shape, layout in outs:
            tmpl = to_layout(torch.zeros(shape, dtype=dt), layout)
            nbytes = span(tmpl) * tmpl.element_size()
            flat = torch.frombuffer(bytearray(data[pos:pos + nbytes]), dtype=torch.uint8).view(dt)
            pos += nbytes
            window = flat.clone()
            got.append((torch.as_strided(flat, shape, tmpl.stride()), window, tmpl))
        bad = None
        if case.op in ("gather", "unpool"):
            bad = struct.unpack("<2q", data[pos:pos + 16])
            pos += 16
        out[case] = ins, got, bad
    assert pos == len(data)
    return out


def written_exactly(got, window, tmpl):
    """Every element of the output written (not all ones), every gap left alone."""
    mask = torch.zeros(span(tmpl), dtype=torch.bool)
    torch.as_strided(mask, tmpl.shape, tmpl.stride()).fill_(True)
    ones = window.view(torch.int64) == -1 if window.dtype == torch.int64 else None
    if ones is None:  # all-ones bit pattern of a float type
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[window.element_size()]
        ones = window.view(bits) == -1
    assert not ones[mask].any(), "an output element was not written"
    assert ones[~mask].all(), "a gap of the strided output was written"


def same(got, want):
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_case(case, results):
    ins, got, bad = results[case]
    pl = case.pool
    for g in got:
        if case.op != "unpool":
            written_exactly(*g)
    if case.op == "forward":
        want, want_idx = F.max_pool2d(ins["x"].double(), return_indices=True, **pl.kw())
        same(got[0][0], want)
        assert torch.equal(got[1][0], want_idx)
        return
    mask = pl.nonempty()
    if case.op == "backward":
        gy, idx = ins["gy"].double(), ins["idx"]
        n, c, h, w = pl.x_shape
        want = torch.zeros(n * c, h * w, dtype=torch.float64)
        m = mask.reshape(-1)
        for i in range(n * c):
            want[i].index_add_(0, idx.reshape(n * c, -1)[i][m], gy.reshape(n * c, -1)[i][m])
        same(got[0][0], want.reshape(pl.x_shape))
    elif case.op == "gather":
        src, idx = ins["src"].double(), ins["idx"]
        hw = pl.x_shape[2] * pl.x_shape[3]
        ok = (idx >= 0) & (idx < hw)
        want = src.flatten(-2).gather(-1, torch.where(ok, idx, 0).flatten(-2)).reshape(idx.shape)
        keep = ok & mask if case.flag else ok
        want = torch.where(keep, want, torch.zeros_like(want))
        same(got[0][0], want)
        assert bad == ((1, hw) if case.bad else (0, 0))
    else:  # unpool: the last of repeated indices wins, a bad index is skipped and reported
        x, idx = ins["x"].double(), ins["idx"]
        n, c, h, w = pl.x_shape
        want = torch.zeros(n * c, h * w, dtype=torch.float64)
        xf, jf = x.reshape(n * c, -1), idx.reshape(n * c, -1)
        for i in range(n * c):
            for j in range(jf.shape[1]):
                k = int(jf[i, j])
                if 0 <= k < h * w:
                    want[i, k] = xf[i, j]
        same(got[0][0], want.reshape(pl.x_shape))
        assert bad == ((1, -2) if case.bad else (0, 0))
