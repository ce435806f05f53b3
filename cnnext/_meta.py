"""Fake (meta) kernels: output metadata of each op, for torch.compile and opcheck."""
import torch

from ._shapes import check_same_device, conv_out_size, conv_transpose_out_size, prefers_channels_last


def _empty_like_layout(ref, shape, *layout_from):
    fmt = torch.channels_last if prefers_channels_last(*layout_from) else torch.contiguous_format
    return ref.new_empty(shape).contiguous(memory_format=fmt)


def _batched(t):
    return t if t.dim() == 4 else t.unsqueeze(0)


@torch.library.register_fake("cnnext::conv2d")
def _conv2d_fake(input, weight, bias, stride, padding, dilation, groups):
    check_same_device("conv2d", input=input, weight=weight, bias=bias)
    x = _batched(input)
    n, _, h, w = x.shape
    oh = conv_out_size(h, weight.shape[2], stride[0], padding[0], dilation[0])
    ow = conv_out_size(w, weight.shape[3], stride[1], padding[1], dilation[1])
    out = _empty_like_layout(input, (n, weight.shape[0], oh, ow), *((x, weight) if input.dim() == 4 else (weight,)))
    return out if input.dim() == 4 else out.squeeze(0)


@torch.library.register_fake("cnnext::conv2d_input_backward")
def _conv2d_input_backward_fake(grad_output, weight, input_size, stride, padding, dilation, groups):
    check_same_device("conv2d_input_backward", grad_output=grad_output, weight=weight)
    g = _batched(grad_output)
    size = list(input_size) if grad_output.dim() == 4 else [1, *input_size]
    out = _empty_like_layout(grad_output, size, *((g, weight) if grad_output.dim() == 4 else (weight,)))
    return out if grad_output.dim() == 4 else out.squeeze(0)


@torch.library.register_fake("cnnext::conv2d_weight_backward")
def _conv2d_weight_backward_fake(grad_output, input, weight_size, stride, padding, dilation, groups):
    check_same_device("conv2d_weight_backward", grad_output=grad_output, input=input)
    batched = grad_output.dim() == 4
    return _empty_like_layout(grad_output, list(weight_size), *((grad_output, input) if batched else ()))


@torch.library.register_fake("cnnext::channel_sum")
def _channel_sum_fake(input):
    return input.new_empty((input.shape[1 if input.dim() == 4 else 0],))


@torch.library.register_fake("cnnext::conv_transpose2d")
def _conv_transpose2d_fake(input, weight, bias, stride, padding, output_padding, groups, dilation):
    check_same_device("conv_transpose2d", input=input, weight=weight, bias=bias)
    x = _batched(input)
    n, _, h, w = x.shape
    oh = conv_transpose_out_size(h, weight.shape[2], stride[0], padding[0], dilation[0], output_padding[0])
    ow = conv_transpose_out_size(w, weight.shape[3], stride[1], padding[1], dilation[1], output_padding[1])
    shape = (n, weight.shape[1] * groups, oh, ow)
    out = _empty_like_layout(input, shape, *((x, weight) if input.dim() == 4 else (weight,)))
    return out if input.dim() == 4 else out.squeeze(0)
