"""Hypothesis strategies shared by the test modules."""
from hypothesis import strategies as st

from cnnext.testing import LAYOUTS, ConvConf

# grad_output layouts of the pooling parity tests ("expanded": one value, stride 0).
G_LAYOUTS = ("contiguous", "channels_last", "sliced", "expanded")


def pair_arg(draw, values):
    """A pair as torch takes it: an int when both are equal (sometimes), a tuple or a list."""
    if values[0] == values[1] and draw(st.booleans()):
        return values[0]
    return draw(st.sampled_from([tuple, list]))(values)


@st.composite
def pool_layouts(draw):
    """(input layout, grad_output layout)."""
    return draw(st.sampled_from(LAYOUTS)), draw(st.sampled_from(G_LAYOUTS))


@st.composite
def batch_shape(draw, h, w):
    """(N, C, H, W) with N in 0..3, or unbatched (C, H, W)."""
    c = draw(st.integers(1, 5))
    if draw(st.integers(0, 4)) == 0:
        return (c, h, w)
    return (draw(st.integers(0, 3)), c, h, w)


def group_channels(draw, deep):
    """(groups, input channels per group, output channels per group) on both sides of the
    CPU backend's switch between direct loops (thin groups: in * out channels per group
    <= 8) and im2col + GEMM; deep = (input range, output range) of the "deep" kind, GEMM
    dimensions past the float32 sgemm's tiles and K blocks."""
    kind = draw(st.sampled_from(["plain", "plain", "plain", "groups", "depthwise", "deep"]))
    if kind == "deep":
        (c_lo, c_hi), (o_lo, o_hi) = deep
        return draw(st.integers(1, 2)), draw(st.integers(c_lo, c_hi)), draw(st.integers(o_lo, o_hi))
    if kind == "plain":
        return 1, draw(st.integers(1, 6)), draw(st.integers(1, 6))
    if kind == "groups":
        return draw(st.integers(2, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    return draw(st.integers(2, 5)), 1, draw(st.integers(1, 2))


def conv_conf(draw, xshape, wshape, kw):
    """A ConvConf of the given shapes and keyword arguments: bias, layouts and seed drawn."""
    return ConvConf(
        xshape=xshape,
        wshape=wshape,
        bias=draw(st.booleans()),
        kw=kw,
        x_layout=draw(st.sampled_from(LAYOUTS)),
        w_layout=draw(st.sampled_from(["contiguous", "contiguous", "channels_last", "sliced", "offset"])),
        g_layout=draw(st.sampled_from(LAYOUTS + ("expanded",))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
