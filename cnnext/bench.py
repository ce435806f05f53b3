"""``python -m cnnext bench``: cnnext against stock torch on this machine, in one command.

Quick mode (the default, about a minute on a 2-core CPU): the 3x3 stride-1 convolutions
of the classic networks (forward, batch 8) and ResNet-18 (NCHW, and channels_last on both
sides) / VGG-11 forwards in evaluation,
each timed as interleaved pairs (one cnnext call, one stock call, repeated) so that a
machine's drift hits both alike; the medians are reported. Full mode (``--full``) runs
the pytest-benchmark suite of ``benchmarks/`` (a checkout is needed) and reports its
medians. Either way: a progress bar (tqdm), a table of cnnext and stock times and their
ratio (cnnext / stock: below 1 is faster) per layer and per network, and
``bench.json`` and ``bench.png`` (a bar chart of the ratios, matplotlib) in ``--out``.
"""
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

# name: (N, C, H, W, out_channels, kernel, stride, padding): the 3x3 stride-1 layers.
QUICK_LAYERS = {
    "conv3x3 64x56²": (8, 64, 56, 56, 64, 3, 1, 1),
    "conv3x3 128x28²": (8, 128, 28, 28, 128, 3, 1, 1),
    "conv3x3 256x14²": (8, 256, 14, 14, 256, 3, 1, 1),
    "conv3x3 512x7²": (8, 512, 7, 7, 512, 3, 1, 1),
    "conv3x3 256x56²": (8, 256, 56, 56, 256, 3, 1, 1),
}
# name: (builder name, batch, input size[, memory format of model and input, both sides])
QUICK_NETWORKS = {
    "resnet18 eval 224² b8": ("resnet18", 8, 224),
    "resnet18 eval 224² b8 channels_last": ("resnet18", 8, 224, torch.channels_last),
    "vgg11 eval 96² b4": ("vgg11", 4, 96),
}
# The same cases at toy sizes, for tests (--tiny).
TINY_LAYERS = {
    "conv3x3 16x12²": (2, 16, 12, 12, 16, 3, 1, 1),
    "conv3x3 32x6²": (2, 32, 6, 6, 32, 3, 1, 1),
}
TINY_NETWORKS = {"lenet eval 32² b2": ("lenet", 2, 32),
                 "lenet eval 32² b2 channels_last": ("lenet", 2, 32, torch.channels_last)}


def _layer_fns(shape):
    import cnnext

    n, c, h, w, o, k, s, p = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=g)
    wt = torch.randn(o, c, k, k, generator=g) * math.sqrt(2.0 / (c * k * k))
    b = torch.randn(o, generator=g)
    return (lambda: cnnext.functional.conv2d(x, wt, b, s, p)), (lambda: F.conv2d(x, wt, b, s, p))


def _network_fns(spec):
    from cnnext import models

    name, batch, size = spec[:3]
    fmt = spec[3] if len(spec) > 3 else torch.contiguous_format
    build = getattr(models, name)
    torch.manual_seed(0)
    ref = build(in_channels=3, backend="torch").eval()
    net = build(in_channels=3, backend="cnnext").eval()
    net.load_state_dict(ref.state_dict())
    ref, net = ref.to(memory_format=fmt), net.to(memory_format=fmt)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    return (lambda: net(x)), (lambda: ref(x))


def _time(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_pair(ours, stock, repeats, warmup=2):
    """Median seconds of `ours` and `stock`, called alternately `repeats` times each
    (after `warmup` calls of each), under torch.no_grad."""
    with torch.no_grad():
        for _ in range(warmup):
            ours()
            stock()
        a, b = [], []
        for r in range(repeats):
            # Alternate which goes first, so neither always inherits the other's caches.
            if r % 2 == 0:
                a.append(_time(ours))
                b.append(_time(stock))
            else:
                b.append(_time(stock))
                a.append(_time(ours))
    return statistics.median(a), statistics.median(b)


def _row(name, kind, ours_s, stock_s):
    return {"name": name, "kind": kind, "cnnext_ms": ours_s * 1e3, "stock_ms": stock_s * 1e3,
            "ratio": ours_s / stock_s}


def run_quick(repeats=15, tiny=False, progress=True):
    """Rows of the quick mode: one per layer and per network."""
    from tqdm import tqdm

    layers = TINY_LAYERS if tiny else QUICK_LAYERS
    nets = TINY_NETWORKS if tiny else QUICK_NETWORKS
    cases = [(n, "layer", s) for n, s in layers.items()] + [(n, "network", s) for n, s in nets.items()]
    rows = []
    for name, kind, spec in tqdm(cases, desc="cnnext bench", unit="case", disable=not progress, file=sys.stderr):
        ours, stock = _layer_fns(spec) if kind == "layer" else _network_fns(spec)
        rows.append(_row(name, kind, *measure_pair(ours, stock, repeats)))
    return rows


class _Progress:
    """pytest plugin: a tqdm bar over the collected benchmarks."""

    def __init__(self, enabled):
        self.enabled = enabled
        self.bar = None

    def pytest_collection_finish(self, session):
        from tqdm import tqdm

        self.bar = tqdm(total=len(session.items), desc="cnnext bench --full", unit="bench",
                        disable=not self.enabled, file=sys.stderr)

    def pytest_runtest_logreport(self, report):
        if report.when == "call" and self.bar is not None:
            self.bar.update(1)

    def pytest_sessionfinish(self, session):
        if self.bar is not None:
            self.bar.close()


def run_full(out_dir, bench_dir=None, extra_args=(), progress=True):
    """Runs the pytest-benchmark suite of benchmarks/ and returns its rows."""
    import pytest

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench_dir = bench_dir or os.path.join(root, "benchmarks")
    if not os.path.isdir(bench_dir):
        raise FileNotFoundError(f"--full needs the benchmarks/ folder of a cnnext checkout; {bench_dir} does not exist")
    raw_path = os.path.join(out_dir, "bench-raw.json")
    code = pytest.main([bench_dir, "-q", "-p", "no:cacheprovider", "--benchmark-only",
                        f"--benchmark-json={raw_path}", *extra_args], plugins=[_Progress(progress)])
    if code not in (0, pytest.ExitCode.OK):
        raise RuntimeError(f"the benchmark suite failed (pytest exit code {int(code)})")
    with open(raw_path) as f:
        raw = json.load(f)
    groups = {}
    for b in raw["benchmarks"]:
        groups.setdefault(b["group"], {})[b["params"]["impl"]] = b["stats"]["median"]
    rows = []
    for name in sorted(groups):
        g = groups[name]
        if "cnnext" in g and "torch" in g:
            kind = "network" if ("network" in name or "model" in name) else "layer"
            rows.append(_row(name, kind, g["cnnext"], g["torch"]))
    return rows


def geomean(values):
    values = [v for v in values if v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def format_table(rows):
    width = max([len("case")] + [len(r["name"]) for r in rows])
    lines = [f"{'case':<{width}}  {'kind':<7}  {'cnnext ms':>10}  {'stock ms':>10}  {'ratio':>6}"]
    for r in rows:
        lines.append(f"{r['name']:<{width}}  {r['kind']:<7}  {r['cnnext_ms']:>10.3f}  {r['stock_ms']:>10.3f}  "
                     f"{r['ratio']:>6.2f}")
    for kind in ("layer", "network"):
        sel = [r["ratio"] for r in rows if r["kind"] == kind]
        if sel:
            lines.append(f"geomean ratio, {kind}s: {geomean(sel):.2f}")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = Figure(figsize=(max(6.0, 0.5 * len(rows) + 2), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = ["tab:blue" if r["kind"] == "layer" else "tab:orange" for r in rows]
    ax.bar(range(len(rows)), [r["ratio"] for r in rows], color=colors)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["name"] for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("cnnext time / stock time (below 1: faster)")
    ax.set_title("cnnext vs stock torch (medians; blue: layers, orange: networks)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(args):
    out = args.out
    os.makedirs(out, exist_ok=True)
    progress = not args.no_progress
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.full:
        rows = run_full(out, progress=progress)
        mode = "full"
    else:
        rows = run_quick(repeats=args.repeats, tiny=args.tiny, progress=progress)
        mode = "quick-tiny" if args.tiny else "quick"
    import cnnext

    result = {
        "format": "cnnext-bench/1",
        "mode": mode,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "threads": torch.get_num_threads()},
        "torch": torch.__version__,
        "cnnext": cnnext.__version__,
        "repeats": None if args.full else args.repeats,
        "rows": rows,
        "geomean_ratio": {k: geomean([r["ratio"] for r in rows if r["kind"] == k]) for k in ("layer", "network")},
    }
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(rows, os.path.join(out, "bench.png"))
    print(format_table(rows))
    print(f"\nwrote {os.path.join(out, 'bench.json')} and {os.path.join(out, 'bench.png')}")
    return 0


def add_parser(sub):
    p = sub.add_parser("bench", help="time cnnext against stock torch: a table, bench.json and a bar chart")
    p.add_argument("--full", action="store_true", help="run the benchmarks/ suite (pytest-benchmark) instead of "
                                                      "the quick set")
    p.add_argument("--out", default="bench-results", help="folder for bench.json and bench.png (default bench-results)")
    p.add_argument("--repeats", type=int, default=15, help="interleaved calls per case in quick mode (default 15)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--tiny", action="store_true", help="toy sizes (a smoke test of the command)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p
