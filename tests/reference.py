"""References and comparisons shared by tests/test_opinfo.py and tests/test_fuzz.py:
cnnext against stock torch computed on contiguous float64 copies, and the exact max-pooling
reference where stock itself misbehaves."""
import torch
import torch.nn.functional as F

# The largest error allowed, relative to the largest magnitude of the float64 reference.
RTOL = {torch.float64: 1e-12, torch.float32: 2e-5}


def channels_last(t):
    """t with channels innermost in memory (3-D: an unbatched image), same values."""
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if t.dim() == 3:
        return t.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    return t


def float64_copy(t):
    """A contiguous float64 leaf copy of a floating tensor (other tensors: contiguous), with
    t's requires_grad; non-tensors as they are."""
    if not isinstance(t, torch.Tensor):
        return t
    out = t.detach().contiguous()
    if out.is_floating_point():
        out = out.to(torch.float64)
    return out.requires_grad_(t.requires_grad)


def assert_close(actual, expected, dtype, what):
    """actual (cnnext, in dtype) within RTOL[dtype] of the largest magnitude of expected (the
    float64 reference); infinities and NaN in the same places; integer tensors equal."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not actual.is_floating_point():
        assert actual.dtype == expected.dtype and torch.equal(actual, expected), f"{what}: differ"
        return
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype} != {dtype}"
    a, e = actual.detach().double(), expected.detach().double()
    finite = torch.isfinite(e)
    assert torch.equal(torch.isfinite(a), finite) and torch.equal(a[~finite].nan_to_num(),
                                                                e[~finite].nan_to_num()), \
        f"{what}: non-finite values differ"
    if finite.any():
        scale = max(e[finite].abs().max().item(), 1e-30)
        err = (a[finite] - e[finite]).abs().max().item()
        assert err <= RTOL[dtype] * scale, f"{what}: max abs error {err:.3e} > {RTOL[dtype]:g} * {scale:.3e}"


def memory_format(t):
    """"contiguous", "channels_last", "both" (either, e.g. one channel) or "strided"."""
    if t.dim() != 4:
        return "contiguous" if t.is_contiguous() else "strided"
    cl, c = t.is_contiguous(memory_format=torch.channels_last), t.is_contiguous()
    return {(True, True): "both", (True, False): "channels_last", (False, True): "contiguous"}.get((cl, c), "strided")


def assert_same_format(ours, stock, what):
    """The same memory format (an empty tensor has none to compare)."""
    if ours.numel() == 0 and stock.numel() == 0:
        return
    assert memory_format(ours) == memory_format(stock), \
        f"{what}: memory format {memory_format(ours)} (strides {ours.stride()}), " \
        f"stock {memory_format(stock)} (strides {stock.stride()})"


def _pool_args(args, kwargs):
    """max_pool2d's arguments by name (return_indices dropped)."""
    names = ["kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"]
    kw = dict(zip(names, args))
    kw.update(kwargs)
    kw.pop("return_indices", None)
    return kw


def _pair(v):
    return tuple(v) * (2 if len(tuple(v)) == 1 else 1) if isinstance(v, (tuple, list)) else (v, v)


def _empty_windows(x, kw):
    """(OH, OW) bool: the windows of max_pool2d with these arguments that hold no input
    element (every tap in the padding)."""
    k = _pair(kw["kernel_size"])
    stride = kw.get("stride")
    s = k if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0) else _pair(stride)
    p, d = _pair(kw.get("padding", 0)), _pair(kw.get("dilation", 1))
    with torch.no_grad():
        out = F.max_pool2d(x.new_zeros((1, *x.shape[-2:])), **kw)
    empty = []
    for dim in range(2):
        n, size = out.shape[-2 + dim], x.shape[-2 + dim]
        start = torch.arange(n) * s[dim] - p[dim]
        taps = start.unsqueeze(1) + torch.arange(k[dim]).unsqueeze(0) * d[dim]
        empty.append(~((taps >= 0) & (taps < size)).any(1))
    return empty[0].unsqueeze(1) | empty[1].unsqueeze(0)


def max_pool_reference(x, *args, **kwargs):
    """max_pool2d as stock computes it, differentiable to every order and in forward mode
    without stock's max_pool2d backward: the output gathered from x at stock's indices, and
    -inf with no gradient for a window entirely in the padding. There stock's index is its
    first tap's position, which lies outside the plane (stock's backward writes there and
    aborts the process with "double free or corruption", in either layout) or, with a
    dilated window, names an element the window does not hold (stock's backward sends that
    element the gradient). Max pooling's derivative is exactly this gather: an exact
    reference for every order."""
    return_indices = kwargs.get("return_indices", args[5] if len(args) > 5 else False)
    kw = _pool_args(args, kwargs)
    with torch.no_grad():
        _, idx = F.max_pool2d(x.detach(), return_indices=True, **kw)
    plane = x.shape[-2] * x.shape[-1]
    empty = _empty_windows(x, kw)
    gathered = x.flatten(-2).gather(-1, idx.clamp(0, max(plane - 1, 0)).flatten(-2)).view(idx.shape)
    out = torch.where(empty, torch.full_like(gathered, float("-inf")), gathered)
    return (out, idx) if return_indices else out


def window_in_padding(x, *args, **kwargs):
    """Whether max_pool2d with these arguments has a window entirely in the padding, where
    stock's backward aborts the process or sends the gradient to an element outside the
    window."""
    kw = _pool_args(args, kwargs)
    with torch.no_grad():
        if F.max_pool2d(x.detach(), **kw).numel() == 0 and x.shape[-2] * x.shape[-1] == 0:
            return False
    return bool(_empty_windows(x, kw).any())




