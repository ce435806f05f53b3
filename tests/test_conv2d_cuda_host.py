"""The arithmetic of the CUDA conv2d kernels, run on the CPU: no GPU needed, only nvcc.

csrc/cuda/conv2d.cu writes each kernel as a thin loop around a __host__ __device__
function: forward_element and input_backward_element compute one output element,
weight_backward_partial and channel_sum_partial one partial sum of a reduction.
tests/cuda_host/conv2d_host.cu includes that file and calls those functions on the
host over tensors this module writes to a file, so the index and stride math, the
stride / padding / dilation / groups handling, the accumulation types and the dtype
conversions of the kernels are checked on any machine with nvcc. Like the launchers,
the program walks the output in channels-last order when the output's strides are
channels-last, so both instantiations of the elementwise bodies run. Outputs start
out NaN and inputs sit between NaN guards, so a missed element, a write into a gap
or just past the end, and a read of a gap or just outside an input all fail.

Not covered here (tests/test_conv2d.py covers them on a GPU): the __global__ wrappers,
the launch configuration, and block_sum, the device-only reduction; the host adds a
reduction's kThreads-strided partial sums in order instead.

The program is compiled once per session and runs once per module over every case;
each test then compares one case's output with a float64 reference that torch
computes from the very (rounded) inputs the program read.
"""
import itertools
import struct
import subprocess
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from cnnext.testing import (DTYPE_CODE, NVCC, TOLERANCES, ConvShape as Conv, build_host_program, check_host_output,
                            host_layout as to_layout, needs_nvcc, read_strided, run_host_program, strided_record)

pytestmark = needs_nvcc

# Largest error allowed: TOLERANCES["host_conv"] (cnnext/testing.py says why).
RTOL = TOLERANCES["host_conv"]
DTYPES = tuple(RTOL)
OPS = ("forward", "input_backward", "weight_backward", "channel_sum")
K_THREADS = 256  # kThreads of csrc/cuda/launch.h: the partial sums of one block


CONVS = [
    Conv((2, 3, 7, 9), 4, (3, 3), 1, 1, 1, 1),
    Conv((2, 4, 9, 7), 6, (3, 2), (2, 1), (0, 1), (1, 2), 2),     # rectangular, mixed
    Conv((2, 6, 9, 8), 6, (3, 3), 2, 1, 1, 6),                    # depthwise
    Conv((1, 4, 7, 7), 8, (5, 5), 1, 2, 1, 4),                    # depthwise, multiplier 2
    Conv((3, 5, 6, 5), 7, (1, 1), 1, 0, 1, 1),                    # pointwise
    Conv((2, 2, 11, 10), 3, (5, 3), (3, 2), (2, 0), (2, 1), 1),
    Conv((1, 3, 10, 8), 2, (3, 3), 1, 2, 2, 1),                   # dilated, 'same' padding
    Conv((1, 2, 9, 9), 3, (2, 2), 3, 0, 1, 1),                    # stride > kernel: unread input
    Conv((1, 4, 4, 4), 4, (4, 4), 1, 0, 1, 2),                    # kernel as large as the input
    Conv((1, 2, 3, 3), 2, (3, 3), 2, 4, 1, 1),                    # padding wider than the input
    Conv((2, 6, 6, 5), 9, (2, 3), (1, 3), (3, 2), 1, 3),
    Conv((4, 16, 14, 14), 8, (3, 3), 1, 1, 1, 2),                 # sums longer than kThreads
]
EMPTY_BATCH = Conv((0, 4, 5, 5), 6, (3, 3), 1, 1, 1, 2)           # reductions only


@dataclass(frozen=True)
class Case:
    op: str
    conv: Conv
    dtype: torch.dtype
    layouts: tuple      # the op's strided operands: (x, y), (gy, gx), (gy, x) or (t,)
    bias: bool = False  # forward only
    split: int = 1      # reductions only: partial sums, each over every split-th term

    def __str__(self):
        parts = [self.op, str(self.conv), str(self.dtype).replace("torch.", ""),
                 "-".join(self.layouts)]
        if self.op == "forward":
            parts.append("bias" if self.bias else "nobias")
        if self.op in ("weight_backward", "channel_sum"):
            parts.append(f"split{self.split}")
        return "-".join(parts)


# (input layout, output layout) of the elementwise kernels: both element orders
# (channels_last output or not), strided and gapped inputs and outputs.
ELEMENTWISE_LAYOUTS = [
    ("contiguous", "contiguous"), ("channels_last", "channels_last"),
    ("sliced", "channels_last"), ("permuted", "contiguous"), ("channels_last", "sliced"),
]
# (gy, x) of weight backward.
WEIGHT_BACKWARD_LAYOUTS = [
    ("contiguous", "contiguous"), ("channels_last", "channels_last"),
    ("permuted", "sliced"), ("expanded", "channels_last"),
]

FORWARD = [Case("forward", c, dt, ls, bias=b) for c, dt, ls, b in
           itertools.product(CONVS, DTYPES, ELEMENTWISE_LAYOUTS, (True, False))]
INPUT_BACKWARD = [Case("input_backward", c, dt, ls) for c, dt, ls in
                  itertools.product(CONVS, DTYPES, ELEMENTWISE_LAYOUTS + [("expanded", "contiguous")])]
WEIGHT_BACKWARD = [Case("weight_backward", c, dt, ls, split=s) for c, dt, ls, s in
                   itertools.product(CONVS + [EMPTY_BATCH], DTYPES, WEIGHT_BACKWARD_LAYOUTS,
                                     (1, K_THREADS))]
CHANNEL_SUM = [Case("channel_sum", c, dt, (layout,), split=s) for c, dt, layout, s in
               itertools.product(CONVS + [EMPTY_BATCH], DTYPES,
                                 ("contiguous", "channels_last", "sliced", "expanded"),
                                 (1, 7, K_THREADS))]
ALL_CASES = FORWARD + INPUT_BACKWARD + WEIGHT_BACKWARD + CHANNEL_SUM


def make_operands(case, seed):
    """The case's input tensors (in the tested dtype and layouts) and its output
    tensor (zeros, in the layout the program is to write it in)."""
    g = torch.Generator().manual_seed(seed)
    c, dt = case.conv, case.dtype
    rand = lambda *shape: torch.randn(shape, generator=g, dtype=torch.float64).to(dt)  # noqa: E731
    zeros = lambda shape, layout="contiguous": to_layout(torch.zeros(shape, dtype=dt), layout)  # noqa: E731
    if case.op == "forward":
        x = to_layout(rand(*c.x_shape), case.layouts[0])
        b = rand(c.out_channels) if case.bias else torch.empty(0, dtype=dt)
        return dict(x=x, w=rand(*c.w_shape()), b=b), zeros(c.y_shape(), case.layouts[1])
    if case.op == "input_backward":
        gy = to_layout(rand(*c.y_shape()), case.layouts[0])
        return dict(gy=gy, w=rand(*c.w_shape())), zeros(c.x_shape, case.layouts[1])
    if case.op == "weight_backward":
        gy = to_layout(rand(*c.y_shape()), case.layouts[0])
        x = to_layout(rand(*c.x_shape), case.layouts[1])
        return dict(gy=gy, x=x), zeros(c.w_shape())
    t = to_layout(rand(*c.y_shape()), case.layouts[0])  # channel_sum: a grad_output
    return dict(t=t), zeros(t.shape[1])


def record(case, inputs, out):
    """The program's input record of one case (format: conv2d_host.cu's header)."""
    if case.op == "channel_sum":
        n, ch, h, w = inputs["t"].shape
        params = (n, ch, h, w) + (0,) * 12
    else:
        params = case.conv.params()
    parts = [struct.pack("<19q", OPS.index(case.op), DTYPE_CODE[case.dtype], case.split, *params)]
    parts += [strided_record(t) for t in inputs.values()] + [strided_record(out, data=False)]
    return b"".join(parts)


@pytest.fixture(scope="session")
def conv2d_host(tmp_path_factory):
    """Path of the compiled tests/cuda_host/conv2d_host.cu."""
    exe = str(tmp_path_factory.mktemp("cuda_host") / "conv2d_host")
    # PTX for the oldest architecture this nvcc knows: the device code must compile
    # (the file holds the kernels too), but only the host code runs.
    try:
        arch = subprocess.run([NVCC, "--list-gpu-arch"], capture_output=True, text=True,
                              timeout=60).stdout.split()
    except (OSError, subprocess.SubprocessError):
        arch = []
    arch_flags = [f"-gencode=arch={arch[0]},code={arch[0]}"] if arch else []
    return build_host_program(exe, "conv2d_host.cu", extra=arch_flags)


@pytest.fixture(scope="module")
def results(conv2d_host, tmp_path_factory):
    """{case: (inputs, output)} for every case of ALL_CASES, from one run of the program.
    output is a view of the program's output buffer; gaps of a strided output hold what
    the program left there."""
    operands = [make_operands(case, seed) for seed, case in enumerate(ALL_CASES)]
    d = tmp_path_factory.mktemp("cuda_host_run")
    data = run_host_program(conv2d_host, d, [record(c, *ops) for c, ops in zip(ALL_CASES, operands)],
                            ALL_CASES)
    out, pos = {}, 0
    for case, (inputs, template) in zip(ALL_CASES, operands):
        got, pos = read_strided(data, pos, template)
        out[case] = inputs, got
    assert pos == len(data), f"output is {len(data)} bytes, the cases account for {pos}"
    return out


def check(got, want, dtype, rtol=None):
    """got: every element written and nothing else in its span; its values within
    rtol (default RTOL[dtype]) of max |want|."""
    check_host_output(got, want, RTOL[dtype] if rtol is None else rtol)


@pytest.mark.parametrize("case", FORWARD, ids=str)
def test_forward(case, results):
    inputs, got = results[case]
    b = inputs["b"].double() if case.bias else None
    want = F.conv2d(inputs["x"].double(), inputs["w"].double(), b, *case.conv.args())
    check(got, want, case.dtype)


@pytest.mark.parametrize("case", INPUT_BACKWARD, ids=str)
def test_input_backward(case, results):
    inputs, got = results[case]
    want = torch.nn.grad.conv2d_input(case.conv.x_shape, inputs["w"].double(),
                                      inputs["gy"].double(), *case.conv.args())
    check(got, want, case.dtype)


@pytest.mark.parametrize("case", WEIGHT_BACKWARD, ids=str)
def test_weight_backward(case, results):
    inputs, got = results[case]
    want = torch.nn.grad.conv2d_weight(inputs["x"].double(), case.conv.w_shape(),
                                       inputs["gy"].double(), *case.conv.args())
    check(got, want, case.dtype)


@pytest.mark.parametrize("case", CHANNEL_SUM, ids=str)
def test_channel_sum(case, results):
    inputs, got = results[case]
    check(got, inputs["t"].double().sum((0, 2, 3)), case.dtype)
