"""Output-size math for the fake (meta) kernels.

Mirrors csrc/common/conv2d.h, which the C++ checks and kernels use; the Python copy
exists because fake kernels must also work on symbolic sizes under torch.compile.
tests/test_conv2d.py::test_opcheck checks that both agree.
"""
import torch
from torch._prims_common import suggest_memory_format


def conv_out_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_transpose_out_size(size, kernel, stride, padding, dilation, output_padding):
    """Output length of a transposed convolution (conv_transpose_out_size in csrc/common/conv2d.h)."""
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


def prefers_channels_last(*tensors):
    """The layout rule of csrc/ops (layout_of): channels_last output when any 4-D
    operand's strides suggest channels_last as torch decides (suggest_memory_format: a
    sliced channels_last tensor counts, and so does one that is also plain contiguous).
    Callers pass only the weight for unbatched input, as csrc/ops does."""
    return any(t.dim() == 4 and suggest_memory_format(t) == torch.channels_last for t in tensors)


def pool_out_size(size, kernel, stride, padding, dilation, ceil_mode):
    """Output length of pooling (pool_out_size in csrc/common/pool2d.h): with ceil_mode
    the last window must start inside the input or the left padding."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def check_same_device(op, **tensors):
    """Every tensor argument of an op on one device, as the C++ checks require. The fake
    kernels run this too: a CPU input with meta indices dispatches to the Meta key, and
    would otherwise come back as an uninitialised tensor instead of an error."""
    given = [(name, t.device) for name, t in tensors.items() if t is not None]
    if len({d for _, d in given}) > 1:
        raise RuntimeError(f"{op}: expected all tensors to be on the same device, got "
                           + ", ".join(f"{name} on {d}" for name, d in given))
