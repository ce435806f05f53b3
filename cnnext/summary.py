"""cnnext.summary(model, input_size): a layer-by-layer table of output shapes and
parameter counts, the way "Dive into Deep Learning" prints its `output shape:` lines,
optionally with the time of each layer on cnnext and on stock torch."""
import statistics
import sys
import time as _time
from dataclasses import dataclass

import torch

__all__ = ["summary", "SummaryRow"]

WIDTH = 100  # the table fits a terminal of this many columns


@dataclass(frozen=True)
class SummaryRow:
    name: str          # dotted module path ("" for the model itself)
    layer: str         # class name
    output_shape: tuple  # () when the module did not run (or is a part of a fused block)
    params: int        # parameters this row accounts for (0 on later calls of a module called again)
    part: bool = False  # a part of a fused block (shown with parts=True; its parameters are in the block's row)
    calls: int = 1     # which call of the module this row is (2 and on: called again)
    cnnext_ms: float = None  # with time=True: median time of this call, cnnext twin
    torch_ms: float = None   # with time=True: median time of this call, stock twin


def _shape_of(out):
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return tuple(out[0].shape)
    return ()


def _is_block(m):
    from .nn import ConvBNReLU2d

    return isinstance(m, ConvBNReLU2d)


def _shown(model, depth):
    """[(name, module, own_only)]: the modules that get rows, in registration order. A module
    gets a row at level `depth`, or above it when it has no children or is a fused block;
    a module shown through its children with parameters of its own gets a row for those."""
    shown = []

    def walk(name, m, level, seen):
        if id(m) in seen:
            return
        seen.add(id(m))
        children = [(n, c) for n, c in m._modules.items() if c is not None]
        if level == depth or not children or _is_block(m):
            shown.append((name, m, False))
            return
        if any(True for _ in m.parameters(recurse=False)):
            shown.append((name, m, True))
        for n, c in children:
            walk(f"{name}.{n}" if name else n, c, level + 1, seen)

    walk("", model, 0, set())
    return shown


def _record(model, shown, x, runs=1):
    """Runs model on x `runs` times; returns [(name, output shape, [seconds per run])] per call
    of each shown module, in the order they ran."""
    calls, hooks, order = {}, [], []
    for name, m, own in shown:
        if own:
            continue

        def pre(mod, args, name=name):
            stack.append((name, _time.perf_counter()))

        def post(mod, args, out, name=name):
            _, t0 = stack.pop()
            k = counts[name] = counts.get(name, 0) + 1
            key = (name, k)
            if key not in calls:
                calls[key] = [_shape_of(out), []]
                order.append(key)
            calls[key][1].append(_time.perf_counter() - t0)

        hooks.append(m.register_forward_pre_hook(pre))
        hooks.append(m.register_forward_hook(post))
    try:
        out = None
        for _ in range(runs):
            stack, counts = [], {}
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return [(key, calls[key][0], calls[key][1]) for key in order], out


def summary(model, input_size, depth=1, dtype=None, device=None, file=None, time=False, parts=False, runs=5):
    """Runs one forward pass of `model` on zeros of `input_size` ((C, H, W) or (N, C, H, W);
    a batch of one is added to a 3-tuple) and prints, for each submodule down to `depth`
    levels in the order they ran, its output shape and parameter count, then the totals.

    The rows account for every parameter at every depth: a fused block (ConvBNReLU2d) is
    one row (``parts=True`` adds rows for its Conv2d, BatchNorm2d and ReLU, marked as
    parts); a module shown through its children that has parameters of its own gets a row
    for those; a module called again gets a row per call, its parameters counted on the
    first; modules that did not run come last, with no shape.

    ``time=True`` adds two columns: the median time (ms, over `runs` forward passes after
    one warm-up) of each row's call on the model's cnnext twin (:func:`cnnext.convert`,
    run under :func:`cnnext.enable`) and on its stock twin (:func:`cnnext.revert`); both
    share the model's parameters. The model runs in eval mode without gradients and is put
    back in the mode it was in. dtype and device default to those of the model's first
    parameter. The table fits 100 columns. Returns the rows (a list of SummaryRow).
    """
    file = sys.stdout if file is None else file
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"summary: expected depth to be an int of at least 1, got {depth!r}")
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ValueError(f"summary: expected runs to be an int of at least 1, got {runs!r}")
    size = tuple(int(s) for s in input_size)
    if len(size) == 3:
        size = (1, *size)
    if len(size) != 4 or min(size) < 1:
        raise ValueError(f"summary: expected input_size to be (C, H, W) or (N, C, H, W) of positive sizes, got {input_size!r}")
    first = next(iter(model.parameters()), None)
    dtype = dtype or (first.dtype if first is not None else torch.float32)
    device = device or (first.device if first is not None else "cpu")
    x = torch.zeros(size, dtype=dtype, device=device)

    shown = _shown(model, depth)
    modes = [(m, m.training) for m in model.modules()]
    timings = {}
    try:
        model.eval()
        with torch.no_grad():
            ran, out = _record(model, shown, x)
            if time:
                from ._convert import convert, revert
                from ._enable import enable

                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    twins = (("cnnext", convert(model)), ("torch", revert(model)))
                for label, twin in twins:
                    twin_shown = [(n, twin.get_submodule(n), own) for n, _, own in shown]
                    if label == "cnnext":
                        with enable():
                            _record(twin, twin_shown, x)  # warm-up
                            got, _ = _record(twin, twin_shown, x, runs)
                    else:
                        _record(twin, twin_shown, x)
                        got, _ = _record(twin, twin_shown, x, runs)
                    for key, _, secs in got:
                        timings[(label, key)] = 1e3 * statistics.median(secs)
    finally:
        for m, was in modes:
            m.training = was

    modules = {name: m for name, m, _ in shown}
    rows, counted = [], set()

    def nparams(m, own=False):
        return sum(p.numel() for p in m.parameters(recurse=not own))

    for (name, k), shape, _ in ran:
        m = modules[name]
        p = nparams(m) if k == 1 else 0
        counted.add(name)
        rows.append(SummaryRow(name, type(m).__name__, shape, p, False, k,
                               timings.get(("cnnext", (name, k))), timings.get(("torch", (name, k)))))
        if parts and k == 1 and _is_block(m):
            for n, c in m.named_children():
                rows.append(SummaryRow(f"{name}.{n}", type(c).__name__, (), nparams(c), True))
    for name, m, own in shown:  # did not run, or parameters of its own
        if name not in counted:
            rows.append(SummaryRow(name, type(m).__name__ + (" (own)" if own else ""), (), nparams(m, own)))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    head = ["layer", "type", "output shape", "params"] + (["cnnext ms", "torch ms"] if time else [])
    table = []
    for r in rows:
        shape = "x".join(map(str, r.output_shape)) if r.output_shape else ("(part)" if r.part else
                                                                           "-" if r.calls == 1 else "")
        cells = [r.name or "(model)", ("  " if r.part else "") + r.layer, shape,
                 f"{r.params:,}" if (r.calls == 1 and not r.part) else (f"({r.params:,})" if r.part else "again")]
        if time:
            cells += [f"{r.cnnext_ms:.3f}" if r.cnnext_ms is not None else "",
                      f"{r.torch_ms:.3f}" if r.torch_ms is not None else ""]
        table.append(cells)
    widths = [max(len(t[i]) for t in [head] + table) for i in range(len(head))]
    over = sum(widths) + 2 * (len(widths) - 1) - WIDTH
    if over > 0:  # shorten the names from the left, then the types
        for col in (0, 1):
            cut = min(over, max(widths[col] - 12, 0))
            if cut:
                widths[col] -= cut
                over -= cut
                for t in table:
                    if len(t[col]) > widths[col]:
                        t[col] = ".." + t[col][len(t[col]) - widths[col] + 2:]
    right = {3, 4, 5}
    title = f"{type(model).__name__} on input {'x'.join(map(str, size))} ({str(dtype).replace('torch.', '')})"
    print(title[:WIDTH], file=file)
    for i, t in enumerate([head] + table):
        line = "  ".join(c.rjust(w) if j in right else c.ljust(w) for j, (c, w) in enumerate(zip(t, widths)))
        print(line.rstrip(), file=file)
        if i == 0:
            print("  ".join("-" * w for w in widths), file=file)
    tail = f"output {'x'.join(map(str, _shape_of(out)))}; {total:,} parameters ({trainable:,} trainable)"
    if time:
        c = sum(v for (label, _), v in timings.items() if label == "cnnext")
        s = sum(v for (label, _), v in timings.items() if label == "torch")
        tail += f"\ntime of the rows (medians of {runs} runs): cnnext {c:.2f} ms, torch {s:.2f} ms"
    print(tail, file=file)
    return rows
