"""torch.nn.functional-style entry points: argument normalisation, then the op.

Each function has the signature and semantics of its torch.nn.functional namesake;
the checks of what reaches the op live in C++ (csrc/ops).
"""
import numbers

import torch

__all__ = ["conv2d", "conv_transpose2d", "max_pool2d", "max_pool2d_with_indices", "max_unpool2d", "avg_pool2d",
           "adaptive_avg_pool2d", "conv_bn_relu2d"]

from . import _C


def _entry(name):
    """torch.ops.cnnext.<name>, called through cnnext._C.eager's direct entry when that
    is safe: it dispatches the same op (autograd, modes, fake tensors, devices) without
    torch.ops' per-call argument parsing, about 2.5 us less per call. Under torch.compile,
    or when an argument or an active mode defines __torch_function__, the call goes
    through torch.ops, which traces and handles those."""
    slow = getattr(torch.ops.cnnext, name)
    eager = _C.eager
    is_compiling = torch.compiler.is_compiling
    has_torch_function = torch._C._has_torch_function

    def call(*args):
        if is_compiling() or has_torch_function(args):
            return slow(*args)
        return getattr(eager, name)(*args)

    call.__name__ = call.__qualname__ = name
    return call


class _Ops:
    """The ops this module calls: each entry cnnext._C.eager binds (the ops marked eager in
    csrc/ops/op_table.h), through _entry, and batch_norm_update_stats_ through torch.ops."""

    batch_norm_update_stats_ = torch.ops.cnnext.batch_norm_update_stats_


for _name in _C.eager.ops:
    setattr(_Ops, _name, staticmethod(_entry(_name)))
del _name

_ops = _Ops


def _pair(value, name, op):
    """An int or a pair of ints, as torch.nn.functional takes them."""
    kind = type(value)
    if kind is int:  # the common cases first: this runs on every call
        return [value, value]
    if (kind is tuple or kind is list) and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        return [value[0], value[1]]
    if isinstance(value, (bool, str)):  # a string is not a sequence of sizes (torch: TypeError)
        raise TypeError(f"{op}: expected {name} to be an int or a pair of ints, got {value!r}")
    if isinstance(value, numbers.Integral) or isinstance(value, torch.SymInt):
        return [int(value)] * 2 if isinstance(value, numbers.Integral) else [value, value]
    try:
        items = list(value)
    except TypeError:
        raise TypeError(f"{op}: expected {name} to be an int or a pair of ints, got {value!r}") from None
    if len(items) == 1:
        items = items * 2
    if len(items) != 2:  # torch: RuntimeError ("kernel_size must either be a single int, or a tuple of two ints")
        raise RuntimeError(f"{op}: expected {name} to be an int or a pair of ints, got {value!r} ({len(items)} values)")
    if not all(isinstance(v, (numbers.Integral, torch.SymInt)) and not isinstance(v, bool) for v in items):
        raise TypeError(f"{op}: expected {name} to be an int or a pair of ints, got {value!r}")
    return [int(v) if isinstance(v, numbers.Integral) else v for v in items]


def _same_padding(weight, dilation, stride, op):
    """padding='same': the total padding d*(k-1) per dim, split as torch splits it
    (the odd extra element at the end). Returns the larger side's padding and, per
    dim, whether the split is odd (the callers then pad the input asymmetrically)."""
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
    'valid' or 'same'; groups: int. float16, bfloat16, float32 and float64 on CPU and CUDA.
    """
    op = "conv2d"
    stride = _pair(stride, "stride", op)
    dilation = _pair(dilation, "dilation", op)
    if type(groups) is not int and (not isinstance(groups, (numbers.Integral, torch.SymInt)) or isinstance(groups, bool)):
        raise TypeError(f"{op}: expected groups to be an int, got {groups!r}")
    if isinstance(padding, str):
        if padding == "valid":
            padding = [0, 0]
        elif padding == "same":
            padding, drop = _same_padding(weight, dilation, stride, op)
            if drop[0] or drop[1]:
                # Asymmetric 'same': the smaller padding on both sides, the odd element at the
                # end padded into the input, as torch does. (Padding by the larger and dropping
                # the first output row/column made the weight gradient 0 * x there: NaN from a
                # NaN input in entries that do not depend on it.)
                padding = [p - int(d) for p, d in zip(padding, drop)]
                input = torch.nn.functional.pad(input, (0, int(drop[1]), 0, int(drop[0])))
        else:
            raise ValueError(f"{op}: expected padding to be 'valid', 'same', an int or a pair of ints, got {padding!r}")
    else:
        padding = _pair(padding, "padding", op)
    return _ops.conv2d(input, weight, bias, stride, padding, dilation, int(groups))


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """2-D transposed convolution, as :func:`torch.nn.functional.conv_transpose2d`.

    input: (N, C, H, W) or unbatched (C, H, W); weight: (C, out_channels / groups, kH, kW);
    bias: (out_channels,) or None; stride, padding, output_padding, dilation: int or pair;
    groups: int. The output is (N, out_channels, H_out, W_out) with
    H_out = (H - 1) * stride - 2 * padding + dilation * (kH - 1) + output_padding + 1.
    float16, bfloat16, float32 and float64 on CPU and CUDA.
    """
    op = "conv_transpose2d"
    stride = _pair(stride, "stride", op)
    padding = _pair(padding, "padding", op)
    output_padding = _pair(output_padding, "output_padding", op)
    dilation = _pair(dilation, "dilation", op)
    if type(groups) is not int and (not isinstance(groups, (numbers.Integral, torch.SymInt)) or isinstance(groups, bool)):
        raise TypeError(f"{op}: expected groups to be an int, got {groups!r}")
    return _ops.conv_transpose2d(input, weight, bias, stride, padding, output_padding, int(groups), dilation)


def _int_arg(value, name, op):
    if type(value) is int:
        return value
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"{op}: expected {name} to be an int, got {value!r}")
    return int(value) if isinstance(value, numbers.Integral) else value


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    """2-D average pooling, as :func:`torch.nn.functional.avg_pool2d`.

    input: (N, C, H, W) or unbatched (C, H, W); kernel_size, padding: int or pair;
    stride: int, pair, or None / [] for kernel_size. With ceil_mode the output rounds up
    (the last window must start inside the input or the left padding). Each output is
    its window's sum divided by divisor_override (non-zero) if given, else by the
    window's size: counting the padding inside it with count_include_pad, else only
    its input elements. float16, bfloat16, float32 and float64 on CPU and CUDA.
    """
    op = "avg_pool2d"
    kernel_size = _pair(kernel_size, "kernel_size", op)
    if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0):
        stride = []
    else:
        stride = _pair(stride, "stride", op)
    padding = _pair(padding, "padding", op)
    if divisor_override is not None:
        divisor_override = _int_arg(divisor_override, "divisor_override", op)
    return _ops.avg_pool2d(input, kernel_size, stride, padding, bool(ceil_mode), bool(count_include_pad),
                           divisor_override)


def adaptive_avg_pool2d(input, output_size):
    """2-D adaptive average pooling, as :func:`torch.nn.functional.adaptive_avg_pool2d`.

    input: (N, C, H, W) or unbatched (C, H, W); output_size: int or pair, a None entry
    keeping that dimension of the input. Output (oh, ow) averages input rows
    [floor(oh * H / OH), ceil((oh + 1) * H / OH)) and likewise columns; output sizes
    larger than the input are allowed. float16, bfloat16, float32 and float64 on CPU and CUDA.
    """
    op = "adaptive_avg_pool2d"
    kind = type(output_size)
    if kind is int:
        return _ops.adaptive_avg_pool2d(input, [output_size, output_size])
    if (kind is tuple or kind is list) and len(output_size) == 2 and type(output_size[0]) is int \
            and type(output_size[1]) is int and input.dim() > 2:
        return _ops.adaptive_avg_pool2d(input, [output_size[0], output_size[1]])
    if isinstance(output_size, (list, tuple)):
        if input.dim() <= len(output_size):  # torch's ValueError (its _list_with_default)
            raise ValueError(f"{op}: expected input to have more than {len(output_size)} dims for output_size "
                             f"{output_size!r}, got {input.dim()}-D input of shape {list(input.shape)}")
        items = list(output_size)
        if len(items) != 2:  # torch: RuntimeError ("output_size must be 2")
            raise RuntimeError(f"{op}: expected output_size to be an int or a pair, got {output_size!r} "
                               f"({len(items)} values)")
        if any(v is None for v in items) and input.dim() < 2:
            raise ValueError(f"{op}: expected input to be 3-D or 4-D, got {input.dim()}-D")
        sizes = [input.shape[-2 + d] if v is None else _int_arg(v, "output_size", op) for d, v in enumerate(items)]
    else:
        sizes = [_int_arg(output_size, "output_size", op)] * 2
    return _ops.adaptive_avg_pool2d(input, sizes)

def _pool_stride(stride, kernel_size, op):
    """stride=None or [] (torch's default) means the kernel size."""
    if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0):
        return list(kernel_size)
    return _pair(stride, "stride", op)


def max_pool2d_with_indices(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                            return_indices=False):
    """2-D max pooling returning (output, indices), as
    :func:`torch.nn.functional.max_pool2d_with_indices` (return_indices is ignored, as there).

    input: (N, C, H, W) or unbatched (C, H, W); kernel_size, stride, padding, dilation: int
    or pair (stride None: kernel_size); padding at most half the kernel. indices are int64
    flat positions h * W + w in each plane; ties go to the first maximum in row-major order,
    and a window with NaN picks its last NaN, as torch does. float16, bfloat16, float32
    and float64 on CPU and CUDA.
    """
    op = "max_pool2d"
    kernel_size = _pair(kernel_size, "kernel_size", op)
    stride = _pool_stride(stride, kernel_size, op)
    padding = _pair(padding, "padding", op)
    dilation = _pair(dilation, "dilation", op)
    return _ops.max_pool2d_with_indices(input, kernel_size, stride, padding, dilation, bool(ceil_mode))


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """2-D max pooling, as :func:`torch.nn.functional.max_pool2d`: the output, or
    (output, indices) with return_indices=True (see max_pool2d_with_indices)."""
    out, indices = max_pool2d_with_indices(input, kernel_size, stride, padding, dilation, ceil_mode)
    return (out, indices) if return_indices else out


def _unpool_output_size(input, kernel_size, stride, padding, output_size):
    """torch's rule: the default (H - 1) * stride - 2 * padding + kernel_size, or output_size
    (2 entries, or 4 of which the last 2 count) strictly within stride of the default."""
    if input.dim() not in (3, 4):
        raise RuntimeError(f"max_unpool2d: expected input to be 3-D (C, H, W) or 4-D (N, C, H, W), "
                           f"got {input.dim()}-D tensor of shape {list(input.shape)}")
    default = [(input.shape[-2 + d] - 1) * stride[d] + kernel_size[d] - 2 * padding[d] for d in range(2)]
    if output_size is None:
        return default
    output_size = list(output_size)
    if len(output_size) == 4:
        output_size = output_size[2:]
    if len(output_size) != 2:
        raise ValueError("max_unpool2d: expected output_size to be a sequence of 2 or 4 elements, "
                         f"but it has a length of {len(output_size)}: {output_size}")
    for d in range(2):
        lo, hi = default[d] - stride[d], default[d] + stride[d]
        if not lo < output_size[d] < hi:
            raise ValueError(f"max_unpool2d: invalid output_size {output_size} (dim {d} must be between "
                             f"{lo} and {hi}, exclusive: the default size {default[d]} +- stride {stride[d]})")
    for d in range(2):  # torch's ValueError (default sizes of 0 or less and a stride over 1 allow these)
        if output_size[d] < 0:
            raise ValueError(f"max_unpool2d: expected output_size to be non-negative, got {output_size}")
    return [int(v) if not isinstance(v, torch.SymInt) else v for v in output_size]


def max_unpool2d(input, indices, kernel_size, stride=None, padding=0, output_size=None):
    """Partial inverse of max_pool2d, as :func:`torch.nn.functional.max_unpool2d`: a zero
    tensor of output_size (default (H - 1) * stride - 2 * padding + kernel_size) with
    input[o] written at the flat position indices[o] of each plane. An index outside the
    output plane is an error. float16, bfloat16, float32 and float64 on CPU and CUDA.
    """
    op = "max_unpool2d"
    kernel_size = _pair(kernel_size, "kernel_size", op)
    stride = _pool_stride(stride, kernel_size, op)
    padding = _pair(padding, "padding", op)
    size = _unpool_output_size(input, kernel_size, stride, padding, output_size)
    return _ops.max_unpool2d(input, indices, size)
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
    float16, bfloat16, float32 and float64 on CPU and CUDA (for the half types, statistics
    and running statistics in float32; bn_weight, bn_bias and the running statistics may be
    float32, as under torch.autocast).
    """
    op = "conv_bn_relu2d"
    stride = _pair(stride, "stride", op)
    dilation = _pair(dilation, "dilation", op)
    if type(groups) is not int and (not isinstance(groups, (numbers.Integral, torch.SymInt)) or isinstance(groups, bool)):
        raise TypeError(f"{op}: expected groups to be an int, got {groups!r}")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: expected running_mean and running_var to be both given or both None")
    if not training and running_mean is None:
        raise ValueError(f"{op}: expected running_mean and running_var in inference mode (training=False)")
    if training and not eps > 0:  # torch.nn.functional.batch_norm's ValueError
        raise ValueError(f"{op}: expected eps to be positive in training mode, got {eps}")
    if not eps >= 0:
        raise ValueError(f"{op}: expected eps to be non-negative, got {eps}")
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
