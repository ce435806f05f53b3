"""Interleaved medians of cnnext bfloat16 against stock bfloat16 and stock float32 on the
CPU, for a shared, noisy machine: each round times every implementation once, in turn, so
that a burst of load hits all of them alike; the median over rounds is reported with the
ratios cnnext / stock-bf16 and cnnext / stock-fp32 and their geometric means.

    python benchmarks/bf16_interleaved.py [--rounds 15] [--what forward|train|pool|resnet|all]
                                          [--threads N] [--clock wall|cpu]

--clock cpu times each call by the process's CPU time (time.process_time) instead of the
wall clock: with --threads 1, a call that loses its core to another process is not
charged for the wait, which keeps the ratios steadier on a loaded machine (at 2 threads
a waiting OpenMP thread may spin and be charged).

--no-stock-bf16 leaves stock bfloat16 out of the convolution and pooling rounds (ratios
against stock float32 only): on CPUs without AVX512_BF16 stock's bfloat16 convolution takes
seconds a call (issue 16's "<= 0.55 of stock float32" row is the one that says something
there).

--what resnet times one SGD step of ResNet-18 (224x224, batch 8) under
torch.autocast('cpu', torch.bfloat16), cnnext against stock, interleaved the same way
(issue 16's target: <= 1.0 of stock's autocast step).
"""
import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cnnext  # noqa: E402
from test_bf16_bench import CONV3X3, POOL_SHAPES  # noqa: E402


STOCK_BF16 = True


def conv_case(shape, train):
    n, c, h, w, o, k, s, p = shape
    g = torch.Generator().manual_seed(0)
    x32, w32, b32 = torch.randn(n, c, h, w, generator=g), torch.randn(o, c, k, k, generator=g), torch.randn(o, generator=g)
    impls = {}
    for name, fn, dt in (("cnnext-bf16", cnnext.functional.conv2d, torch.bfloat16),
                         ("torch-bf16", F.conv2d, torch.bfloat16), ("torch-fp32", F.conv2d, torch.float32)):
        if name == "torch-bf16" and not STOCK_BF16:
            continue
        x, wt, b = (t.to(dt).requires_grad_(train) for t in (x32, w32, b32))
        if train:
            gy = torch.randn_like(fn(x, wt, b, s, p).detach())
            impls[name] = (lambda fn=fn, x=x, wt=wt, b=b, gy=gy: torch.autograd.grad(fn(x, wt, b, s, p), (x, wt, b), gy))
        else:
            impls[name] = (lambda fn=fn, x=x, wt=wt, b=b: fn(x, wt, b, s, p))
    return impls


def pool_case(shape):
    n, c, h, w, k, s, p = shape
    x32 = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(0))
    impls = {}
    for name, fn, dt in (("cnnext-bf16", cnnext.functional.max_pool2d, torch.bfloat16),
                         ("torch-bf16", F.max_pool2d, torch.bfloat16), ("torch-fp32", F.max_pool2d, torch.float32)):
        if name == "torch-bf16" and not STOCK_BF16:
            continue
        x = x32.to(dt).requires_grad_()
        gy = torch.randn_like(fn(x, k, s, p).detach())
        impls[name + " fwd"] = (lambda fn=fn, x=x: fn(x.detach(), k, s, p, return_indices=True))
        impls[name + " fwd+bwd"] = (lambda fn=fn, x=x, gy=gy: torch.autograd.grad(fn(x, k, s, p), (x,), gy))
    return impls


def resnet_case():
    impls = {}
    x = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(1))
    for backend in ("cnnext", "torch"):
        torch.manual_seed(0)
        model = cnnext.models.resnet18(in_channels=3, num_classes=10, backend=backend)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def step(model=model, opt=opt):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()

        impls[backend] = step
    return impls


CLOCK = time.perf_counter


def measure(impls, rounds):
    for f in impls.values():  # warm-up
        f()
    times = {k: [] for k in impls}
    for _ in range(rounds):
        for k, f in impls.items():
            t = CLOCK()
            f()
            times[k].append(CLOCK() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--what", default="all", choices=["forward", "train", "pool", "resnet", "all"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    ap.add_argument("--no-stock-bf16", action="store_true", help="leave stock bfloat16 out (ratios to float32)")
    a = ap.parse_args()
    global CLOCK, STOCK_BF16
    STOCK_BF16 = not a.no_stock_bf16
    CLOCK = time.process_time if a.clock == "cpu" else time.perf_counter
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cnnext ISA {cnnext._C._cpu_isa()}, "
          f"{a.clock} clock")
    kinds = ["forward", "train", "pool", "resnet"] if a.what == "all" else [a.what]
    for kind in kinds:
        if kind == "resnet":
            med = measure(resnet_case(), a.rounds)
            c, t = med["cnnext"], med["torch"]
            print(f"resnet18 autocast bf16 step (224, batch 8) cnnext {c * 1e3:8.1f} ms  torch {t * 1e3:8.1f} ms  "
                  f"ratio {c / t:5.2f}")
            continue
        r16, r32 = [], []
        cases = POOL_SHAPES if kind == "pool" else CONV3X3
        for name, shape in cases.items():
            if kind == "pool":
                med = measure(pool_case(shape), a.rounds)
                for part in ("fwd", "fwd+bwd"):
                    c, t16, t32 = (med.get(f"{impl} {part}", math.nan) for impl in ("cnnext-bf16", "torch-bf16", "torch-fp32"))
                    r16.append(c / t16)
                    r32.append(c / t32)
                    print(f"pool {name:16s} {part:8s} cnnext {c * 1e3:8.2f} ms  torch-bf16 {t16 * 1e3:8.2f} ms  "
                          f"torch-fp32 {t32 * 1e3:8.2f} ms  ratio/bf16 {c / t16:5.2f}  ratio/fp32 {c / t32:5.2f}")
                continue
            ctx = torch.no_grad() if kind == "forward" else torch.enable_grad()
            with ctx:
                med = measure(conv_case(shape, kind == "train"), a.rounds)
            c, t16, t32 = med["cnnext-bf16"], med.get("torch-bf16", math.nan), med["torch-fp32"]
            r16.append(c / t16)
            r32.append(c / t32)
            print(f"conv {kind:7s} {name:14s} cnnext {c * 1e3:8.2f} ms  torch-bf16 {t16 * 1e3:8.2f} ms  "
                  f"torch-fp32 {t32 * 1e3:8.2f} ms  ratio/bf16 {c / t16:5.2f}  ratio/fp32 {c / t32:5.2f}")
        gm = lambda v: math.exp(sum(map(math.log, v)) / len(v))  # noqa: E731
        print(f"== {kind}: geomean cnnext/torch-bf16 {gm(r16):.2f}, cnnext/torch-fp32 {gm(r32):.2f}")


if __name__ == "__main__":
    main()
