"""Autograd formulas of the ops, registered on the ops themselves
(torch.library.register_autograd builds the autograd Function around each op).

The conv2d ops are closed under differentiation, so gradients of any order are
cnnext kernels too. With A_w the linear map x -> conv2d(x, w):
  conv2d(x, w)                     = A_w x          d/dx: A_w^T g            d/dw: weight_backward(g, x)
  conv2d_input_backward(g, w)      = A_w^T g        d/dg: A_w dz             d/dw: weight_backward(g, dz)
  conv2d_weight_backward(g, x)     = dW <g, A_W x>  d/dg: A_dW x             d/dx: A_dW^T g
Each formula saves only the tensors its backward reads.
"""
import torch

ops = torch.ops.cnnext


def _keep(ctx, wanted, *tensors):
    ctx.save_for_backward(*(t if w else None for t, w in zip(tensors, wanted)))


# conv2d(input, weight, bias, stride, padding, dilation, groups)
def _conv2d_setup(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation, groups = inputs
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    _keep(ctx, (need_w, need_x), input, weight)
    ctx.input_shape = input.shape
    ctx.weight_shape = weight.shape
    ctx.conf = (stride, padding, dilation, groups)


def _conv2d_backward(ctx, grad):
    input, weight = ctx.saved_tensors
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        gx = ops.conv2d_input_backward(grad, weight, list(ctx.input_shape), *ctx.conf)
    if ctx.needs_input_grad[1]:
        gw = ops.conv2d_weight_backward(grad, input, list(ctx.weight_shape), *ctx.conf)
    if ctx.needs_input_grad[2]:
        gb = ops.channel_sum(grad)
    return gx, gw, gb, None, None, None, None


# conv2d_input_backward(grad_output, weight, input_size, stride, padding, dilation, groups)
def _input_backward_setup(ctx, inputs, output):
    grad_output, weight, _, stride, padding, dilation, groups = inputs
    need_g, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    _keep(ctx, (need_w, need_g), grad_output, weight)
    ctx.weight_shape = weight.shape
    ctx.conf = (stride, padding, dilation, groups)


def _input_backward_backward(ctx, dz):
    grad_output, weight = ctx.saved_tensors
    dg = dw = None
    if ctx.needs_input_grad[0]:
        dg = ops.conv2d(dz, weight, None, *ctx.conf)
    if ctx.needs_input_grad[1]:
        dw = ops.conv2d_weight_backward(grad_output, dz, list(ctx.weight_shape), *ctx.conf)
    return dg, dw, None, None, None, None, None


# conv2d_weight_backward(grad_output, input, weight_size, stride, padding, dilation, groups)
def _weight_backward_setup(ctx, inputs, output):
    grad_output, input, _, stride, padding, dilation, groups = inputs
    need_g, need_x = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    _keep(ctx, (need_x, need_g), grad_output, input)
    ctx.input_shape = input.shape
    ctx.conf = (stride, padding, dilation, groups)


def _weight_backward_backward(ctx, dW):
    grad_output, input = ctx.saved_tensors
    dg = dx = None
    if ctx.needs_input_grad[0]:
        dg = ops.conv2d(input, dW, None, *ctx.conf)
    if ctx.needs_input_grad[1]:
        dx = ops.conv2d_input_backward(grad_output, dW, list(ctx.input_shape), *ctx.conf)
    return dg, dx, None, None, None, None, None


# channel_sum(input): the sum over every dim but the channel dim.
def _channel_sum_setup(ctx, inputs, output):
    ctx.input_shape = inputs[0].shape


def _channel_sum_backward(ctx, grad):
    shape = ctx.input_shape
    view = (1, -1, 1, 1) if len(shape) == 4 else (-1, 1, 1)
    return grad.reshape(view).expand(shape)


torch.library.register_autograd("cnnext::conv2d", _conv2d_backward, setup_context=_conv2d_setup)
torch.library.register_autograd(
    "cnnext::conv2d_input_backward", _input_backward_backward, setup_context=_input_backward_setup
)
torch.library.register_autograd(
    "cnnext::conv2d_weight_backward", _weight_backward_backward, setup_context=_weight_backward_setup
)
torch.library.register_autograd(
    "cnnext::channel_sum", _channel_sum_backward, setup_context=_channel_sum_setup
)
