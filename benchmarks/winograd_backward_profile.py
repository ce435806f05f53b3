"""Where the backward time of issue 15's 3x3 stride-1 layers (batch 8) goes: interleaved
medians of each part of a training step, on its own, for stock torch and cnnext.

Parts: the forward (with autograd on, as in training), the input gradient, the weight
gradient (with the bias gradient for stock, whose one call computes both; cnnext's bias
gradient is a separate channel sum, timed as "bias"). cnnext's parts are its ops called
directly (torch.ops.cnnext.conv2d_input_backward / conv2d_weight_backward), stock's are
aten.convolution_backward with one output asked for. Each round times every part of every
implementation once, in a shuffled order (a burst of load hits all alike). "cached": the
weight is unchanged between calls (the benchmark suite's test_winograd_train), so the
Winograd weight transforms come from the cache; "--fresh" bumps the weight's version before
every call (a training step's new weight: the transforms are recomputed each time).

    python benchmarks/winograd_backward_profile.py [--rounds 11] [--threads 1] [--fresh] [--layers 3x3_64x56,...]
"""
import argparse
import math
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cnnext  # noqa: E402,F401
import cnnext.backends.cpu as cpu_backend  # noqa: E402
from test_winograd_bench import WINOGRAD_LAYERS, make  # noqa: E402


def parts(shape, fresh):
    x, w, b = make(shape, False)
    gy = torch.randn(shape[0], shape[4], shape[2], shape[3])
    ops = torch.ops.cnnext
    args = ([1, 1], [1, 1], [1, 1], 1)

    def bump():
        if fresh:
            w.add_(0.0)  # a new version of the weight

    def cn(winograd, fn):
        def f():
            bump()
            with cpu_backend.flags(winograd=winograd):
                return fn()
        return f

    def st(mask):
        def f():
            bump()
            return torch.ops.aten.convolution_backward(gy, x, w, [shape[4]], [1, 1], [1, 1], [1, 1], False,
                                                       [0, 0], 1, mask)
        return f

    out = {
        "torch fwd": lambda: (bump(), torch.ops.aten.convolution(x, w, b, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)),
        "torch in": st([True, False, False]),
        "torch w+b": st([False, True, True]),
        "bias": lambda: gy.sum((0, 2, 3)),
    }
    for name, on in (("cnnext", True), ("gemm", False)):
        out[f"{name} fwd"] = cn(on, lambda: ops.conv2d(x, w, b, *args))
        out[f"{name} in"] = cn(on, lambda: ops.conv2d_input_backward(gy, w, list(x.shape), *args))
        out[f"{name} w"] = cn(on, lambda: ops.conv2d_weight_backward(gy, x, list(w.shape), *args))
    return out


def measure(fns, rounds):
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for k in order:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--layers", default=",".join(WINOGRAD_LAYERS))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'fresh weight per call' if a.fresh else 'cached weight'}, load average {os.getloadavg()}")
    gm = lambda v: math.exp(sum(map(math.log, v)) / len(v))  # noqa: E731
    step_ratio = {"cnnext": [], "gemm": []}
    with torch.no_grad():
        for name in a.layers.split(","):
            med = measure(parts(WINOGRAD_LAYERS[name], a.fresh), a.rounds)
            ms = {k: v * 1e3 for k, v in med.items()}
            stock = ms["torch fwd"] + ms["torch in"] + ms["torch w+b"]
            row = [f"{name:11s} stock fwd {ms['torch fwd']:7.2f} in {ms['torch in']:7.2f} w+b {ms['torch w+b']:7.2f}"]
            for impl in ("cnnext", "gemm"):
                total = ms[f"{impl} fwd"] + ms[f"{impl} in"] + ms[f"{impl} w"] + ms["bias"]
                step_ratio[impl].append(total / stock)
                row.append(f"{impl} fwd {ms[f'{impl} fwd']:7.2f} in {ms[f'{impl} in']:7.2f} "
                           f"w {ms[f'{impl} w']:7.2f} (+bias {ms['bias']:.2f}) = {total / stock:4.2f} of stock")
            print("\n  ".join(row), flush=True)
    print("== sum of parts / stock's, geomean: " + ", ".join(f"{k} {gm(v):.2f}" for k, v in step_ratio.items()))
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
