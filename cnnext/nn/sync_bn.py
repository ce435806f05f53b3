"""Synchronised batch norm on every device: cnnext.nn.SyncBatchNorm and the function the
fused conv + synchronised BN uses (cnnext.nn.FusedConv2d).

Batch statistics are reduced across a process group as torch.nn.SyncBatchNorm reduces
them: each rank sums its per-channel values, squares and element count, one all_reduce
(SUM) of the packed vector [sum, sum of squares, count] per forward, and one of
[sum(dy), sum(dy * xhat)] per backward. Works with gloo (CPU) and nccl (CUDA), with
uneven batch sizes per rank, an empty batch included. The weight and bias gradients are
each rank's own (DDP averages them), as with torch.nn.SyncBatchNorm.
"""
import torch
import torch.distributed as dist
from torch.nn import functional as TF
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["SyncBatchNorm", "sync_batch_norm", "sync_group"]


def sync_group(process_group):
    """The group to synchronise over, or None when there is nothing to synchronise
    (torch.distributed unavailable or uninitialised, or a group of one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = dist.group.WORLD if process_group is None else process_group
    return group if dist.get_world_size(group) > 1 else None


def _reduce_dims(x):
    return [0] + list(range(2, x.dim()))


def _channel_shape(x):
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, group):
        dims = _reduce_dims(x)
        c = x.shape[1]
        acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        xa = x.to(acc)
        local_count = x.numel() // c if c else 0
        packed = torch.cat([xa.sum(dims), (xa * xa).sum(dims), xa.new_full((1,), float(local_count))])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        count = packed[2 * c].item()
        if count <= 1:
            raise ValueError(f"SyncBatchNorm: expected more than 1 value per channel across the process group when "
                             f"training, got {int(count)} (input of shape {list(x.shape)} on this rank)")
        mean = packed[:c] / count
        var = (packed[c:2 * c] / count - mean * mean).clamp_min(0)  # biased
        invstd = torch.rsqrt(var + eps)
        shape = _channel_shape(x)
        xhat = (xa - mean.view(shape)) * invstd.view(shape)
        out = xhat
        if weight is not None:
            out = out * weight.to(acc).view(shape)
        if bias is not None:
            out = out + bias.to(acc).view(shape)
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.group, ctx.count, ctx.has_bias = group, count, bias is not None
        ctx.mark_non_differentiable(mean, var)
        return out.to(x.dtype), mean, var, torch.tensor(count)

    @staticmethod
    def backward(ctx, grad_out, _gm, _gv, _gc):
        xhat, invstd, weight = ctx.saved_tensors
        dims = _reduce_dims(xhat)
        c = xhat.shape[1]
        shape = _channel_shape(xhat)
        dy = grad_out.to(xhat.dtype)
        sum_dy = dy.sum(dims)
        sum_dy_xhat = (dy * xhat).sum(dims)
        grad_weight = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(grad_out.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            packed = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=ctx.group)
            mean_dy = (packed[:c] / ctx.count).view(shape)
            mean_dy_xhat = (packed[c:] / ctx.count).view(shape)
            scale = invstd if weight is None else invstd * weight.to(xhat.dtype)
            grad_x = ((dy - mean_dy - xhat * mean_dy_xhat) * scale.view(shape)).to(grad_out.dtype)
        return grad_x, grad_weight, grad_bias, None, None


def sync_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, process_group=None):
    """``torch.nn.functional.batch_norm`` with the batch statistics of the whole process
    group in training: ``momentum`` is a float (the caller turns BatchNorm's momentum=None
    into 1 / num_batches_tracked); the running statistics are updated with the global
    mean and the unbiased global variance (global count). Without a group to synchronise
    over (no initialised process group, or a group of one), or when not training, it is
    exactly ``torch.nn.functional.batch_norm``."""
    group = sync_group(process_group) if training else None
    if group is None:
        return TF.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    out, mean, var, count = _SyncBatchNormFunction.apply(input, weight, bias, float(eps), group)
    if running_mean is not None:
        with torch.no_grad():
            n = float(count)
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_((var * (n / (n - 1))).to(running_var.dtype), alpha=momentum)
    return out


def bn_call_arguments(bn):
    """(training, momentum factor, running_mean, running_var) of one BatchNorm forward call,
    with its num_batches_tracked bookkeeping done, as torch's _BatchNorm.forward does it."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    training = bn.training or (bn.running_mean is None and bn.running_var is None)
    use_running = not bn.training or bn.track_running_stats
    return (training, factor, bn.running_mean if use_running else None, bn.running_var if use_running else None)


class SyncBatchNorm(_BatchNorm):
    """Drop-in for :class:`torch.nn.SyncBatchNorm` that works on CPU (gloo) as well as on
    CUDA (nccl): same constructor (``num_features, eps, momentum, affine,
    track_running_stats, process_group, device, dtype``), parameters and state_dict. In
    training with an initialised process group of more than one rank, batch statistics are
    those of the whole group (see :func:`sync_batch_norm`); otherwise, and in eval mode, it
    is exactly :class:`torch.nn.BatchNorm2d` (for any input of 2 or more dims).

    It is not a subclass of torch.nn.SyncBatchNorm, which DistributedDataParallel refuses
    on CPU; a Conv2d feeding it is fused with it by :func:`cnnext.fuse`, and the fused op
    then synchronises over ``process_group``.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input):
        self._check_input_dim(input)
        if input.shape[1] == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")
        training, factor, running_mean, running_var = bn_call_arguments(self)
        if self.training:  # synchronised only in training, as torch.nn.SyncBatchNorm
            return sync_batch_norm(input, running_mean, running_var, self.weight, self.bias, True, factor,
                                   self.eps, self.process_group)
        return TF.batch_norm(input, running_mean, running_var, self.weight, self.bias, training, factor, self.eps)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Every BatchNorm*D of ``module`` (stock, and stock nn.SyncBatchNorm) replaced by a
        cnnext SyncBatchNorm holding the same Parameter and buffer objects and mode; returns
        the module (a new one if ``module`` itself is a batch norm), as
        :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm` does."""
        from .fused import FusedBatchNorm2d

        if isinstance(module, FusedBatchNorm2d):  # already fused: its FusedConv2d synchronises
            module.__dict__["_unfused_class"] = cls
            module.process_group = process_group
            return module
        if isinstance(module, _BatchNorm) and not isinstance(module, cls) and \
                type(module).__module__.startswith("torch.nn"):
            out = cls.__new__(cls)
            out.__dict__.update(module.__dict__)
            for key in ("_parameters", "_buffers", "_modules"):
                out.__dict__[key] = dict(module.__dict__[key])
            out.process_group = process_group
            return out
        for name, child in list(module._modules.items()):
            if child is not None:
                new = cls.convert_sync_batchnorm(child, process_group)
                if new is not child:
                    module._modules[name] = new
        return module

