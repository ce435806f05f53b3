"""avg_pool2d and adaptive_avg_pool2d: fake (meta) kernels, registered on the ops
(torch.ops.cnnext.*) themselves. The autograd formulas below are implemented in C++
(csrc/ops/autograd_pool2d.cpp, the Autograd dispatch key).

Both forwards are linear maps of the input, y = A x, and their backward ops are the
adjoints, dx = A^T dy, linear in grad_output. So the ops are closed under
differentiation:
  avg_pool2d(x)                        d/dx:  avg_pool2d_backward(g, x)
  avg_pool2d_backward(g, x)            d/dg:  avg_pool2d(dz)              (x: shape only)
  adaptive_avg_pool2d(x, size)         d/dx:  adaptive_avg_pool2d_backward(g, x)
  adaptive_avg_pool2d_backward(g, x)   d/dg:  adaptive_avg_pool2d(dz, g's H x W)
The backward ops read the forward's input only for its shape and memory layout, as
torch's aten::avg_pool2d_backward does; it gets no gradient.
"""
import torch

from ._shapes import check_same_device, pool_out_size, prefers_channels_last


def _out_like(x, shape):
    """An empty tensor of shape in the layout the ops give their output: the input's
    (channels_last when its strides suggest channels_last, see prefers_channels_last);
    contiguous for unbatched input."""
    batched = x.dim() == 4
    fmt = torch.channels_last if batched and prefers_channels_last(x) else torch.contiguous_format
    out = x.new_empty(shape if batched else (1, *shape)).contiguous(memory_format=fmt)
    return out if batched else out.squeeze(0)


def _avg_out_shape(x, kernel_size, stride, padding, ceil_mode):
    stride = stride if len(stride) else kernel_size
    h, w = x.shape[-2:]
    oh = pool_out_size(h, kernel_size[0], stride[0], padding[0], 1, ceil_mode)
    ow = pool_out_size(w, kernel_size[1], stride[1], padding[1], 1, ceil_mode)
    return (*x.shape[:-2], oh, ow)


@torch.library.register_fake("cnnext::avg_pool2d")
def _avg_pool2d_fake(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    return _out_like(input, _avg_out_shape(input, kernel_size, stride, padding, ceil_mode))


@torch.library.register_fake("cnnext::avg_pool2d_backward")
def _avg_pool2d_backward_fake(grad_output, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                              divisor_override):
    check_same_device("avg_pool2d_backward", grad_output=grad_output, input=input)
    return _out_like(input, input.shape)


@torch.library.register_fake("cnnext::adaptive_avg_pool2d")
def _adaptive_avg_pool2d_fake(input, output_size):
    return _out_like(input, (*input.shape[:-2], *output_size))


@torch.library.register_fake("cnnext::adaptive_avg_pool2d_backward")
def _adaptive_avg_pool2d_backward_fake(grad_output, input):
    check_same_device("adaptive_avg_pool2d_backward", grad_output=grad_output, input=input)
    if grad_output.shape[-2] == 1 and grad_output.shape[-1] == 1:  # torch's mean: a contiguous gradient
        return input.new_empty(input.shape)
    return _out_like(input, input.shape)
