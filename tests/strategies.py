"""Hypothesis strategies shared by the test modules."""
from hypothesis import strategies as st

from cnnext.testing import LAYOUTS

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
