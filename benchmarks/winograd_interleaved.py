"""Interleaved medians of the Winograd forward (and forward + backward) on issue 15's 3x3
stride-1 layers (batch 8), for a shared, noisy machine: each round times every
implementation once, in a shuffled order, so that a burst of load hits all of them alike.

Implementations: stock torch (oneDNN), cnnext's GEMM path (Winograd off), cnnext as it
chooses (Winograd where the shape pays), and each Winograd tile forced (F(2x2), F(4x4),
F(6x6)). Ratios are cnnext time / stock time; the load average is printed before and after.
Forward runs under no_grad with one weight (the transformed weight is cached, as in eval);
forward + backward bumps the weight's version before every call (a training step's weight
is new each time, so the transform is recomputed), for every implementation alike.

    python benchmarks/winograd_interleaved.py [--rounds 15] [--what forward|train|all] [--layers 3x3_64x56,...]
"""
import argparse
import math
import os
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cnnext  # noqa: E402
import cnnext.backends.cpu as cpu_backend  # noqa: E402
from cnnext import _C  # noqa: E402
from test_winograd_bench import WINOGRAD_LAYERS, make  # noqa: E402


def impls(shape, train):
    x, w, b = make(shape, train)

    def conv(winograd, tile):
        def f():
            old = _C._get_winograd_tile()
            _C._set_winograd_tile(tile)
            try:
                with cpu_backend.flags(winograd=winograd):
                    return cnnext.functional.conv2d(x, w, b, 1, 1)
            finally:
                _C._set_winograd_tile(old)
        return f

    settings = {"torch": None, "gemm": (False, 0), "auto": (True, 0)}
    settings.update({f"F{m}": (True, m) for m in (2, 4, 6)})
    fns = {k: (lambda: F.conv2d(x, w, b, 1, 1)) if v is None else conv(*v) for k, v in settings.items()}
    if not train:
        return fns
    gy = torch.randn_like(F.conv2d(x, w, b, 1, 1).detach())

    def step(fn, setting):
        # The backward under the same switch and tile as the forward (conv(...) sets them
        # around the forward only).
        def g():
            with torch.no_grad():
                w.add_(0.0)  # a new weight version, as after an optimizer step
            if setting is None:
                return torch.autograd.grad(fn(), (x, w, b), gy)
            old = _C._get_winograd_tile()
            _C._set_winograd_tile(setting[1])
            try:
                with cpu_backend.flags(winograd=setting[0]):
                    return torch.autograd.grad(fn(), (x, w, b), gy)
            finally:
                _C._set_winograd_tile(old)
        return g

    return {k: step(f, settings[k]) for k, f in fns.items()}


def measure(fns, rounds):
    for f in fns.values():  # warm-up (and the weight cache)
        f()
    times = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)  # no implementation always follows the same one
        for k in order:
            f = fns[k]
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--what", default="forward", choices=["forward", "train", "all"])
    ap.add_argument("--layers", default=",".join(WINOGRAD_LAYERS))
    a = ap.parse_args()
    if not _C._winograd_available():
        sys.exit("Winograd needs a CPU with AVX-512F or AVX2 + FMA")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    gm = lambda v: math.exp(sum(map(math.log, v)) / len(v))  # noqa: E731
    for kind in (["forward", "train"] if a.what == "all" else [a.what]):
        ratios = {}
        for name in a.layers.split(","):
            ctx = torch.no_grad() if kind == "forward" else torch.enable_grad()
            with ctx:
                med = measure(impls(WINOGRAD_LAYERS[name], kind == "train"), a.rounds)
            t = med["torch"]
            for k in med:
                ratios.setdefault(k, []).append(med[k] / t)
            cells = "  ".join(f"{k} {med[k] * 1e3:7.2f} ms ({med[k] / t:4.2f})" for k in med)
            print(f"{kind:7s} {name:11s} {cells}", flush=True)
        print(f"== {kind}: geomean ratio to torch: " + ", ".join(f"{k} {gm(v):.2f}" for k, v in ratios.items()))
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
