"""Helpers shared by tests/test_avg_pool2d.py and tests/test_adaptive_avg_pool2d.py:
parity of a cnnext pooling function with its torch.nn.functional namesake."""
import torch
from hypothesis import strategies as st

from conftest import LAYOUTS, is_channels_last, to_layout

RTOL = {torch.float64: 1e-12, torch.float32: 2e-6}
G_LAYOUTS = ("contiguous", "channels_last", "sliced", "expanded")


def grad_output_like(out, layout, gen):
    """A grad_output for out: random in the given layout, or "expanded": one value with
    stride 0 everywhere (what out.sum().backward() sends, scaled)."""
    if layout == "expanded":
        return torch.randn((), dtype=out.dtype, generator=gen).expand(out.shape)
    return to_layout(torch.randn(out.shape, dtype=out.dtype, generator=gen), layout)


def torch_float64(ref, x, go):
    """torch's output and input gradient in float64, from contiguous copies."""
    x64 = x.detach().double().contiguous().requires_grad_()
    y = ref(x64)
    (gx,) = torch.autograd.grad(y, x64, go.double()) if y.numel() else (torch.zeros_like(x64),)
    return y.detach(), gx


def check_parity(ours, ref, xshape, dtype, x_layout, g_layout, seed):
    """cnnext's output and input gradient against torch's (in float64), each within
    RTOL[dtype] of the largest magnitude of its terms (torch's result on |x|, |grad|).
    Returns cnnext's (output, grad_input)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(xshape, dtype=dtype, generator=gen)
    xl = to_layout(x, x_layout).requires_grad_()
    out = ours(xl)
    go = grad_output_like(out, g_layout, gen)
    (gx,) = torch.autograd.grad(out, xl, go) if out.numel() else (torch.zeros_like(xl),)
    want_y, want_gx = torch_float64(ref, x, go)
    mag_y, mag_gx = torch_float64(ref, x.abs(), go.abs())
    for name, got, want, mag in (("output", out, want_y, mag_y), ("grad_input", gx, want_gx, mag_gx)):
        assert got.dtype == dtype, name
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        if want.numel() == 0:
            continue
        assert torch.isfinite(got).all(), f"{name}: not finite"
        bound = RTOL[dtype] * max(mag.abs().max().item(), 1e-300)
        err = (got.double() - want).abs().max().item()
        assert err <= bound, f"{name}: max abs error {err:.3e} > {bound:.3e}"
    return out, gx


def check_layout_like_torch(ours, ref, xshape, x_layout):
    """The output has torch's layout where torch's layout is unambiguous (dense input
    and output without size-1 dims), and the input gradient torch's strides."""
    if x_layout not in ("contiguous", "channels_last") or min(xshape) <= 1:
        return
    x = to_layout(torch.randn(xshape), x_layout)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    ys = [ours(xs[0]), ref(xs[1])]
    if ys[1].dim() != 4 or min(ys[1].shape) <= 1:
        return  # torch's layout of a 1x1 output and of its gradient varies with its code path
    assert ys[0].is_contiguous() == ys[1].is_contiguous()
    assert is_channels_last(ys[0]) == is_channels_last(ys[1])
    if ys[1].numel():
        g = torch.randn(ys[1].shape)
        g0, = torch.autograd.grad(ys[0], xs[0], g)
        g1, = torch.autograd.grad(ys[1], xs[1], g)
        assert g0.stride() == g1.stride(), (g0.stride(), g1.stride())


@st.composite
def layouts(draw):
    return draw(st.sampled_from(LAYOUTS)), draw(st.sampled_from(G_LAYOUTS))


@st.composite
def batch_shape(draw, h, w):
    """(N, C, H, W) with N in 0..3, or unbatched (C, H, W)."""
    c = draw(st.integers(1, 5))
    if draw(st.integers(0, 4)) == 0:
        return (c, h, w)
    return (draw(st.integers(0, 3)), c, h, w)
