"""cnnext vs stock PyTorch (cuDNN) on one GPU: the measurements issue 6's targets ask for.

    python benchmarks/gpu/bench_gpu.py                 # full run (~8 min on an H100)
    python benchmarks/gpu/bench_gpu.py --quick         # a few shapes per section
    python benchmarks/gpu/bench_gpu.py --only conv     # sections whose name matches
    python benchmarks/gpu/bench_gpu.py --cpu-dry-run   # plumbing check without a GPU

Method: each timed call is preceded by a write of a 256 MiB buffer (flushes the L2, the
working sets are then cold as in a network), timed with CUDA events around the call
alone, after warm-up; the median of --reps (default 50) calls is kept. Calls slower than
20 ms get fewer reps (at least 10; the JSON records how many). Stock runs with
torch.backends.cudnn.benchmark = True. Like is compared with like: strict fp32 turns TF32
off on both sides (cudnn.allow_tf32 = matmul.allow_tf32 = False), "tf32" turns both on
(cnnext follows cudnn.allow_tf32), bf16/fp16 run both sides in that dtype; max-pool
indices are written on both sides.

Output: a JSON under benchmarks/results/ (gpu-<device>.json unless --out) with every
measurement, and a markdown table of ratios (cnnext speed / stock speed = stock time /
cnnext time; for average pooling the fraction of a device-to-device copy's bandwidth)
with the geometric mean, min and max per target row, then every shape's ratio.

Without a CUDA device (or with a CPU-only cnnext build) it says so and exits with
status 0 having measured nothing (status 1 with --require-gpu).
"""
import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# ---- shapes: (N, C, H, W, out_channels, kernel, stride, padding), ImageNet-sized layers.
CONV_SHAPES = {
    "alexnet_conv1": (64, 3, 224, 224, 64, 11, 4, 2),
    "alexnet_conv2": (64, 64, 27, 27, 192, 5, 1, 2),
    "alexnet_conv3": (64, 192, 13, 13, 384, 3, 1, 1),
    "vgg11_conv2": (32, 64, 112, 112, 128, 3, 1, 1),
    "vgg11_conv3": (32, 128, 56, 56, 256, 3, 1, 1),
    "vgg11_conv5": (32, 256, 28, 28, 512, 3, 1, 1),
    "vgg11_conv7": (32, 512, 14, 14, 512, 3, 1, 1),
    "googlenet_3a_1x1": (64, 192, 28, 28, 64, 1, 1, 0),
    "googlenet_3a_3x3": (64, 96, 28, 28, 128, 3, 1, 1),
    "googlenet_3a_5x5": (64, 16, 28, 28, 32, 5, 1, 2),
    "googlenet_4a_3x3": (64, 96, 14, 14, 208, 3, 1, 1),
    "resnet18_stem": (64, 3, 224, 224, 64, 7, 2, 3),
    "resnet18_l1": (64, 64, 56, 56, 64, 3, 1, 1),
    "resnet18_l2_down": (64, 64, 56, 56, 128, 3, 2, 1),
    "resnet18_l2_shortcut": (64, 64, 56, 56, 128, 1, 2, 0),
    "resnet18_l3": (64, 256, 14, 14, 256, 3, 1, 1),
    "resnet18_l4": (64, 512, 7, 7, 512, 3, 1, 1),
    "densenet_bottleneck": (64, 256, 28, 28, 128, 1, 1, 0),
    "densenet_growth": (64, 128, 28, 28, 32, 3, 1, 1),
    "densenet_transition": (64, 512, 28, 28, 256, 1, 1, 0),
}
QUICK_CONV = ("alexnet_conv2", "vgg11_conv3", "googlenet_3a_3x3", "resnet18_l1", "densenet_growth")
# Fused conv+BN+ReLU: the ResNet / DenseNet convolutions that BN follows.
FUSED_SHAPES = ("resnet18_stem", "resnet18_l1", "resnet18_l2_down", "resnet18_l3", "resnet18_l4",
                "densenet_growth", "vgg11_conv3")
# Pooling: (N, C, H, W, kernel, stride, padding).
MAXPOOL_SHAPES = {
    "alexnet_pool1": (128, 64, 55, 55, 3, 2, 0),
    "vgg11_pool2": (64, 128, 112, 112, 2, 2, 0),
    "googlenet_pool3": (128, 192, 56, 56, 3, 2, 1),
    "resnet18_pool": (128, 64, 112, 112, 3, 2, 1),
}
AVGPOOL_SHAPES = {
    "densenet_transition": (128, 128, 56, 56, 2, 2, 0),
    "googlenet_4e_3x3s1": (128, 528, 14, 14, 3, 1, 1),
}
ADAPTIVE_SHAPES = {  # (N, C, H, W, out)
    "resnet18_head": (256, 512, 7, 7, 1),
    "densenet_head": (256, 1024, 7, 7, 1),
    "vgg_head_7x7": (128, 512, 14, 14, 7),
}
PRECISIONS = ("fp32", "tf32", "bf16")
LAYOUTS = ("nchw", "nhwc")

# Target rows of issue 6: (label, section, precision or None, target, what the ratio is).
TARGETS = [
    ("conv2d forward, strict fp32", "conv_fwd", "fp32", 0.6),
    ("conv2d data grad, strict fp32", "conv_dgrad", "fp32", 0.5),
    ("conv2d weight grad, strict fp32", "conv_wgrad", "fp32", 0.4),
    ("conv2d forward, TF32", "conv_fwd", "tf32", 0.5),
    ("conv2d forward, bf16", "conv_fwd", "bf16", 0.5),
    ("conv2d forward, fp16", "conv_fwd", "fp16", 0.5),
    ("fused conv+BN+ReLU inference", "fused_eval", None, 1.15),
    ("fused conv+BN+ReLU training step", "fused_train", None, 1.0),
    ("max_pool2d forward with indices", "maxpool_fwd", None, 1.3),
    ("max_pool2d backward", "maxpool_bwd", None, 2.0),
    ("max_unpool2d", "maxunpool", None, 1.5),
    ("avg_pool2d, fraction of copy bandwidth", "avgpool_bw", None, 0.7),
    ("adaptive_avg_pool2d, fraction of copy bandwidth", "adaptive_bw", None, 0.7),
    ("training step ResNet-18 / VGG-11 (width 1/4), batch 64", "net_train", None, 0.6),
]


class Bench:
    def __init__(self, torch, args):
        self.torch = torch
        self.args = args
        self.cuda = not args.cpu_dry_run
        self.dev = "cuda" if self.cuda else "cpu"
        self.results = []
        # Precisions of the non-convolution sections (the CPU has no bf16 kernels).
        self.precisions = ("fp32", "bf16") if self.cuda else ("fp32",)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget_s
        if self.cuda:
            self.flush_buf = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")

    # -- timing ------------------------------------------------------------------
    def time_ms(self, fn):
        torch = self.torch
        if not self.cuda:  # dry run: the plumbing only
            fn()
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3, 1
        for _ in range(self.args.warmup):
            fn()
        torch.cuda.synchronize()
        reps = self.args.reps
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.flush_buf.fill_(1)
        s.record()
        fn()
        e.record()
        e.synchronize()
        one = s.elapsed_time(e)
        if one > 20.0:
            reps = max(10, min(reps, int(2000.0 / one)))
        times = []
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            self.flush_buf.fill_(i & 0x7F)  # a write of 256 MiB between timed calls: L2 cold
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        times = [a.elapsed_time(b) for a, b in zip(starts, ends)]
        return statistics.median(times), reps

    def record(self, section, name, layout, precision, impl, fn, **extra):
        ms, reps = self.time_ms(fn)
        row = dict(section=section, name=name, layout=layout, precision=precision, impl=impl,
                   median_ms=ms, reps=reps, **extra)
        self.results.append(row)
        if self.args.verbose:
            print(f"  {section:12s} {name:24s} {layout:5s} {precision:5s} {impl:7s} {ms:9.4f} ms",
                  flush=True)
        return ms

    def over_budget(self):
        """Past this section's deadline (its share of --budget-s, plus what earlier
        sections left unused)."""
        return time.monotonic() > self.deadline

    # -- helpers -------------------------------------------------------------------
    def set_precision(self, precision):
        torch = self.torch
        tf32 = precision == "tf32"
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        return {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
                "fp16": torch.float16}[precision]

    def fmt(self, t, layout):
        mf = self.torch.channels_last if layout == "nhwc" else self.torch.contiguous_format
        return t.contiguous(memory_format=mf)

    def randn(self, shape, dtype, layout=None):
        t = self.torch.randn(shape, device=self.dev, dtype=self.torch.float32).to(dtype)
        return self.fmt(t, layout) if layout else t

    def shape(self, s):
        """Batch size scaled down in a dry run."""
        return (1,) + tuple(s[1:]) if not self.cuda else s


def rel_err(a, b):
    """||a - b|| / ||b|| in float64 (0 for empty tensors)."""
    a, b = a.double(), b.double()
    n = b.norm().item()
    return (a - b).norm().item() / n if n > 0 else 0.0


def conv_out(h, k, s, p):
    return (h + 2 * p - k) // s + 1


def section_conv(b, names, precisions):
    torch, ops = b.torch, b.torch.ops.cnnext
    aten = torch.ops.aten
    for precision in precisions:
        dt = b.set_precision(precision)
        for layout in LAYOUTS:
            for name in names:
                if b.over_budget():
                    return
                N, C, H, W, O, k, s, p = b.shape(CONV_SHAPES[name])
                x = b.randn((N, C, H, W), dt, layout)
                w = b.fmt(b.randn((O, C, k, k), dt), layout)
                OH, OW = conv_out(H, k, s, p), conv_out(W, k, s, p)
                gy = b.randn((N, O, OH, OW), dt, layout)
                st, pd, dl = [s, s], [p, p], [1, 1]
                flops = 2 * N * O * OH * OW * C * k * k
                cases = {
                    "conv_fwd": (lambda: ops.conv2d(x, w, None, st, pd, dl, 1),
                                 lambda: torch.nn.functional.conv2d(x, w, None, s, p)),
                    "conv_dgrad": (lambda: ops.conv2d_input_backward(gy, w, list(x.shape), st, pd, dl, 1),
                                   lambda: aten.convolution_backward(gy, x, w, None, st, pd, dl, False,
                                                                     [0, 0], 1, [True, False, False])),
                    "conv_wgrad": (lambda: ops.conv2d_weight_backward(gy, x, list(w.shape), st, pd, dl, 1),
                                   lambda: aten.convolution_backward(gy, x, w, None, st, pd, dl, False,
                                                                     [0, 0], 1, [False, True, False])),
                }
                pick = {"conv_fwd": None, "conv_dgrad": 0, "conv_wgrad": 1}
                for section, (mine, stock) in cases.items():
                    if b.args.only and not re.search(b.args.only, section):
                        continue
                    if section != "conv_fwd" and precision not in ("fp32", "bf16"):
                        continue  # gradients: strict fp32 (the targets) and bf16
                    # Correct first: cnnext's result against stock's, ||a - b|| / ||b||.
                    ref = stock() if pick[section] is None else stock()[pick[section]]
                    err = rel_err(mine(), ref)
                    for impl, fn in (("cnnext", mine), ("torch", stock)):
                        b.record(section, name, layout, precision, impl, fn, gflop=flops / 1e9,
                                 rel_err_vs_stock=err)


def section_fused(b, names):
    torch, ops, F = b.torch, b.torch.ops.cnnext, b.torch.nn.functional
    cf = import_cnnext().functional
    for precision in b.precisions:
        dt = b.set_precision(precision)
        for layout in LAYOUTS:
            for name in names:
                if b.over_budget():
                    return
                N, C, H, W, O, k, s, p = b.shape(CONV_SHAPES[name])
                x = b.randn((N, C, H, W), dt, layout)
                w = b.fmt(b.randn((O, C, k, k), dt), layout)
                gamma, beta = b.randn((O,), dt), b.randn((O,), dt)
                # Running statistics in the input's dtype (what conv_bn_relu2d takes).
                rm, rv = b.randn((O,), dt), (torch.rand(O, device=b.dev) + 0.5).to(dt)
                st, pd, dl = [s, s], [p, p], [1, 1]

                def mine_eval():
                    return ops.conv_bn_relu2d_eval(x, w, None, gamma, beta, rm, rv, 1e-5, st, pd, dl, 1, True)

                def stock_eval():
                    y = F.conv2d(x, w, None, s, p)
                    return F.relu(F.batch_norm(y, rm, rv, gamma, beta, False, 0.1, 1e-5))

                xg = x.detach().requires_grad_()
                wg, gg, bg = (t.detach().requires_grad_() for t in (w, gamma, beta))
                rm2, rv2 = rm.clone(), rv.clone()
                OH, OW = conv_out(H, k, s, p), conv_out(W, k, s, p)
                gout = b.randn((N, O, OH, OW), dt, layout)

                def mine_train():
                    y = cf.conv_bn_relu2d(xg, wg, None, gg, bg, rm2, rv2, True, 0.1, 1e-5, s, p)
                    return torch.autograd.grad(y, (xg, wg, gg, bg), gout)

                def stock_train():
                    y = F.relu(F.batch_norm(F.conv2d(xg, wg, None, s, p), rm2, rv2, gg, bg,
                                            True, 0.1, 1e-5))
                    return torch.autograd.grad(y, (xg, wg, gg, bg), gout)

                for section, mine, stock in (("fused_eval", mine_eval, stock_eval),
                                             ("fused_train", mine_train, stock_train)):
                    if b.args.only and not re.search(b.args.only, section):
                        continue
                    with torch.no_grad() if section == "fused_eval" else _null():
                        extra = {}
                        if section == "fused_eval":
                            extra["rel_err_vs_stock"] = rel_err(mine(), stock())
                        for impl, fn in (("cnnext", mine), ("torch", stock)):
                            b.record(section, name, layout, precision, impl, fn, **extra)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def section_pool(b):
    torch, ops, F = b.torch, b.torch.ops.cnnext, b.torch.nn.functional
    aten = torch.ops.aten
    for precision in b.precisions:
        dt = b.set_precision(precision)
        for layout in LAYOUTS:
            for name, shape in MAXPOOL_SHAPES.items():
                if b.over_budget():
                    return
                N, C, H, W, k, s, p = b.shape(shape)
                x = b.randn((N, C, H, W), dt, layout)
                K, S, P, D = [k, k], [s, s], [p, p], [1, 1]
                y, idx = ops.max_pool2d_with_indices(x, K, S, P, D, False)
                ys, idxs = F.max_pool2d(x, k, s, p, return_indices=True)
                gy = b.fmt(torch.randn_like(y), layout)
                cases = {
                    "maxpool_fwd": (lambda: ops.max_pool2d_with_indices(x, K, S, P, D, False),
                                    lambda: F.max_pool2d(x, k, s, p, return_indices=True)),
                    "maxpool_bwd": (lambda: ops.max_pool2d_with_indices_backward(gy, idx, list(x.shape), K, S,
                                                                                 P, D, False),
                                    lambda: aten.max_pool2d_with_indices_backward(gy, x, K, S, P, D, False, idxs)),
                    "maxunpool": (lambda: ops.max_unpool2d(y, idx, [H, W]),
                                  lambda: F.max_unpool2d(ys, idxs, k, s, p, output_size=[H, W])),
                }
                for section, (mine, stock) in cases.items():
                    if b.args.only and not re.search(b.args.only, section):
                        continue
                    for impl, fn in (("cnnext", mine), ("torch", stock)):
                        b.record(section, name, layout, precision, impl, fn)
            # Average pooling: bandwidth, as a fraction of a device-to-device copy's.
            for section, shapes in (("avgpool_bw", AVGPOOL_SHAPES), ("adaptive_bw", ADAPTIVE_SHAPES)):
                if b.args.only and not re.search(b.args.only, section):
                    continue
                for name, shape in shapes.items():
                    if b.over_budget():
                        return
                    if section == "avgpool_bw":
                        N, C, H, W, k, s, p = b.shape(shape)
                        x = b.randn((N, C, H, W), dt, layout)
                        mine = lambda: ops.avg_pool2d(x, [k, k], [s, s], [p, p], False, True, None)  # noqa: E731
                        stock = lambda: F.avg_pool2d(x, k, s, p)  # noqa: E731
                    else:
                        N, C, H, W, o = b.shape(shape)
                        x = b.randn((N, C, H, W), dt, layout)
                        mine = lambda: ops.adaptive_avg_pool2d(x, [o, o])  # noqa: E731
                        stock = lambda: F.adaptive_avg_pool2d(x, o)  # noqa: E731
                    nbytes = (x.numel() + mine().numel()) * x.element_size()
                    for impl, fn in (("cnnext", mine), ("torch", stock)):
                        b.record(section, name, layout, precision, impl, fn, bytes=nbytes)


def section_copy(b):
    """Device-to-device copy bandwidth (bytes read + written per second): the yardstick
    of the average-pooling rows."""
    torch = b.torch
    n = (1 << 28) if b.cuda else (1 << 20)  # 1 GiB of float32 on the GPU
    src = torch.empty(n, dtype=torch.float32, device=b.dev).fill_(1.0)
    dst = torch.empty_like(src)
    ms = b.record("copy", "d2d_copy", "-", "fp32", "torch", lambda: dst.copy_(src), bytes=2 * n * 4)
    return 2 * n * 4 / (ms * 1e-3)


def section_nets(b):
    torch = b.torch
    MODELS = import_cnnext().models.MODELS
    builds = {"resnet18": {}, "vgg11": {"width_divisor": 4}}
    for precision in b.precisions:
        dt = b.set_precision(precision)
        for name, kw in builds.items():
            if b.over_budget():
                return
            spec = MODELS[name]
            batch = 64 if b.cuda else 2
            x = torch.randn(spec.input_shape(batch=batch), device=b.dev).to(dt)
            target = torch.randint(0, 10, (batch,), device=b.dev)
            for impl in ("cnnext", "torch"):
                torch.manual_seed(0)
                net = spec.build(backend=impl, **kw).to(b.dev, dt).train()
                opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
                loss_fn = torch.nn.CrossEntropyLoss()

                def step(net=net, opt=opt):
                    opt.zero_grad(set_to_none=True)
                    loss = loss_fn(net(x).float(), target)
                    loss.backward()
                    opt.step()
                    return loss.detach()

                b.record("net_train", name + (" (width 1/4)" if kw else ""), "nchw", precision, impl, step,
                         batch=batch)


def ratios(results, copy_bw):
    """{(section, name, layout, precision): ratio}: stock time / cnnext time; for the
    bandwidth sections cnnext's bandwidth / the copy's."""
    by = {}
    for r in results:
        by[(r["section"], r["name"], r["layout"], r["precision"], r["impl"])] = r
    out = {}
    for (sec, name, layout, prec, impl), r in by.items():
        if impl != "cnnext":
            continue
        if sec.endswith("_bw"):
            out[(sec, name, layout, prec)] = r["bytes"] / (r["median_ms"] * 1e-3) / copy_bw
        else:
            stock = by.get((sec, name, layout, prec, "torch"))
            if stock:
                out[(sec, name, layout, prec)] = stock["median_ms"] / r["median_ms"]
    return out


def geomean(v):
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else float("nan")


def table(rat, results=()):
    worst = {}
    for r in results:
        if "rel_err_vs_stock" in r:
            k = (r["section"], r["precision"])
            worst[k] = max(worst.get(k, 0.0), r["rel_err_vs_stock"])
    errs = [f"{s} {p}: {e:.1e}" for (s, p), e in sorted(worst.items())]
    lines = ["largest ||cnnext - stock|| / ||stock|| per section and precision: " + "; ".join(errs), ""]
    lines += ["| target | measured: geomean (min .. max, n) | target | met |", "|---|---|---|---|"]
    for label, sec, prec, target in TARGETS:
        v = [r for (s, _, _, p), r in rat.items() if s == sec and (prec is None or p == prec)]
        if not v:
            continue
        g = geomean(v)
        lines.append(f"| {label} | {g:.2f} ({min(v):.2f} .. {max(v):.2f}, {len(v)}) | >= {target} | "
                     f"{'yes' if g >= target else 'no'} |")
    lines += ["", "| section | shape | layout | precision | ratio |", "|---|---|---|---|---|"]
    for (sec, name, layout, prec), r in sorted(rat.items()):
        lines.append(f"| {sec} | {name} | {layout} | {prec} | {r:.2f} |")
    return "\n".join(lines)


def import_cnnext():
    """cnnext as installed, else the checkout this script sits in (built in place)."""
    try:
        import cnnext
    except ImportError:
        sys.path.insert(0, REPO)
        import cnnext
    return cnnext


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few shapes per section")
    ap.add_argument("--only", default="", help="regex on section names (conv_fwd, conv_dgrad, ...)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--fp16", action="store_true", help="also conv2d forward in fp16")
    ap.add_argument("--budget-s", type=float, default=450.0, help="stop starting new sections after this")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu-<device>.json)")
    ap.add_argument("--require-gpu", action="store_true", help="exit 1 (not 0) when no GPU is present")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="run every section once on the CPU at batch 1 (checks the script, measures nothing)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)

    import torch
    if not args.cpu_dry_run:
        reason = None
        if not torch.cuda.is_available():
            reason = "no CUDA device is available (torch.cuda.is_available() is False)"
        elif not import_cnnext().build_info()["cuda"]:
            reason = "this cnnext build has no CUDA kernels (rebuild with CUDA, see README)"
        if reason:
            print(f"bench_gpu: {reason}; nothing was measured.")
            return 1 if args.require_gpu else 0
    import_cnnext()  # registers torch.ops.cnnext

    if args.cpu_dry_run:
        torch.set_num_threads(1)
        args.reps, args.warmup = 1, 0
    torch.backends.cudnn.benchmark = True
    b = Bench(torch, args)
    names = QUICK_CONV if args.quick or args.cpu_dry_run else tuple(CONV_SHAPES)
    precisions = PRECISIONS + (("fp16",) if args.fp16 else ())
    if args.cpu_dry_run:  # cnnext's CPU backend: float32 and float64 only
        precisions = ("fp32",)
    copy_bw = section_copy(b)
    # (key, share of the time budget, run)
    sections = [("conv", 0.5, lambda: section_conv(b, names, precisions)),
                ("fused", 0.65, lambda: section_fused(b, FUSED_SHAPES[:2] if args.quick or args.cpu_dry_run
                                                else FUSED_SHAPES)),
                ("pool", 0.8, lambda: section_pool(b)),
                ("net", 1.0, lambda: section_nets(b))]
    skipped = []
    for key, until, run in sections:
        if args.only and not re.search(args.only, {"conv": "conv_fwd conv_dgrad conv_wgrad",
                                                    "fused": "fused_eval fused_train",
                                                    "pool": "maxpool_fwd maxpool_bwd maxunpool avgpool_bw adaptive_bw",
                                                    "net": "net_train"}[key]):
            continue
        b.deadline = b.t0 + until * args.budget_s
        print(f"bench_gpu: {key} ...", flush=True)
        n = len(b.results)
        run()
        if b.over_budget():
            skipped.append(key)
            print(f"bench_gpu: section {key} stopped at its time budget after {len(b.results) - n} "
                  "measurements (raise --budget-s for all shapes)", flush=True)

    rat = ratios(b.results, copy_bw)
    md = table(rat, b.results)
    if b.cuda:
        dev_name = torch.cuda.get_device_name()
        info = dict(device=dev_name, capability=list(torch.cuda.get_device_capability()),
                    torch=torch.__version__, cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    else:
        dev_name = "cpu-dry-run"
        info = dict(device=dev_name, torch=torch.__version__, machine=platform.machine())
    info.update(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                copy_bandwidth_gbs=copy_bw / 1e9, reps=args.reps, args=vars(args),
                sections_cut_short=skipped,
                elapsed_s=time.monotonic() - b.t0)
    out = args.out or os.path.join(REPO, "benchmarks", "results",
                                   "gpu-" + re.sub(r"[^A-Za-z0-9]+", "-", dev_name).strip("-").lower() + ".json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(info=info, results=b.results,
                       ratios=[dict(section=s, name=n, layout=l, precision=p, ratio=r)
                               for (s, n, l, p), r in sorted(rat.items())]), f, indent=1)
    print(f"\n{info['device']}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
          f"copy {copy_bw / 1e9:.0f} GB/s; {time.monotonic() - b.t0:.0f} s\n")
    if not b.cuda:
        print("CPU DRY RUN (batch 1, one untimed-quality call each): these numbers mean nothing.\n")
    print(md)
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
