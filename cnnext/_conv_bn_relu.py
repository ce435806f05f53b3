"""Fake kernels and autograd formulas of the conv_bn_relu2d ops (csrc/ops/conv_bn_relu2d.cpp).

Training, with xhat = (conv_out - mean) * invstd and gm the output gradient masked by
out > 0 (the ReLU mask, read from the saved output):
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

from ._shapes import conv_out_size, prefers_channels_last

ops = torch.ops.cnnext

_HALF = (torch.float16, torch.bfloat16)


def stats_dtype(dtype):
    """dtype of the batch statistics (csrc/ops/conv_bn_relu2d.h stats_dtype)."""
    return torch.float32 if dtype in _HALF else dtype


def _conv_output(input, weight, stride, padding, dilation):
    n, _, h, w = input.shape
    oh = conv_out_size(h, weight.shape[2], stride[0], padding[0], dilation[0])
    ow = conv_out_size(w, weight.shape[3], stride[1], padding[1], dilation[1])
    fmt = torch.channels_last if prefers_channels_last(input, weight) else torch.contiguous_format
    return input.new_empty((n, weight.shape[0], oh, ow)).contiguous(memory_format=fmt)


@torch.library.register_fake("cnnext::conv_bn_relu2d_train")
def _train_fake(input, weight, bias, bn_weight, bn_bias, eps, stride, padding, dilation, groups, relu):
    out = _conv_output(input, weight, stride, padding, dilation)
    stats = input.new_empty((weight.shape[0],), dtype=stats_dtype(input.dtype))
    return out, torch.empty_like(out), stats, torch.empty_like(stats)


@torch.library.register_fake("cnnext::conv_bn_relu2d_train_backward")
def _train_backward_fake(grad_out, out, conv_out, mean, var, bn_weight, eps, relu):
    fmt = torch.channels_last if prefers_channels_last(conv_out) else torch.contiguous_format
    grad = conv_out.new_empty(conv_out.shape).contiguous(memory_format=fmt)
    c = conv_out.shape[1]
    return grad, conv_out.new_empty((c,)), conv_out.new_empty((c,)), conv_out.new_empty((c,))


@torch.library.register_fake("cnnext::batch_norm_update_stats_")
def _update_stats_fake(running_mean, running_var, mean, var, momentum, count):
    return None


@torch.library.register_fake("cnnext::conv_bn_relu2d_eval")
def _eval_fake(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, stride, padding,
               dilation, groups, relu):
    return _conv_output(input, weight, stride, padding, dilation)


# ---------------------------------------------------------------------------------------
# training mode
# ---------------------------------------------------------------------------------------

def _train_setup(ctx, inputs, output):
    input, weight, bias, bn_weight, bn_bias, eps, stride, padding, dilation, groups, relu = inputs
    out, conv_out, mean, var = output
    ctx.mark_non_differentiable(conv_out, mean, var)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for them (an activation's worth)
    need = ctx.needs_input_grad
    ctx.save_for_backward(
        input if need[1] else None,
        weight if need[0] else None,
        out if relu else None,
        conv_out, mean, var, bn_weight,
    )
    ctx.input_shape, ctx.weight_shape = input.shape, weight.shape
    ctx.conf = (stride, padding, dilation, groups)
    ctx.eps, ctx.relu = eps, relu


def _train_backward(ctx, grad_out, _g_conv_out, _g_mean, _g_var):
    input, weight, out, conv_out, mean, var, bn_weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    if grad_out is None or not any(need[:5]):
        return (None,) * 11
    g_conv, g_gamma, g_beta, g_bias = ops.conv_bn_relu2d_train_backward(
        grad_out, out, conv_out, mean, var, bn_weight, ctx.eps, ctx.relu)
    gx = gw = None
    if need[0]:
        gx = ops.conv2d_input_backward(g_conv, weight, list(ctx.input_shape), *ctx.conf)
    if need[1]:
        gw = ops.conv2d_weight_backward(g_conv, input, list(ctx.weight_shape), *ctx.conf)
    return (gx, gw, g_bias if need[2] else None, g_gamma if need[3] else None,
            g_beta if need[4] else None) + (None,) * 6


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "conv_bn_relu2d: double backward (a gradient of a gradient) through training mode is not "
        "supported; use torch.nn.Conv2d + BatchNorm2d + ReLU for higher-order gradients")


def _train_backward_setup(ctx, inputs, output):
    pass


# ---------------------------------------------------------------------------------------
# inference mode
# ---------------------------------------------------------------------------------------

def _fold(weight, bias, bn_weight, running_mean, running_var, eps):
    """(w', invstd, scale) as csrc/ops/conv_bn_relu2d.cpp folds them, in the stats dtype."""
    sdt = stats_dtype(weight.dtype)
    invstd = (running_var.to(sdt) + eps).rsqrt()
    scale = invstd * bn_weight.to(sdt) if bn_weight is not None else invstd
    w = (weight.to(sdt) * scale.view(-1, 1, 1, 1)).to(weight.dtype)
    return w, invstd, scale


def _eval_setup(ctx, inputs, output):
    (input, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, stride, padding, dilation,
     groups, relu) = inputs
    ctx.save_for_backward(input, weight, bias, bn_weight, running_mean, running_var, output if relu else None)
    ctx.conf = (stride, padding, dilation, groups)
    ctx.eps = eps


def _eval_backward(ctx, grad):
    input, weight, bias, bn_weight, running_mean, running_var, out = ctx.saved_tensors
    need = ctx.needs_input_grad
    dt, sdt = weight.dtype, stats_dtype(weight.dtype)
    gm = torch.where(out > 0, grad, torch.zeros_like(grad)) if out is not None else grad
    w_folded, invstd, scale = _fold(weight, bias, bn_weight, running_mean, running_var, ctx.eps)
    gx = None
    if need[0]:
        gx = ops.conv2d_input_backward(gm, w_folded, list(input.shape), *ctx.conf)
    need_scale = need[1] or need[3] or need[6]
    gw_folded = ops.conv2d_weight_backward(gm, input, list(weight.shape), *ctx.conf).to(sdt) if need_scale else None
    gs = ops.channel_sum(gm).to(sdt)
    grads = [gx, None, None, None, None, None, None]
    if need[1]:
        grads[1] = (gw_folded * scale.view(-1, 1, 1, 1)).to(dt)
    if need[2]:
        grads[2] = (gs * scale).to(dt)
    if need[3] or need[6]:
        shift = bias.to(sdt) - running_mean.to(sdt) if bias is not None else -running_mean.to(sdt)
        g_scale = (gw_folded * weight.to(sdt)).sum((1, 2, 3)) + gs * shift
        if need[3]:
            grads[3] = (g_scale * invstd).to(dt)
        if need[6]:
            gamma = bn_weight.to(sdt) if bn_weight is not None else torch.ones_like(invstd)
            grads[6] = (g_scale * gamma * invstd.pow(3) * -0.5).to(dt)
    if need[4]:
        grads[4] = gs.to(dt)
    if need[5]:
        grads[5] = (-gs * scale).to(dt)
    return (*grads, None, None, None, None, None, None)


torch.library.register_autograd("cnnext::conv_bn_relu2d_train", _train_backward, setup_context=_train_setup)
torch.library.register_autograd(
    "cnnext::conv_bn_relu2d_train_backward", _no_double_backward, setup_context=_train_backward_setup)
torch.library.register_autograd("cnnext::conv_bn_relu2d_eval", _eval_backward, setup_context=_eval_setup)
