"""The arithmetic of the CUDA avg_pool2d / adaptive_avg_pool2d kernels, run on the CPU:
no GPU needed, only nvcc.

csrc/cuda/avg_pool2d.cu writes each kernel as a thin loop around __host__ __device__
functions: forward_element and backward_element compute one output element,
global_partial one lane's partial sum of a plane (global_store finishes it).
tests/cuda_host/avg_pool2d_host.cu includes that file and calls those functions on the
host over tensors this module writes to a file, so the window and divisor math, the
gather of the backward, the stride handling, the accumulation types and the dtype
conversions of the kernels are checked on any machine with nvcc. Outputs start out
NaN and inputs sit between NaN guards (and strided inputs have NaN in their gaps), so
a missed element, a write into a gap or past the end, and a stray read all fail.

Not covered here (tests/test_avg_pool2d.py and tests/test_adaptive_avg_pool2d.py cover them on a GPU): the __global__
wrappers, the launch configuration and the warp shuffle of the global forward (the
host adds the lanes' partial sums in lane order instead).
"""
import itertools
import struct
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from cnnext.testing import (DTYPE_CODE, TOLERANCES, check_host_output, needs_nvcc, pair, read_strided, run_host_harness,
                            strided_record, to_layout)

pytestmark = needs_nvcc

# float32 / float64: sums of at most a plane; float16 / bfloat16 accumulate in float
# and round once at the end (unit roundoff 2^-11, 2^-8), the bounds just above.
RTOL = TOLERANCES["host_pool"]
OPS = ("forward", "global_forward", "backward")


@dataclass(frozen=True)
class Pool:
    x_shape: tuple
    kind: str            # "avg" or "adaptive"
    kw: tuple            # avg: (kernel, stride, padding, ceil_mode, count_include_pad, divisor); adaptive: (size,)

    def ref(self, x):
        if self.kind == "adaptive":
            return F.adaptive_avg_pool2d(x, self.kw[0])
        k, s, p, ceil, cip, div = self.kw
        return F.avg_pool2d(x, k, s, p, ceil, cip, div)

    def params(self):
        """The 17 integers of AvgPool2dParams."""
        n, c, h, w = self.x_shape
        oh, ow = self.ref(torch.zeros(self.x_shape, dtype=torch.float64)).shape[-2:]
        if self.kind == "adaptive":
            return (n, c, h, w, oh, ow, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0)
        k, s, p, ceil, cip, div = self.kw
        (kh, kw), (sh, sw), (ph, pw) = pair(k), pair(s if s is not None else k), pair(p)
        return (n, c, h, w, oh, ow, kh, kw, sh, sw, ph, pw, 1, 1, 0, int(cip), div or 0)

    def is_global(self):
        return self.params()[4:6] == (1, 1) and (self.kind == "adaptive" or (
            self.params()[6:8] == self.x_shape[2:] and self.kw[2] == 0))

    def __str__(self):
        return f"{self.kind}-x{'x'.join(map(str, self.x_shape))}-{'-'.join(map(str, self.kw))}".replace(" ", "")


POOLS = [
    Pool((2, 3, 8, 9), "avg", (2, None, 0, False, True, None)),
    Pool((2, 3, 7, 9), "avg", (3, 2, 1, True, False, None)),
    Pool((1, 4, 7, 6), "avg", ((3, 2), (2, 3), (1, 0), True, True, None)),
    Pool((2, 2, 5, 5), "avg", (3, 1, 1, False, True, 4)),
    Pool((1, 3, 9, 7), "avg", (2, 3, 1, True, False, -3)),    # stride > kernel: unread input
    Pool((2, 3, 6, 7), "avg", ((6, 7), None, 0, False, True, None)),  # global by kernel
    Pool((2, 5, 7, 7), "adaptive", (1,)),
    Pool((2, 3, 9, 8), "adaptive", ((1, 1),)),
    Pool((2, 3, 7, 9), "adaptive", ((3, 4),)),
    Pool((1, 3, 3, 4), "adaptive", ((5, 7),)),                # larger than the input
    Pool((1, 2, 11, 5), "adaptive", ((4, 5),)),
]
DTYPES = tuple(RTOL)
LAYOUTS = [("contiguous", "contiguous"), ("channels_last", "channels_last"), ("sliced", "contiguous"),
           ("permuted", "channels_last"), ("offset", "sliced")]
G_LAYOUTS = LAYOUTS + [("expanded", "contiguous")]


@dataclass(frozen=True)
class Case:
    op: str
    pool: Pool
    dtype: torch.dtype
    layouts: tuple
    split: int = 1

    def __str__(self):
        return f"{self.op}-{self.pool}-{str(self.dtype)[6:]}-{'-'.join(self.layouts)}-split{self.split}"


ALL_CASES = (
    [Case("forward", p, dt, ls) for p, dt, ls in itertools.product(POOLS, DTYPES, LAYOUTS)]
    + [Case("global_forward", p, dt, ls, s) for p, dt, ls, s in
       itertools.product([p for p in POOLS if p.is_global()], DTYPES, LAYOUTS[:3], (1, 32))]
    + [Case("backward", p, dt, ls) for p, dt, ls in itertools.product(POOLS, DTYPES, G_LAYOUTS)]
)


def layout(t, name):
    if name == "expanded":
        return t.flatten()[:1].reshape(()).expand(t.shape)
    return to_layout(t, name)


def make_operands(case, seed):
    g = torch.Generator().manual_seed(seed)
    x_shape = case.pool.x_shape
    y_shape = case.pool.ref(torch.zeros(x_shape, dtype=torch.float64)).shape
    if case.op == "backward":
        src = layout(torch.randn(y_shape, generator=g, dtype=torch.float64).to(case.dtype), case.layouts[0])
        res = to_layout(torch.zeros(x_shape, dtype=case.dtype), case.layouts[1])
    else:
        src = layout(torch.randn(x_shape, generator=g, dtype=torch.float64).to(case.dtype), case.layouts[0])
        res = to_layout(torch.zeros(y_shape, dtype=case.dtype), case.layouts[1])
    return src, res


def record(case, src, res):
    parts = [struct.pack("<20q", OPS.index(case.op), DTYPE_CODE[case.dtype], case.split, *case.pool.params())]
    parts += [strided_record(src), strided_record(res, data=False)]
    return b"".join(parts)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    operands = [make_operands(c, seed) for seed, c in enumerate(ALL_CASES)]
    data = run_host_harness(tmp_path_factory, "avg_pool2d_host.cu", [record(c, *o) for c, o in zip(ALL_CASES, operands)],
                            ALL_CASES)
    out, pos = {}, 0
    for case, (src, template) in zip(ALL_CASES, operands):
        got, pos = read_strided(data, pos, template)
        out[case] = src, got
    assert pos == len(data)
    return out


def check(got, want, dtype):
    check_host_output(got, want, RTOL[dtype])


@pytest.mark.parametrize("case", [c for c in ALL_CASES if c.op != "backward"], ids=str)
def test_forward(case, results):
    src, got = results[case]
    check(got, case.pool.ref(src.double()), case.dtype)


@pytest.mark.parametrize("case", [c for c in ALL_CASES if c.op == "backward"], ids=str)
def test_backward(case, results):
    gy, got = results[case]
    x = torch.zeros(case.pool.x_shape, dtype=torch.float64, requires_grad=True)
    (want,) = torch.autograd.grad(case.pool.ref(x), x, gy.double())
    check(got, want, case.dtype)
