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

Not covered here (tests/test_cuda.py covers them on a GPU): the __global__ wrappers,
the launch configuration, and block_sum, the device-only reduction; the host adds a
reduction's kThreads-strided partial sums in order instead.

The program is compiled once per session and runs once per module over every case;
each test then compares one case's output with a float64 reference that torch
computes from the very (rounded) inputs the program read.
"""
import ctypes
import itertools
import os
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(REPO, "tests", "cuda_host", "conv2d_host.cu")


def find_nvcc():
    """$NVCC, else nvcc on PATH, else $CUDA_HOME/bin/nvcc; None if none is there."""
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"),
                 cuda_home and os.path.join(cuda_home, "bin", "nvcc")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


NVCC = find_nvcc()

# The half / bfloat16 switches torch's cpp_extension builds the kernels with.
NVCC_FLAGS = ["-std=c++17", f"-I{os.path.join(REPO, 'csrc')}", "--expt-relaxed-constexpr",
              "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
              "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


def build_host_program(exe, source, opt="-O2", extra=(), timeout=600):
    """Compiles the nvcc host harness `source` into `exe` (a test failure with nvcc's
    output if it does not build); returns exe."""
    cmd = [NVCC, *NVCC_FLAGS, opt, *extra, "-o", str(exe), source]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        pytest.fail(f"nvcc failed ({' '.join(cmd)}):\n{res.stdout}{res.stderr}", pytrace=False)
    return str(exe)


def run_host_program(exe, directory, records, cases, timeout=300):
    """Runs a host harness on the concatenated `records` (one per case) and returns the
    bytes it wrote; a failure names the case of the record the program stopped at."""
    (directory / "in.bin").write_bytes(b"".join(records))
    res = subprocess.run([str(exe), str(directory / "in.bin"), str(directory / "out.bin")],
                         capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        m = re.search(r"record (\d+)", res.stderr)
        where = f" at case {cases[int(m.group(1))]}" if m and int(m.group(1)) < len(cases) else ""
        pytest.fail(f"{os.path.basename(str(exe))} failed (exit status {res.returncode}){where}: "
                    f"{res.stderr}", pytrace=False)
    return (directory / "out.bin").read_bytes()
pytestmark = pytest.mark.skipif(
    NVCC is None,
    reason="nvcc not found (not $NVCC, not on PATH, not $CUDA_HOME/bin/nvcc): "
           "cannot build the host harness of the CUDA kernels",
)

# Largest error allowed, relative to the largest magnitude of the float64 reference.
# float32: as tests/test_cuda.py; the worst case here, 784 equal terms summed in one
# partial (channel_sum of an expanded grad_output, split 1), is off by 7.5e-6.
# float16 / bfloat16 accumulate in float, so their error is the final rounding to
# nearest, at most the unit roundoff (2^-11 = 4.9e-4, 2^-8 = 3.9e-3) of max |reference|;
# the bounds sit just above, so that rounding toward zero (twice the error) fails.
RTOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 7e-4, torch.bfloat16: 5e-3}
DTYPES = tuple(RTOL)
DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}  # DType
OPS = ("forward", "input_backward", "weight_backward", "channel_sum")
K_THREADS = 256  # kThreads of csrc/cuda/launch.h: the partial sums of one block


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


@dataclass(frozen=True)
class Conv:
    x_shape: tuple  # (N, C, H, W)
    out_channels: int
    kernel: tuple   # (KH, KW)
    stride: object
    padding: object
    dilation: object
    groups: int

    def out_hw(self):
        (_, _, h, w), (kh, kw) = self.x_shape, self.kernel
        (sh, sw), (ph, pw), (dh, dw) = pair(self.stride), pair(self.padding), pair(self.dilation)
        return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def y_shape(self):
        return (self.x_shape[0], self.out_channels, *self.out_hw())

    def w_shape(self):
        return (self.out_channels, self.x_shape[1] // self.groups, *self.kernel)

    def args(self):
        """stride, padding, dilation, groups, as torch takes them."""
        return self.stride, self.padding, self.dilation, self.groups

    def params(self):
        """The 16 fields of Conv2dParams."""
        (sh, sw), (ph, pw), (dh, dw) = pair(self.stride), pair(self.padding), pair(self.dilation)
        return (*self.x_shape, self.out_channels, *self.kernel, *self.out_hw(),
                sh, sw, ph, pw, dh, dw, self.groups)

    def __str__(self):
        s = lambda v: "x".join(map(str, pair(v)))  # noqa: E731
        return (f"x{'x'.join(map(str, self.x_shape))}-o{self.out_channels}-k{s(self.kernel)}"
                f"-s{s(self.stride)}-p{s(self.padding)}-d{s(self.dilation)}-g{self.groups}")


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


def span(t):
    """Elements from t's first element to its last one (0 if empty)."""
    return 0 if t.numel() == 0 else 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))


def to_layout(t, layout):
    """t's values (those of t[0, 0, 0, 0] for "expanded") in the given memory layout."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":  # every other element of a wider tensor, NaN between
        wide = torch.full((*t.shape[:-1], 2 * t.shape[-1] + 1), float("nan"), dtype=t.dtype)
        out = wide[..., 1::2]
        out.copy_(t)
        return out
    if layout == "permuted":  # H and W swapped in memory
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "expanded":  # stride 0 in every dim, as y.sum() gives backward
        return t.reshape(-1)[:1].reshape(1, 1, 1, 1).expand(t.shape) if t.numel() else t
    raise ValueError(layout)


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
    for t in (*inputs.values(), out):
        strides = t.stride() if t.dim() == 4 else (0, 0, 0, 0)  # 1-D: contiguous, unused
        parts.append(struct.pack("<5q", *strides, span(t)))
        if t is not out and span(t):
            window = torch.as_strided(t, (span(t),), (1,), t.storage_offset())
            raw = window.contiguous()  # torch alone: numpy is not among the test dependencies
            parts.append(ctypes.string_at(raw.data_ptr(), raw.numel() * raw.element_size()))
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
    return build_host_program(exe, SOURCE, extra=arch_flags)


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
        nbytes = span(template) * template.element_size()
        raw = data[pos:pos + nbytes]
        flat = (torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw
                else torch.empty(0, dtype=torch.uint8)).view(case.dtype)
        pos += nbytes
        out[case] = inputs, torch.as_strided(flat, template.shape, template.stride())
    assert pos == len(data), f"output is {len(data)} bytes, the cases account for {pos}"
    return out


def check(got, want, dtype, rtol=None):
    """got: every element written and nothing else in its span; its values within
    rtol (default RTOL[dtype]) of max |want|."""
    rtol = RTOL[dtype] if rtol is None else rtol
    assert got.shape == want.shape, f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    window = torch.as_strided(got, (span(got),), (1,))
    written = torch.zeros(span(got), dtype=torch.bool)
    torch.as_strided(written, got.shape, got.stride()).fill_(True)
    assert torch.isfinite(got).all(), "an output element was not written (NaN) or is not finite"
    assert window[~written].isnan().all(), "a gap of the strided output was written"
    if want.numel() == 0:
        return
    scale = max(want.abs().max().item(), 1e-30)
    err = (got.double() - want).abs().max().item()
    assert err <= rtol * scale, f"max abs error {err:.3e} > {rtol:g} * max |reference| {scale:.3e}"


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
