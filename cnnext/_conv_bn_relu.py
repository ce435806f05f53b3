"""Fake kernels of the conv_bn_relu2d ops (csrc/ops/conv_bn_relu2d.cpp). Their autograd
formulas, below, are implemented in C++ (csrc/ops/autograd_conv2d.cpp).

Training, with xhat = (conv_out - mean) * invstd and gm the output gradient masked by
out <= 0 zeroed (the ReLU mask, read from the saved output; NaN passes, as in torch):
  conv_bn_relu2d_train(x, w, b, gamma, beta) -> (out, conv_out, mean, var)
    d/d(conv_out) = conv_bn_relu2d_train_backward (one op: the sums, then one pass)
    d/dx = conv2d_input_backward(d/d(conv_out), w), d/dw = conv2d_weight_backward(.., x),
    d/db = the channel sums of d/d(conv_out) (zero up to rounding, as in torch).
  conv_out, mean and var are outputs for the backward pass and the running statistics
  (batch_norm_update_stats_); they are marked non-differentiable.
  Double backward through training mode is not supported: it raises.

Inference, with scale = gamma * invstd folded into w' = w * scale and
b' = (b - running_mean) * scale + beta, out = [relu](conv2d(x, w') + b'):
  d/dx = conv2d_input_backward(gm, w'), gw' = conv2d_weight_backward(gm, x), gs = sum gm,
  d/dw = gw' * scale, d/db = gs * scale, d/dbeta = gs, d/dscale = <gw', w> + gs * (b - mean),
  d/dgamma = d/dscale * invstd, d/dmean = -gs * scale,
  d/dvar = -d/dscale * gamma * invstd^3 / 2.
  These are cnnext and elementwise ops, so double backward in eval mode runs too.
"""
import torch

from ._shapes import check_same_device, conv_out_size, prefers_channels_last

_HALF = (torch.float16, torch.bfloat16)


def stats_dtype(dtype):
    """dtype of the batch statistics (csrc/tensors.h stats_dtype)."""
    return torch.float32 if dtype in _HALF else dtype


def _conv_output(input, weight, stride, padding, dilation):
    n, _, h, w = input.shape
    oh = conv_out_size(h, weight.shape[2], stride[0], padding[0], dilation[0])
    ow = conv_out_size(w, weight.shape[3], stride[1], padding[1], dilation[1])
    fmt = torch.channels_last if prefers_channels_last(input, weight) else torch.contiguous_format
    return input.new_empty((n, weight.shape[0], oh, ow)).contiguous(memory_format=fmt)


@torch.library.register_fake("cnnext::conv_bn_relu2d_train")
def _train_fake(input, weight, bias, bn_weight, bn_bias, eps, stride, padding, dilation, groups, relu):
    check_same_device("conv_bn_relu2d_train", input=input, weight=weight, bias=bias, bn_weight=bn_weight, bn_bias=bn_bias)
    out = _conv_output(input, weight, stride, padding, dilation)
    stats = input.new_empty((weight.shape[0],), dtype=stats_dtype(input.dtype))
    return out, torch.empty_like(out), stats, torch.empty_like(stats)


@torch.library.register_fake("cnnext::conv_bn_relu2d_train_backward")
def _train_backward_fake(grad_out, out, conv_out, mean, var, bn_weight, eps, relu):
    check_same_device("conv_bn_relu2d_train_backward", grad_out=grad_out, out=out, conv_out=conv_out, mean=mean, var=var, bn_weight=bn_weight)
    fmt = torch.channels_last if prefers_channels_last(conv_out) else torch.contiguous_format
    grad = conv_out.new_empty(conv_out.shape).contiguous(memory_format=fmt)
    c = conv_out.shape[1]
    sdt = stats_dtype(conv_out.dtype)  # grad_bn_weight / grad_bn_bias: the statistics' dtype
    return grad, conv_out.new_empty((c,), dtype=sdt), conv_out.new_empty((c,), dtype=sdt), conv_out.new_empty((c,))


@torch.library.register_fake("cnnext::batch_norm_update_stats_")
def _update_stats_fake(running_mean, running_var, mean, var, momentum, count):
    check_same_device("batch_norm_update_stats_", running_mean=running_mean, running_var=running_var, mean=mean, var=var)
    return None


@torch.library.register_fake("cnnext::conv_bn_relu2d_eval")
def _eval_fake(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, stride, padding,
               dilation, groups, relu):
    check_same_device("conv_bn_relu2d_eval", input=input, weight=weight, bias=bias, bn_weight=bn_weight, bn_bias=bn_bias, running_mean=running_mean, running_var=running_var)
    return _conv_output(input, weight, stride, padding, dilation)
