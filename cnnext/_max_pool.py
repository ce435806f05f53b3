"""Fake kernels of the max-pooling ops (csrc/ops/max_pool2d.cpp); their autograd formulas,
below, are implemented in C++ (csrc/ops/autograd_pool2d.cpp, the Autograd dispatch key).

The five ops are closed under differentiation, so gradients of any order run on
cnnext kernels. With S the scatter-add of each plane to the positions the indices name
(windows with no tap inside the input pass nothing):
  max_pool2d_with_indices(x)           y = S^T x (x at idx)      d/dx: S dy  = max_pool2d_with_indices_backward
  max_pool2d_with_indices_backward(g)  S g                       d/dg: S^T dz = max_pool2d_select
  max_pool2d_select(x)                 S^T x                     d/dx: S dz
  max_unpool2d(x)                      zeros, u[idx] = x          d/dx: du at idx = max_unpool2d_backward
  max_unpool2d_backward(g)             g at idx                  d/dg: max_unpool2d(dz)
(max_unpool2d's formula is torch's: with repeated indices the forward keeps one value
but the gradient reaches every input that named the position.) Indices are integer
outputs and never differentiable.
"""
import torch

from ._shapes import check_same_device, pool_out_size, prefers_channels_last


def _fmt(t, batched):
    return torch.channels_last if batched and prefers_channels_last(t) else torch.contiguous_format


def _new(ref, shape, fmt, dtype=None):
    out = ref.new_empty(shape, dtype=dtype if dtype is not None else ref.dtype)
    return out.contiguous(memory_format=fmt) if len(shape) == 4 else out


def _pool_out(h, w, kernel_size, stride, padding, dilation, ceil_mode):
    stride = stride if len(stride) else kernel_size
    return (pool_out_size(h, kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode),
            pool_out_size(w, kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode))


@torch.library.register_fake("cnnext::max_pool2d_with_indices")
def _max_pool2d_fake(input, kernel_size, stride, padding, dilation, ceil_mode):
    oh, ow = _pool_out(input.shape[-2], input.shape[-1], kernel_size, stride, padding, dilation, ceil_mode)
    shape = (*input.shape[:-2], oh, ow)
    fmt = _fmt(input, input.dim() == 4)
    return _new(input, shape, fmt), _new(input, shape, fmt, torch.int64)


@torch.library.register_fake("cnnext::max_pool2d_with_indices_backward")
def _max_pool2d_backward_fake(grad_output, indices, input_size, kernel_size, stride, padding, dilation, ceil_mode):
    check_same_device("max_pool2d_with_indices_backward", grad_output=grad_output, indices=indices)
    return _new(grad_output, list(input_size), _fmt(indices, indices.dim() == 4))


@torch.library.register_fake("cnnext::max_pool2d_select")
def _max_pool2d_select_fake(input, indices, kernel_size, stride, padding, dilation, ceil_mode):
    check_same_device("max_pool2d_select", input=input, indices=indices)
    return _new(input, indices.shape, _fmt(indices, indices.dim() == 4))


@torch.library.register_fake("cnnext::max_unpool2d")
def _max_unpool2d_fake(input, indices, output_size):
    check_same_device("max_unpool2d", input=input, indices=indices)
    return _new(input, (*input.shape[:-2], *output_size), _fmt(input, input.dim() == 4))


@torch.library.register_fake("cnnext::max_unpool2d_backward")
def _max_unpool2d_backward_fake(grad_output, indices):
    check_same_device("max_unpool2d_backward", grad_output=grad_output, indices=indices)
    return _new(grad_output, indices.shape, torch.contiguous_format)
