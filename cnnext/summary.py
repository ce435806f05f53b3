"""cnnext.summary(model, input_size): a layer-by-layer table of output shapes and
parameter counts, the way "Dive into Deep Learning" prints its `output shape:` lines."""
import sys
from dataclasses import dataclass

import torch

__all__ = ["summary", "SummaryRow"]


@dataclass(frozen=True)
class SummaryRow:
    name: str          # dotted module path ("" for the model itself)
    layer: str         # class name
    output_shape: tuple
    params: int        # parameters of this module and its children


def _shape_of(out):
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return tuple(out[0].shape)
    return ()


def summary(model, input_size, depth=1, dtype=None, device=None, file=None):
    """Runs one forward pass of `model` on zeros of `input_size` ((C, H, W) or (N, C, H, W);
    a batch of one is added to a 3-tuple) and prints, for each submodule down to `depth`
    levels in the order they ran, its output shape and parameter count, then the totals.

    The model runs in eval mode without gradients and is put back in the mode it was in.
    dtype and device default to those of the model's first parameter. Returns the rows
    (a list of SummaryRow) so that callers can use them.
    """
    file = sys.stdout if file is None else file
    if depth < 1:
        raise ValueError(f"summary: expected depth to be at least 1, got {depth}")
    size = tuple(int(s) for s in input_size)
    if len(size) == 3:
        size = (1, *size)
    if len(size) != 4 or min(size) < 1:
        raise ValueError(f"summary: expected input_size to be (C, H, W) or (N, C, H, W) of positive sizes, got {input_size!r}")
    first = next(iter(model.parameters()), None)
    dtype = dtype or (first.dtype if first is not None else torch.float32)
    device = device or (first.device if first is not None else "cpu")

    rows, hooks = [], []
    for name, mod in model.named_modules():
        level = name.count(".") + 1 if name else 0
        if level == 0 or level > depth:
            continue
        if level < depth and any(True for _ in mod.children()):
            continue  # shown through its children

        def hook(m, args, out, name=name):
            rows.append(SummaryRow(name, type(m).__name__, _shape_of(out), sum(p.numel() for p in m.parameters())))

        hooks.append(mod.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            out = model(torch.zeros(size, dtype=dtype, device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    table = [("layer", "type", "output shape", "params")]
    table += [(r.name, r.layer, "x".join(map(str, r.output_shape)), f"{r.params:,}") for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(4)]
    print(f"{type(model).__name__} on input {'x'.join(map(str, size))} ({str(dtype).replace('torch.', '')})", file=file)
    for i, t in enumerate(table):
        print("  ".join(c.ljust(w) if j < 3 else c.rjust(w) for j, (c, w) in enumerate(zip(t, widths))), file=file)
        if i == 0:
            print("  ".join("-" * w for w in widths), file=file)
    print(f"output {'x'.join(map(str, _shape_of(out)))}; {total:,} parameters ({trainable:,} trainable)", file=file)
    return rows
