"""Batching rules of the cnnext ops for torch.vmap (and so for torch.func's jacrev, jacfwd,
hessian and per-sample gradients: vmap(grad(functional_call(model, ...)))).

Each rule receives the tensors with their vmap dimension (in_dims, None when a tensor is
not batched) and returns (output, out_dims). Three ways, by what is batched:

- **Fold** (every pooling op; a convolution whose weight and bias are not batched): the
  vmap dimension joins the batch dimension, one op call for the whole vmap. A per-sample
  input of shape (N, C, H, W) becomes (B * N, C, H, W); an unbatched per-sample input
  (C, H, W) becomes a batch (B, C, H, W). The ops compute every sample independently,
  so this is exact: the same kernel, the same summation order per sample.
- **Groups** (a convolution whose weight is batched, and the weight gradient of
  per-sample gradients): the B per-sample problems become one grouped convolution with
  B times the groups, the vmap dimension folded into the channels.
- **Loop** (the fused training ops, whose batch statistics must stay per sample, and
  anything else): one op call per vmap index, stacked.

Registered with torch.library.register_vmap on the ops' FuncTorchBatched key, so the
rules run only under vmap; they call the ops themselves, with autograd, one level down.
"""
import torch

_ops = torch.ops.cnnext


def _register(name, rule, lib):
    """Registers rule for cnnext::name. functorch gives a list argument (an int list) a
    list of in_dims; the rules see None for every non-tensor argument."""

    def normalised(info, in_dims, *args):
        dims = tuple(d if isinstance(a, torch.Tensor) else None for a, d in zip(args, in_dims))
        return rule(info, dims, *args)

    torch.library.register_vmap(f"cnnext::{name}", normalised, lib=lib)


def _front(t, d):
    """t with its vmap dimension first (t as it is when it has none)."""
    return t if d is None or d == 0 else t.movedim(d, 0)


def _batched(args, dims, size):
    """args with every tensor at a batched position given a leading vmap dimension of
    length size (an unbatched one expanded, no copy); other positions as they are."""
    out = []
    for a, d in zip(args, dims):
        if isinstance(a, torch.Tensor):
            a = _front(a, d) if d is not None else a.unsqueeze(0).expand(size, *a.shape)
        out.append(a)
    return out


def _fold(t):
    """(B, N, C, H, W) -> (B * N, C, H, W); a (B, C, H, W) batch of unbatched samples
    is already a batch."""
    return t.flatten(0, 1) if t.dim() == 5 else t


def _unfold(t, size, sample_dim):
    """The inverse of _fold for an output: (B * N, ...) -> (B, N, ...) when the samples
    were 4-D; as it is when they were 3-D (the batch is the vmap dimension)."""
    return t.unflatten(0, (size, -1)) if sample_dim == 4 else t


def _loop(op, info, in_dims, args):
    """One op call per vmap index; outputs stacked along dim 0."""
    results = []
    for i in range(info.batch_size):
        sliced = [a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)]
        results.append(op(*sliced))
    if isinstance(results[0], tuple):
        return tuple(torch.stack(r) for r in zip(*results)), (0,) * len(results[0])
    return torch.stack(results), 0


def _sizes(size, batch, sample_dim):
    """A per-sample size list (N, C, H, W) or (C, H, W) for the folded call."""
    size = list(size)
    return [batch * size[0]] + size[1:] if sample_dim == 4 else [batch] + size


def _fold_rule(op, sample_positions):
    """A rule for an op whose batched tensors are all at sample_positions (the tensors
    that carry the batch dimension N); any other batched tensor goes to the loop."""

    def rule(info, in_dims, *args):
        if any(d is not None for i, d in enumerate(in_dims) if i not in sample_positions):
            return _loop(op, info, in_dims, args)
        b = info.batch_size
        args = list(args)
        samples = _batched([args[i] for i in sample_positions], [in_dims[i] for i in sample_positions], b)
        for i, t in zip(sample_positions, samples):
            args[i] = _fold(t)
        sample_dim = samples[0].dim() - 1
        out = op(*args)
        if isinstance(out, tuple):
            return tuple(_unfold(o, b, sample_dim) for o in out), (0,) * len(out)
        return _unfold(out, b, sample_dim), 0

    return rule


# --- pooling: every tensor is per sample ------------------------------------------------

def _register_pooling(lib):
    for name, pos in [
        ("avg_pool2d", (0,)),
        ("avg_pool2d_backward", (0, 1)),
        ("adaptive_avg_pool2d", (0,)),
        ("adaptive_avg_pool2d_backward", (0, 1)),
        ("max_pool2d_with_indices", (0,)),
        ("max_pool2d_select", (0, 1)),
        ("max_unpool2d", (0, 1)),
        ("max_unpool2d_backward", (0, 1)),
    ]:
        _register(name, _fold_rule(getattr(_ops, name), pos), lib=lib)

    def max_pool_backward(info, in_dims, g, idx, size, k, s, p, d, ceil):
        b = info.batch_size
        g, idx = _batched([g, idx], in_dims[:2], b)
        sample_dim = g.dim() - 1
        out = _ops.max_pool2d_with_indices_backward(_fold(g), _fold(idx), _sizes(size, b, sample_dim), k, s, p, d, ceil)
        return _unfold(out, b, sample_dim), 0

    _register("max_pool2d_with_indices_backward", max_pool_backward, lib=lib)


# --- convolutions -------------------------------------------------------------------------

def _channels_into_groups(t, b):
    """(B, N, C, H, W) -> (N, B * C, H, W) and (B, C, H, W) (unbatched samples) ->
    (B * C, H, W): the vmap dimension joins the channels, sample b's channels first."""
    if t.dim() == 5:
        return t.movedim(0, 1).flatten(1, 2)
    return t.flatten(0, 1)


def _channels_out_of_groups(t, b):
    """The inverse of _channels_into_groups for an output: (N, B * O, H, W) ->
    (B, N, O, H, W), (B * O, H, W) -> (B, O, H, W)."""
    if t.dim() == 4:
        return t.unflatten(1, (b, -1)).movedim(1, 0)
    return t.unflatten(0, (b, -1))


def _conv2d(info, in_dims, x, w, bias, stride, padding, dilation, groups):
    b = info.batch_size
    xd, wd, bd = in_dims[:3]
    if wd is None and bd is None:  # weights shared: fold the vmap dimension into the batch
        x = _front(x, xd)
        sample_dim = x.dim() - 1
        return _unfold(_ops.conv2d(_fold(x), w, bias, stride, padding, dilation, groups), b, sample_dim), 0
    # Per-sample weights: one convolution with b * groups groups.
    x, w = _batched([x, w], [xd, wd], b)
    if bias is not None:
        bias = _batched([bias], [bd], b)[0].flatten(0, 1)
    out = _ops.conv2d(_channels_into_groups(x, b), w.flatten(0, 1), bias, stride, padding, dilation, groups * b)
    return _channels_out_of_groups(out, b), 0


def _conv2d_input_backward(info, in_dims, g, w, input_size, stride, padding, dilation, groups):
    b = info.batch_size
    gd, wd = in_dims[:2]
    if wd is None:
        g = _front(g, gd)
        sample_dim = g.dim() - 1
        out = _ops.conv2d_input_backward(_fold(g), w, _sizes(input_size, b, sample_dim), stride, padding, dilation, groups)
        return _unfold(out, b, sample_dim), 0
    g, w = _batched([g, w], [gd, wd], b)
    size = list(input_size)
    size[-3] = size[-3] * b
    out = _ops.conv2d_input_backward(_channels_into_groups(g, b), w.flatten(0, 1), size, stride, padding, dilation,
                                     groups * b)
    return _channels_out_of_groups(out, b), 0


def _conv2d_weight_backward(info, in_dims, g, x, weight_size, stride, padding, dilation, groups):
    # Per-sample weight gradients: sample b's (grad_output, input) pair as groups of one
    # grouped weight gradient, (B * O, C / groups, kH, kW).
    b = info.batch_size
    g, x = _batched([g, x], in_dims[:2], b)
    size = list(weight_size)
    size[0] = size[0] * b
    out = _ops.conv2d_weight_backward(_channels_into_groups(g, b), _channels_into_groups(x, b), size, stride, padding,
                                      dilation, groups * b)
    return out.unflatten(0, (b, -1)), 0


def _channel_sum(info, in_dims, x):
    b = info.batch_size
    x = _front(x, in_dims[0])
    return _ops.channel_sum(_channels_into_groups(x, b)).unflatten(0, (b, -1)), 0


def _conv_transpose2d(info, in_dims, x, w, bias, stride, padding, output_padding, groups, dilation):
    xd, wd, bd = in_dims[:3]
    if wd is not None or bd is not None:
        args = (x, w, bias, stride, padding, output_padding, groups, dilation)
        return _loop(_ops.conv_transpose2d, info, in_dims, args)
    x = _front(x, xd)
    sample_dim = x.dim() - 1
    out = _ops.conv_transpose2d(_fold(x), w, bias, stride, padding, output_padding, groups, dilation)
    return _unfold(out, info.batch_size, sample_dim), 0


def _register_conv(lib):
    _register("conv2d", _conv2d, lib=lib)
    _register("conv2d_input_backward", _conv2d_input_backward, lib=lib)
    _register("conv2d_weight_backward", _conv2d_weight_backward, lib=lib)
    _register("channel_sum", _channel_sum, lib=lib)
    _register("conv_transpose2d", _conv_transpose2d, lib=lib)
    # Inference: the running statistics and the BN affine are parameters, the input is per sample.
    _register("conv_bn_relu2d_eval", _fold_rule(_ops.conv_bn_relu2d_eval, (0,)), lib=lib)
    # Training: batch statistics are per sample, so one call per vmap index.
    for name in ("conv_bn_relu2d_train", "conv_bn_relu2d_train_backward"):
        op = getattr(_ops, name)
        _register(name, lambda info, in_dims, *args, op=op: _loop(op, info, in_dims, args),
                                    lib=lib)


_lib = torch.library.Library("cnnext", "IMPL")
_register_pooling(_lib)
_register_conv(_lib)
