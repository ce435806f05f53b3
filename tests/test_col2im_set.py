"""The input gradient's at::mm paths (and so conv_transpose2d's forward) where a sample's
columns come in one band: col2im_set (csrc/cpu/conv2d.cpp) writes each row of grad_input once,
summing its taps per stride phase in a row of its own and interleaving the phases, instead
of zeroing grad_input and adding every tap into it (col2im_add). It sums each element's taps
in col2im_add's order from +0, so its float32 results are bitwise those of col2im_add (run
here by a channels_last grad_input, which the set form does not take); float64 against
stock to within a few ulps. Strides 1 to 4 across, odd widths, taps that reach no column,
groups, padding past the kernel's reach, sample blocks, NaN and Inf, and what it leaves to
col2im_add."""
import pytest
import torch
import torch.nn.functional as F

from cnnext._paths import counts, runnable
from cnnext.functional import conv_transpose2d

SET = "conv2d.col2im.set_rows"
ADD_EVEN = "conv2d.col2im.stride2_avx2"
# float32 input gradients take the AVX-512 GEMM's own paths where it runs.
F32 = not runnable("sgemm.gemm")

# conv_transpose2d (N, C_in, H, W, C_out, (KH, KW), stride, padding, groups): its forward is the
# input gradient of the conv2d over its output.
CASES = {
    "k4s2": (2, 32, 14, 14, 16, (4, 4), (2, 2), (1, 1), 1),
    "k3s2_odd": (2, 16, 9, 11, 8, (3, 3), (2, 2), (1, 1), 1),
    "k2s2": (2, 16, 8, 9, 8, (2, 2), (2, 2), (0, 0), 1),
    "k5s3": (3, 12, 10, 13, 7, (5, 5), (3, 3), (2, 2), 1),
    "k1s2": (2, 16, 7, 7, 12, (1, 1), (2, 2), (0, 0), 1),
    "k3s4": (2, 16, 6, 7, 8, (3, 3), (4, 4), (1, 1), 1),
    "rect": (2, 16, 8, 10, 8, (3, 5), (1, 2), (1, 2), 1),
    "k3s1": (2, 16, 12, 12, 24, (3, 5), (1, 1), (1, 2), 1),
    "groups": (2, 32, 8, 8, 16, (4, 4), (2, 2), (1, 1), 2),
    "pad_past": (2, 16, 8, 8, 8, (3, 3), (2, 2), (2, 2), 1),
    # 8 samples of 6 x 6: the input gradient's sample blocks.
    "blocks": (8, 16, 6, 6, 8, (3, 3), (2, 2), (1, 1), 1),
}


def make(case, dtype, seed=0):
    n, c, h, w, o, k, s, p, g = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen, dtype=dtype)
    wt = torch.randn(c, o // g, *k, generator=gen, dtype=dtype)
    return x, wt, dict(stride=s, padding=p, groups=g)


def run(x, wt, conf):
    before = counts()
    y = conv_transpose2d(x, wt, None, conf["stride"], conf["padding"], 0, conf["groups"])
    after = counts()
    return y, {k for k in after if after[k] != before.get(k, 0)}


def dtypes():
    return [torch.float64] + ([torch.float32] if F32 else [])


@pytest.mark.parametrize("dtype", dtypes(), ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_set_rows(case, dtype):
    x, wt, conf = make(case, dtype)
    y, ran = run(x, wt, conf)
    assert SET in ran, f"{SET} did not run: {sorted(ran)}"
    assert ADD_EVEN not in ran
    ref = F.conv_transpose2d(x.double(), wt.double(), None, conf["stride"], conf["padding"], 0, conf["groups"])
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    assert (y.double() - ref).abs().max() <= tol * ref.abs().max()
    if dtype == torch.float32:
        # col2im_add on a channels_last grad_input: the same GEMMs, the same sums.
        y_cl, ran_cl = run(x.contiguous(memory_format=torch.channels_last), wt, conf)
        assert SET not in ran_cl
        assert torch.equal(y, y_cl.contiguous())


@pytest.mark.parametrize("dtype", dtypes(), ids=str)
def test_nonfinite_as_stock(dtype):
    x, wt, conf = make("k4s2", dtype)
    x[0, 1, 0, 0] = float("inf")
    x[0, 2, 3, 4] = -float("inf")
    x[0, 2, 3, 5] = float("inf")
    x[1, 0, 13, 13] = float("nan")
    y, ran = run(x, wt, conf)
    assert SET in ran
    ref = F.conv_transpose2d(x, wt, None, conf["stride"], conf["padding"])
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(torch.isinf(y), torch.isinf(ref)) and torch.equal(y[torch.isinf(y)], ref[torch.isinf(ref)])


def test_signed_zeros_as_col2im_add():
    """All-zero columns: every element is +0 (as zeroing and adding gives), never -0."""
    x, wt, conf = make("k4s2", torch.float64)
    y, ran = run(-torch.zeros_like(x), wt, conf)
    assert SET in ran
    assert torch.equal(torch.signbit(y), torch.zeros_like(y, dtype=torch.bool))


@pytest.mark.parametrize("why", ["channels_last", "dilation", "bands"])
def test_left_to_col2im_add(why):
    x, wt, conf = make("k4s2", torch.float64)
    dil = 1
    if why == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if why == "dilation":
        dil = 2
    if why == "bands":  # a sample's columns past the band budget: 32 x 4 x 4 taps by 200 x 200 positions
        x, wt = torch.randn(1, 64, 200, 200, dtype=torch.float64), torch.randn(64, 32, 4, 4, dtype=torch.float64)
    before = counts()[SET]
    y = conv_transpose2d(x, wt, None, conf["stride"], conf["padding"], 0, 1, dil)
    assert counts()[SET] == before
    ref = F.conv_transpose2d(x, wt, None, conf["stride"], conf["padding"], 0, 1, dil)
    assert (y - ref).abs().max() <= 1e-12 * ref.abs().max()


def test_conv2d_input_gradient_takes_it():
    """conv2d's backward (its grad_input) runs the same path: ResNet's 3x3/2."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 15, 15, generator=gen, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(32, 16, 3, 3, generator=gen, dtype=torch.float64)
    import cnnext
    y = cnnext.functional.conv2d(x, wt, None, 2, 1)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    before = counts()[SET]
    (gx,) = torch.autograd.grad(y, x, gy)
    assert counts()[SET] > before
    xs = x.detach().requires_grad_()
    (want,) = torch.autograd.grad(F.conv2d(xs, wt, None, 2, 1), xs, gy)
    assert (gx - want).abs().max() <= 1e-13 * want.abs().max()
