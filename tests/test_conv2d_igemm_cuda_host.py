"""The implicit-GEMM CUDA conv2d (csrc/cuda/conv2d_igemm_kernels.cuh), run on the CPU: no GPU
needed, only nvcc.

tests/cuda_host/conv2d_igemm_host.cu includes the kernel file and runs, for every block
of the launch grid and every thread of the block, the kernel's own __host__ __device__
pieces in the kernel's order (thread setup, double-buffered stage copies with host
stand-ins for cp.async, the SIMT stage compute, the epilogue); the warp-collective
tensor-core compute (ldmatrix, mma.sync) is emulated from the lane addresses and
fragment coordinates the kernel computes. So this checks, against torch in float64:
the GEMM row -> (n, oh, ow) and k -> (c, kh, kw) maps in both k orders, the padding,
stride, dilation and group handling of forward and input backward (including input
positions no output reads), NCHW / channels-last / strided addressing of input and
output, partial tiles in M, N and K, every copy mapping (m-fast, k-fast, 16-byte
vectors), both shared-memory buffers, the bias / ReLU epilogue, and the fragment
bookkeeping of the mma paths. Shared memory is poisoned before every stage, outputs
start NaN and sit between NaN guards.

Not covered (they need a GPU; the test_igemm_* tests of tests/test_conv2d.py cover them there): the PTX
instructions' actual behaviour (the emulation follows the PTX ISA's fragment layouts),
cp.async completion and the barriers, and the torch-side dispatch.
"""
import itertools
import struct
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from cnnext.testing import (DTYPE_CODE, TOLERANCES, ConvShape as Conv, check_host_output,
                            host_layout as to_layout, needs_nvcc, read_strided, run_host_harness, strided_record, tf32)

pytestmark = needs_nvcc

# (dtype, math): float32 strict (SIMT), float32 TF32, float16, bfloat16.
MATHS = [(torch.float32, "strict"), (torch.float32, "tf32"), (torch.float16, "mma"),
         (torch.bfloat16, "mma")]
# Relative to max |reference|: TOLERANCES["host_igemm"] (cnnext/testing.py says why).
RTOL = TOLERANCES["host_igemm"]
MAP_NAMES = {0: "mfast", 1: "kfast", 2: "vec"}
OPS = ("forward", "input_backward", "weight_backward", "forward_stats")  # the harness's op codes

CONVS = [
    Conv((2, 16, 9, 11), 24, (3, 3), 1, 1, 1, 1),               # 2 row tiles, K = 144
    Conv((1, 8, 12, 11), 136, (1, 1), 1, 0, 1, 1),              # 2 column tiles, K < BK
    Conv((2, 12, 10, 9), 18, (3, 2), (2, 1), (0, 1), (1, 2), 3),  # groups, mixed
    Conv((1, 16, 7, 7), 16, (5, 5), 1, 2, 1, 2),                # 8 channels per group
    Conv((2, 3, 15, 13), 16, (7, 7), 2, 3, 1, 1),               # a stem: 3 channels
    Conv((1, 8, 9, 9), 8, (2, 2), 3, 0, 1, 1),                  # stride > kernel
    Conv((1, 8, 3, 3), 8, (3, 3), 2, 4, 1, 1),                  # padding wider than input
    Conv((2, 8, 6, 6), 8, (3, 3), 1, 1, 1, 8),                  # depthwise
    Conv((3, 24, 6, 5), 40, (3, 3), 1, 2, 2, 1),                # dilation 2
    Conv((0, 8, 5, 5), 16, (3, 3), 1, 1, 1, 1),                 # N = 0
]
# (A layout, C layout).
LAYOUTS = [("contiguous", "contiguous"), ("channels_last", "channels_last"),
           ("sliced", "contiguous"), ("channels_last", "sliced"), ("permuted", "channels_last")]


@dataclass(frozen=True)
class Case:
    op: str             # "forward", "input_backward" or "weight_backward"
    conv: Conv
    dtype: torch.dtype
    math: str
    layouts: tuple
    bias: bool = False
    relu: bool = False
    target_blocks: int = 1  # weight_backward: the grid size its K split aims at

    def __str__(self):
        return "-".join([self.op, str(self.conv), str(self.dtype).replace("torch.", ""), self.math,
                         *self.layouts] + (["bias"] if self.bias else []) + (["relu"] if self.relu else [])
                        + ([f"target{self.target_blocks}"] if self.op == "weight_backward" else []))


CASES = []
for i, (conv, (dt, math), ls) in enumerate(itertools.product(CONVS, MATHS, LAYOUTS)):
    CASES.append(Case("forward", conv, dt, math, ls, bias=i % 2 == 0, relu=i % 3 == 0))
    CASES.append(Case("input_backward", conv, dt, math, ls))


def random_convs(count, seed=6):
    """Small random convolutions (valid by construction): groups, rectangular kernels,
    stride, padding (up to wider than the kernel's reach), dilation, odd sizes."""
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    convs = []
    while len(convs) < count:
        groups = (1, 1, 2, 3, 4)[r(0, 4)]
        c, o = groups * r(1, 12), groups * r(1, 40)
        kh, kw, sh, sw, dh, dw = r(1, 5), r(1, 5), r(1, 3), r(1, 3), r(1, 2), r(1, 2)
        ph, pw = r(0, kh), r(0, kw)
        h, w = r(1, 16), r(1, 16)
        if h + 2 * ph < dh * (kh - 1) + 1 or w + 2 * pw < dw * (kw - 1) + 1:
            continue
        convs.append(Conv((r(1, 3), c, h, w), o, (kh, kw), (sh, sw), (ph, pw), (dh, dw), groups))
    return convs


# Random convolutions: every op, one (dtype, math) and one layout pair each, in rotation.
for i, conv in enumerate(random_convs(16)):
    dt, math = MATHS[i % len(MATHS)]
    ls = LAYOUTS[i % len(LAYOUTS)]
    CASES.append(Case("forward", conv, dt, math, ls, bias=i % 2 == 1, relu=i % 3 == 1))
    CASES.append(Case("input_backward", conv, dt, math, ls))
    CASES.append(Case("weight_backward", conv, dt, math, ls, target_blocks=(1, 7, 40)[i % 3]))

# forward_stats: the forward plus the batch-norm statistics of its stored output (the
# epilogue of conv_bn_relu2d's training path), every (dtype, math), two layouts.
for conv, (dt, math), ls in itertools.product(CONVS, MATHS, LAYOUTS[:2]):
    CASES.append(Case("forward_stats", conv, dt, math, ls, bias=conv.out_channels % 2 == 0))
CASES.append(Case("forward_stats", Conv((3, 16, 31, 29), 20, (3, 3), 1, 1, 1, 1), torch.float32, "strict",
                  LAYOUTS[0], relu=True))  # 21 row tiles: the tree of the finishing kernel

# weight_backward: (grad_output layout, input layout); target_blocks 1 (one split) and
# 40 (several splits of K, whose partial sums a second pass adds).
WGRAD_LAYOUTS = [("contiguous", "contiguous"), ("channels_last", "channels_last"),
                 ("permuted", "sliced"), ("expanded", "channels_last")]
for conv, (dt, math), ls, tb in itertools.product(CONVS, MATHS, WGRAD_LAYOUTS, (1, 40)):
    if tb == 1 or ls in WGRAD_LAYOUTS[1:3]:
        CASES.append(Case("weight_backward", conv, dt, math, ls, target_blocks=tb))


def channels_fastest(t):
    """igemm_channels_fastest of csrc/cuda/conv2d_igemm.h."""
    s = t.stride()
    return s[1] < s[3] and s[1] < s[2]


def k_contiguous_weight(case, w, a):
    """B as the torch side (csrc/cuda/conv2d_launch.cpp) passes it: the weight laid out
    k-contiguous in the kernel's k order, which is channels-fastest when A is."""
    c = case.conv
    a_ch_fast = channels_fastest(a)
    if case.op in ("forward", "forward_stats"):
        return (w.permute(0, 2, 3, 1) if a_ch_fast else w).contiguous()
    o, cg, kh, kw = w.shape
    w5 = w.reshape(c.groups, o // c.groups, cg, kh, kw)
    return (w5.permute(0, 2, 3, 4, 1) if a_ch_fast else w5.permute(0, 2, 1, 3, 4)).contiguous()


def make(case, seed):
    g = torch.Generator().manual_seed(seed)
    c, dt = case.conv, case.dtype
    rand = lambda *s: torch.randn(s, generator=g, dtype=torch.float64).to(dt)  # noqa: E731
    if case.op == "weight_backward":  # (gy, x, None, gw)
        gy = to_layout(rand(*c.y_shape()), case.layouts[0])
        x = to_layout(rand(*c.x_shape), case.layouts[1])
        return gy, x, None, torch.zeros(c.w_shape(), dtype=dt)
    w = rand(*c.w_shape())
    if case.op in ("forward", "forward_stats"):
        a = to_layout(rand(*c.x_shape), case.layouts[0])
        out_shape = c.y_shape()
    else:
        a = to_layout(rand(*c.y_shape()), case.layouts[0])
        out_shape = c.x_shape
    bias = rand(c.out_channels) if case.bias else torch.empty(0, dtype=dt)
    out = to_layout(torch.zeros(out_shape, dtype=dt), case.layouts[1])
    return a, w, bias, out


def record(case, a, w, bias, out):
    head = struct.pack("<5q", OPS.index(case.op),
                       DTYPE_CODE[case.dtype], int(case.math == "tf32"), int(case.relu), case.target_blocks)
    parts = [head, struct.pack("<16q", *case.conv.params())]
    if case.op == "weight_backward":  # a = gy, w = x
        tensors = ((a, True), (w, True), (out, False))
    else:
        tensors = ((a, True), (k_contiguous_weight(case, w, a).reshape(-1), True), (bias, True), (out, False))
    parts += [strided_record(t, data) for t, data in tensors]
    return b"".join(parts)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    operands = [make(c, seed) for seed, c in enumerate(CASES)]
    # PTX only (no ptxas) for sm_80, the oldest target of the kernel's instructions:
    # only the host code runs.
    data = run_host_harness(tmp_path_factory, "conv2d_igemm_host.cu", [record(c, *ops) for c, ops in zip(CASES, operands)],
                            CASES, run_timeout=900, extra=["-gencode=arch=compute_80,code=compute_80"], timeout=900)
    out, pos = {}, 0
    for case, (a, w, bias, template) in zip(CASES, operands):
        (mapping,) = struct.unpack_from("<q", data, pos)
        pos += 8
        got, pos = read_strided(data, pos, template)
        extra = mapping if case.op == "weight_backward" else MAP_NAMES[mapping]
        if case.op == "forward_stats":  # then mean and variance per channel, float32
            o = case.conv.out_channels
            mv = torch.frombuffer(bytearray(data[pos:pos + 8 * o]), dtype=torch.float32)
            pos += 8 * o
            extra = (extra, mv[:o], mv[o:])
        out[case] = (a, w, bias), extra, got
    assert pos == len(data)
    return out


def reference(case, a, w, bias):
    if case.math == "tf32":
        a, w = tf32(a), tf32(w)
    a, w = a.double(), w.double()
    c = case.conv
    if case.op == "weight_backward":  # a = gy, w = x
        return torch.nn.grad.conv2d_weight(w, c.w_shape(), a, *c.args())
    if case.op in ("forward", "forward_stats"):
        y = F.conv2d(a, w, bias.double() if case.bias else None, *c.args())
        return y.clamp_min(0) if case.relu else y
    return torch.nn.grad.conv2d_input(c.x_shape, w, a, *c.args())


@pytest.mark.parametrize("case", CASES, ids=str)
def test_igemm(case, results):
    (a, w, bias), _, got = results[case]
    want = reference(case, a, w, bias)
    check_host_output(got, want, RTOL[case.math] if case.dtype == torch.float32 else RTOL[case.dtype])


def test_every_copy_mapping_ran(results):
    """The cases reach every copy mapping of every element type: the 16-byte vectors
    for 16-bit channels-last inputs with 8 | channels per group, k-fast for float32
    channels-last, m-fast otherwise."""
    seen = {(c.dtype, m) for c, (_, m, _) in results.items() if c.op in ("forward", "input_backward")}
    for dt in (torch.float16, torch.bfloat16):
        assert (dt, "vec") in seen and (dt, "mfast") in seen
    assert (torch.float32, "kfast") in seen and (torch.float32, "mfast") in seen
    for c, (_, m, _) in results.items():
        if c.op not in ("forward", "input_backward"):
            continue
        if c.dtype != torch.float32 and c.layouts[0] == "channels_last" and (c.conv.x_shape[1] // c.conv.groups if c.op == "forward" else c.conv.out_channels // c.conv.groups) % 8 == 0:
            assert m == "vec", str(c)


def test_weight_backward_splits_k(results):
    """target_blocks 40 splits K into several runs wherever there are enough k tiles."""
    for c, (_, splits, _) in results.items():
        if c.op != "weight_backward":
            continue
        if c.target_blocks == 1 or c.conv.x_shape[0] == 0:
            assert splits == 1, str(c)
    assert max(s for c, (_, s, _) in results.items() if c.op == "weight_backward") > 4


@pytest.mark.parametrize("case", [c for c in CASES if c.op == "forward_stats"], ids=str)
def test_forward_statistics(case, results):
    """Mean and biased variance per channel of the output as stored, from the epilogue's
    per-tile (count, mean, M2) combined by the finishing kernel's tree."""
    _, (_, mean, var), got = results[case]
    y = got.double()
    if y.numel() == 0:
        return
    want_mean = y.mean((0, 2, 3))
    want_var = y.var((0, 2, 3), unbiased=False)
    scale = y.abs().max().item()
    assert (mean.double() - want_mean).abs().max().item() <= 1e-5 * scale
    assert (var.double() - want_var).abs().max().item() <= 1e-5 * scale * scale
