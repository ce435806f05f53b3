"""cnnext.fuse(model): Conv2d -> BatchNorm2d (-> ReLU) runs replaced by ConvBNReLU2d."""
from torch import nn

from .nn.fused import ConvBNReLU2d

__all__ = ["fuse"]


def _fusable(conv, bn):
    return (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
            and not isinstance(conv, ConvBNReLU2d) and bn.num_features == conv.out_channels
            and not nn.parameter.is_lazy(conv.weight))


def _whole_block(seq):
    """A plain nn.Sequential that is exactly (Conv2d, BatchNorm2d[, ReLU]): its fused
    replacement keeps every state_dict key."""
    if type(seq) is not nn.Sequential or len(seq) not in (2, 3):
        return None
    parts = list(seq)
    if not _fusable(parts[0], parts[1]) or (len(parts) == 3 and type(parts[2]) is not nn.ReLU):
        return None
    return ConvBNReLU2d.from_modules(parts[0], parts[1], relu=len(parts) == 3)


def _fuse_children(module):
    names = list(module._modules)
    in_sequence = isinstance(module, nn.Sequential)
    i = 0
    while i < len(names):
        child = module._modules[names[i]]
        nxt = module._modules[names[i + 1]] if i + 1 < len(names) else None
        if child is not None and _fusable(child, nxt):
            # A ReLU is taken in only inside a Sequential: elsewhere a module's forward may
            # call its ReLU child more than once (torchvision's BasicBlock does).
            third = module._modules[names[i + 2]] if i + 2 < len(names) else None
            relu = in_sequence and type(third) is nn.ReLU
            module._modules[names[i]] = ConvBNReLU2d.from_modules(child, nxt, relu=relu)
            module._modules[names[i + 1]] = nn.Identity()
            if relu:
                module._modules[names[i + 2]] = nn.Identity()
            i += 3 if relu else 2
            continue
        block = _whole_block(child) if child is not None else None
        if block is not None:
            module._modules[names[i]] = block
        elif child is not None and not isinstance(child, ConvBNReLU2d):
            _fuse_children(child)
        i += 1


def fuse(model):
    """Replaces, in place, every Conv2d -> BatchNorm2d (-> ReLU) run of ``model`` by a
    cnnext.nn.ConvBNReLU2d holding the same Parameter and buffer objects (so optimizers
    and their state keep working, and train/eval outputs, gradients and running
    statistics are those of the original), and returns the model. Use the return value:
    a model that is itself such a run comes back as a new ConvBNReLU2d.

    What is fused (stock torch.nn.Conv2d / BatchNorm2d and their cnnext subclasses):
      - a plain nn.Sequential that is exactly (Conv2d, BatchNorm2d[, ReLU]) becomes one
        ConvBNReLU2d, which keeps its state_dict keys (``0.*``, ``1.*``);
      - inside a longer nn.Sequential, Conv2d, BatchNorm2d[, ReLU] at positions i, i+1[, i+2]
        become ConvBNReLU2d at i and nn.Identity after it: keys ``i.*`` move to ``i.0.*``
        and ``(i+1).*`` to ``i.1.*`` (as torch.ao.quantization.fuse_modules does);
      - among the children of any other module, a Conv2d registered right before a
        BatchNorm2d is taken to feed it (as in torchvision's networks) and fused with it,
        without a ReLU (a ReLU child may be called more than once by the forward):
        ``conv.*`` and ``bn.*`` move to ``conv.0.*`` and ``conv.1.*``.
    Hooks registered on the fused Conv2d/BatchNorm2d modules no longer run.
    """
    if isinstance(model, ConvBNReLU2d):
        return model
    block = _whole_block(model)
    if block is not None:
        return block
    _fuse_children(model)
    return model
