"""torch.nn.functional-style entry points: argument normalisation, then the op.

Each function has the signature and semantics of its torch.nn.functional namesake;
the checks of what reaches the op live in C++ (csrc/ops).
"""
import numbers

import torch

__all__ = ["conv2d", "conv_transpose2d", "conv_bn_relu2d"]

_ops = torch.ops.cnnext


def _pair(value, name, op):
    """An int or a pair of ints, as torch.nn.functional takes them."""
    if isinstance(value, bool):
        raise TypeError(f"{op}: expected {name} to be an int or a pair of ints, got {value!r}")
    if isinstance(value, numbers.Integral) or isinstance(value, torch.SymInt):
        return [int(value)] * 2 if isinstance(value, numbers.Integral) else [value, value]
    try:
        items = list(value)
    except TypeError:
        raise TypeError(f"{op}: expected {name} to be an int or a pair of ints, got {value!r}") from None
    if len(items) == 1:
        items = items * 2
    if len(items) != 2 or not all(isinstance(v, (numbers.Integral, torch.SymInt)) and not isinstance(v, bool) for v in items):
        raise ValueError(f"{op}: expected {name} to be an int or a pair of ints, got {value!r}")
    return [int(v) if isinstance(v, numbers.Integral) else v for v in items]


def _same_padding(weight, dilation, stride, op):
    """padding='same': the total padding d*(k-1) per dim, split as torch splits it
    (the odd extra element at the end). Returns the symmetric padding to pass and,
    per dim, whether the first output row/column must be dropped."""
    if any(s != 1 for s in stride):
        raise ValueError(f"{op}: padding='same' is not supported for strided convolutions, got stride={tuple(stride)}")
    if weight.dim() != 4:
        raise RuntimeError(
            f"{op}: expected weight to be 4-D (out_channels, in_channels / groups, kH, kW), "
            f"got {weight.dim()}-D tensor of shape {list(weight.shape)}"
        )
    pad, drop = [], []
    for k, d in zip(weight.shape[2:], dilation):
        total = d * (k - 1)
        pad.append(total - total // 2)  # the larger side; the smaller is one less when odd
        drop.append(total % 2 == 1)
    return pad, drop


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D cross-correlation, as :func:`torch.nn.functional.conv2d`.

    input: (N, C, H, W) or unbatched (C, H, W); weight: (out_channels, C / groups, kH, kW);
    bias: (out_channels,) or None; stride, dilation: int or pair; padding: int, pair,
    'valid' or 'same'; groups: int. float32/float64 on CPU, plus float16/bfloat16 on CUDA.
    """
    op = "conv2d"
    stride = _pair(stride, "stride", op)
    dilation = _pair(dilation, "dilation", op)
    if not isinstance(groups, (numbers.Integral, torch.SymInt)) or isinstance(groups, bool):
        raise TypeError(f"{op}: expected groups to be an int, got {groups!r}")
    drop = (False, False)
    if isinstance(padding, str):
        if padding == "valid":
            padding = [0, 0]
        elif padding == "same":
            padding, drop = _same_padding(weight, dilation, stride, op)
        else:
            raise ValueError(f"{op}: expected padding to be 'valid', 'same', an int or a pair of ints, got {padding!r}")
    else:
        padding = _pair(padding, "padding", op)
    out = _ops.conv2d(input, weight, bias, stride, padding, dilation, int(groups))
    if drop[0] or drop[1]:
        out = _drop_first(out, drop)
    return out


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """2-D transposed convolution, as :func:`torch.nn.functional.conv_transpose2d`.

    input: (N, C, H, W) or unbatched (C, H, W); weight: (C, out_channels / groups, kH, kW);
    bias: (out_channels,) or None; stride, padding, output_padding, dilation: int or pair;
    groups: int. The output is (N, out_channels, H_out, W_out) with
    H_out = (H - 1) * stride - 2 * padding + dilation * (kH - 1) + output_padding + 1.
    float32/float64 on CPU, plus float16/bfloat16 on CUDA.
    """
    op = "conv_transpose2d"
    stride = _pair(stride, "stride", op)
    padding = _pair(padding, "padding", op)
    output_padding = _pair(output_padding, "output_padding", op)
    dilation = _pair(dilation, "dilation", op)
    if not isinstance(groups, (numbers.Integral, torch.SymInt)) or isinstance(groups, bool):
        raise TypeError(f"{op}: expected groups to be an int, got {groups!r}")
    return _ops.conv_transpose2d(input, weight, bias, stride, padding, output_padding, int(groups), dilation)


def _drop_first(out, drop):
    """Removes the first output row and/or column (the asymmetric half of 'same'),
    keeping the result dense in the layout it had."""
    channels_last = out.dim() == 4 and out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    out = out[..., 1 if drop[0] else 0 :, 1 if drop[1] else 0 :]
    return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def conv_bn_relu2d(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, momentum=0.1,
                   eps=1e-5, stride=1, padding=0, dilation=1, groups=1, relu=True):
    """conv2d -> batch_norm -> relu as one op: what ``F.relu(F.batch_norm(F.conv2d(input,
    weight, bias, stride, padding, dilation, groups), running_mean, running_var, bn_weight,
    bn_bias, training, momentum, eps))`` computes (without the relu when ``relu=False``).

    input: (N, C, H, W) (batch norm takes batches only); weight, bias, stride, padding
    ('same', 'valid', int or pair), dilation, groups: as :func:`conv2d`; bn_weight, bn_bias
    (None: affine=False), running_mean, running_var: (out_channels,) or None.
    training=True normalises with the batch statistics and, when running_mean/running_var
    are given, updates them in place with ``momentum`` (a float; BatchNorm2d's
    momentum=None cumulative average is ``1 / num_batches_tracked``, which
    cnnext.nn.ConvBNReLU2d passes) and the unbiased variance. training=False folds the
    running statistics into the convolution and runs one conv pass with bias and ReLU
    applied as the output is written; it needs running_mean and running_var.
    float32/float64 on CPU, plus float16/bfloat16 on CUDA (statistics in float32).
    """
    op = "conv_bn_relu2d"
    stride = _pair(stride, "stride", op)
    dilation = _pair(dilation, "dilation", op)
    if not isinstance(groups, (numbers.Integral, torch.SymInt)) or isinstance(groups, bool):
        raise TypeError(f"{op}: expected groups to be an int, got {groups!r}")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: expected running_mean and running_var to be both given or both None")
    if not training and running_mean is None:
        raise ValueError(f"{op}: expected running_mean and running_var in inference mode (training=False)")
    if isinstance(padding, str):
        if padding == "valid":
            padding = [0, 0]
        elif padding == "same":
            padding, drop = _same_padding(weight, dilation, stride, op)
            if drop[0] or drop[1]:
                # Asymmetric 'same' (even dilated kernel): pad the input as torch's split
                # implies (the odd element at the end), then convolve unpadded.
                pads = []
                for p, d in zip(reversed(padding), reversed(drop)):
                    pads += [p - 1 if d else p, p]
                input = torch.nn.functional.pad(input, pads)
                padding = [0, 0]
        else:
            raise ValueError(f"{op}: expected padding to be 'valid', 'same', an int or a pair of ints, got {padding!r}")
    else:
        padding = _pair(padding, "padding", op)
    groups = int(groups)
    if not training:
        return _ops.conv_bn_relu2d_eval(input, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                        float(eps), stride, padding, dilation, groups, bool(relu))
    out, _, mean, var = _ops.conv_bn_relu2d_train(input, weight, bias, bn_weight, bn_bias, float(eps), stride,
                                                  padding, dilation, groups, bool(relu))
    if running_mean is not None:
        if momentum is None:
            raise TypeError(f"{op}: expected momentum to be a float in training mode with running statistics, "
                            "got None (cnnext.nn.ConvBNReLU2d turns momentum=None into 1 / num_batches_tracked)")
        with torch.no_grad():
            count = out.shape[0] * out.shape[2] * out.shape[3]
            _ops.batch_norm_update_stats_(running_mean, running_var, mean, var, float(momentum), count)
    return out
