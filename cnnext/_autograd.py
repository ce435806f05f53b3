"""Autograd formulas of the ops, registered on the ops themselves
(torch.library.register_autograd builds the autograd Function around each op).

The conv2d ops are closed under differentiation, so gradients of any order are
cnnext kernels too. With A_w the linear map x -> conv2d(x, w):
  conv2d(x, w)                     = A_w x          d/dx: A_w^T g            d/dw: weight_backward(g, x)
  conv2d_input_backward(g, w)      = A_w^T g        d/dg: A_w dz             d/dw: weight_backward(g, dz)
  conv2d_weight_backward(g, x)     = dW <g, A_W x>  d/dg: A_dW x             d/dx: A_dW^T g
  conv_transpose2d(x, w)           = A_w^T x        d/dx: A_w g              d/dw: weight_backward(x, g)
(the last because <A_w^T x, g> = <x, A_w g>: x plays conv2d's grad_output, g its input).
Each formula saves only the tensors its backward reads.
"""
import torch

from ._shapes import conv_out_size

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


# conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups, dilation)
# is conv2d_input_backward(input, weight, output size) + bias. With output_padding >=
# stride the adjoint conv2d over the output has more rows (columns) than the input: the
# op pads the input with zeros at the end, so here grad_input drops the extra rows and
# the weight gradient sees the padded input.
def _conv_transpose2d_setup(ctx, inputs, output):
    input, weight, bias, stride, padding, output_padding, groups, dilation = inputs
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    _keep(ctx, (need_w, need_x), input, weight)
    ctx.input_hw = tuple(input.shape[-2:])
    ctx.weight_shape = weight.shape
    ctx.conf = (stride, padding, dilation, groups)


def _adjoint_extra(ctx, grad):
    """Rows and columns the adjoint conv2d of grad's size has beyond the input's."""
    stride, padding, dilation, _ = ctx.conf
    return [
        conv_out_size(grad.shape[-2 + d], ctx.weight_shape[2 + d], stride[d], padding[d], dilation[d]) - ctx.input_hw[d]
        for d in range(2)
    ]


def _conv_transpose2d_backward(ctx, grad):
    input, weight = ctx.saved_tensors
    gx = gw = gb = None
    extra = _adjoint_extra(ctx, grad) if any(ctx.needs_input_grad[:2]) else [0, 0]
    if ctx.needs_input_grad[0]:
        gx = ops.conv2d(grad, weight, None, *ctx.conf)
        if extra[0] or extra[1]:
            gx = gx[..., : ctx.input_hw[0], : ctx.input_hw[1]]
    if ctx.needs_input_grad[1]:
        if extra[0] or extra[1]:
            input = torch.nn.functional.pad(input, (0, extra[1], 0, extra[0]))
        gw = ops.conv2d_weight_backward(input, grad, list(ctx.weight_shape), *ctx.conf)
    if ctx.needs_input_grad[2]:
        gb = ops.channel_sum(grad)
    return gx, gw, gb, None, None, None, None, None


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
torch.library.register_autograd(
    "cnnext::conv_transpose2d", _conv_transpose2d_backward, setup_context=_conv_transpose2d_setup
)
