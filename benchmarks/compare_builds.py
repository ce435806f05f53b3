"""Two builds of cnnext side by side: is a change faster or slower, benchmark by benchmark?

    python benchmarks/compare_builds.py OLD_ROOT NEW_ROOT [--rounds 7] [-k EXPR] [FILES ...]

OLD_ROOT and NEW_ROOT are checkouts of the repository, each with its extension built in
place (`python setup.py build_ext --inplace`; e.g. a `git worktree` of the old commit).
Two worker processes, one per build, collect the same benchmark files (default: the
pytest-benchmark suite of this folder, less the bfloat16 and Winograd files, which need
builds that have those features) with pytest-benchmark's `benchmark` fixture replaced by
one that records each benchmarked call instead of timing it. The driver then asks the
two workers in turn, A B, B A, ..., to time each recorded call (the caches flushed
before each timing, as benchmarks/conftest.py does), for --rounds rounds in a fresh
shuffled order each round. Each benchmark's figure is the median over rounds of the
paired ratio new / old: both builds are timed seconds apart, so the machine's drift
cancels (this is what `pytest benchmarks` run twice, minutes apart, does not give on a
shared machine). Only the cnnext side of each benchmark is timed unless --impl says
otherwise: the torch side runs the same code in both workers.
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_FILES = [
    "test_conv2d_bench.py",
    "test_conv_transpose2d_bench.py",
    "test_conv_bn_relu_bench.py",
    "test_max_pool2d_bench.py",
    "test_avg_pool2d_bench.py",
    "test_models_bench.py",
]


# ----------------------------------------------------------------------------- worker
def _record_calls(calls):
    """Makes pytest-benchmark's fixture (run with --benchmark-disable, so that it calls each
    benchmarked function once, for the test's own checks) keep every call for timing
    later, with the grad mode it was made in (forward benchmarks call under no_grad)."""
    import torch
    from pytest_benchmark.fixture import BenchmarkFixture

    def keep(fixture, fn, args, kwargs):
        grad_mode = torch.is_grad_enabled()

        def call():
            with torch.set_grad_enabled(grad_mode):
                return fn(*args, **kwargs)

        calls.append((fixture.name, fixture.group, call))

    call_, pedantic_ = BenchmarkFixture.__call__, BenchmarkFixture.pedantic

    def __call__(self, fn, *args, **kwargs):
        keep(self, fn, args, kwargs)
        return call_(self, fn, *args, **kwargs)

    def pedantic(self, fn, args=(), kwargs=None, setup=None, **rest):
        if setup is not None:
            raise NotImplementedError("compare_builds: pedantic(setup=...) is not supported")
        keep(self, fn, args, kwargs or {})
        return pedantic_(self, fn, args=args, kwargs=kwargs, **rest)

    BenchmarkFixture.__call__, BenchmarkFixture.pedantic = __call__, pedantic


def _flush():
    import torch

    buf = torch.empty(16 * 1024 * 1024, dtype=torch.float32)
    buf.fill_(1.0)
    float(buf.sum())


def _time(call, budget_s):
    """Seconds per call: warm once, then as many calls as fit budget_s (at least 1, at most
    50), after a cache flush; the median of them."""
    call()
    _flush()
    times = []
    start = time.perf_counter()
    while len(times) < 50 and (not times or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker(root, files, kexpr, budget_s, threads):
    sys.path.insert(0, root)
    if threads:
        import torch

        torch.set_num_threads(threads)
    import cnnext  # noqa: F401  (this build, before the benchmarks' conftest adds another path)

    if not os.path.abspath(cnnext.__file__).startswith(os.path.abspath(root) + os.sep):
        raise SystemExit(f"compare_builds: cnnext came from {cnnext.__file__}, not from {root}")
    import pytest

    recorded = []
    _record_calls(recorded)
    args = [os.path.join(HERE, f) for f in files] + ["-q", "--benchmark-disable", "-p", "no:cacheprovider",
                                                     "-x", "--no-header", "-o", "addopts="]
    if kexpr:
        args += ["-k", kexpr]
    out = sys.stdout
    sys.stdout = sys.stderr  # pytest's report must not mix with the protocol
    rc = pytest.main(args)
    sys.stdout = out
    if rc not in (0, 5):
        raise SystemExit(f"compare_builds: the benchmark files failed under {root} (pytest exit {rc})")
    calls = {name: (call, group) for name, group, call in recorded}
    print(json.dumps({"ready": {n: g for n, (c, g) in calls.items()}, "cnnext": cnnext.__file__}), flush=True)
    for line in sys.stdin:
        name = line.strip()
        if not name:
            break
        print(json.dumps({"t": _time(calls[name][0], budget_s)}), flush=True)


# ----------------------------------------------------------------------------- driver
def _start(root, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", root, *args.files, "--budget", str(args.budget),
           "--threads", str(args.threads)]
    if args.k:
        cmd += ["-k", args.k]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root)
    return p


def _ask(p, name):
    p.stdin.write(name + "\n")
    p.stdin.flush()
    return json.loads(p.stdout.readline())["t"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old")
    ap.add_argument("new", nargs="?")
    ap.add_argument("files", nargs="*")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--budget", type=float, default=0.25, help="seconds of calls per timing")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads in both workers (default: torch's own); 1 is steadier on a loaded machine")
    ap.add_argument("-k", default=None, help="pytest -k expression over the benchmarks")
    ap.add_argument("--impl", default="cnnext", choices=["cnnext", "torch", "both"])
    ap.add_argument("--json", default=None, help="write the per-benchmark results here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.old, ([args.new] if args.new else []) + args.files or DEFAULT_FILES, args.k, args.budget,
                      args.threads)
    if args.new is None:
        ap.error("give the OLD and NEW checkouts")
    args.files = args.files or DEFAULT_FILES
    if args.impl != "both":
        args.k = f"({args.k}) and {args.impl}" if args.k else args.impl
    old, new = _start(args.old, args), _start(args.new, args)
    ready_old, ready_new = json.loads(old.stdout.readline()), json.loads(new.stdout.readline())
    names = sorted(set(ready_old["ready"]) & set(ready_new["ready"]))
    only = sorted(set(ready_old["ready"]) ^ set(ready_new["ready"]))
    print(f"old: {ready_old['cnnext']}\nnew: {ready_new['cnnext']}\n{len(names)} benchmarks in both"
          + (f"; {len(only)} in one build only, skipped" if only else ""), flush=True)
    ratios = {n: [] for n in names}
    times = {n: ([], []) for n in names}
    rng = random.Random(0)
    for r in range(args.rounds):
        order = names[:]
        rng.shuffle(order)
        for i, n in enumerate(order):
            pair = [(0, old), (1, new)] if (i + r) % 2 == 0 else [(1, new), (0, old)]
            t = [None, None]
            for k, p in pair:
                t[k] = _ask(p, n)
            times[n][0].append(t[0])
            times[n][1].append(t[1])
            ratios[n].append(t[1] / t[0])
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    for p in (old, new):
        p.stdin.write("\n")
        p.stdin.flush()
        p.wait()
    rows = []
    for n in names:
        rows.append({"benchmark": n, "group": ready_new["ready"][n],
                     "old_ms": 1e3 * statistics.median(times[n][0]), "new_ms": 1e3 * statistics.median(times[n][1]),
                     "ratio": statistics.median(ratios[n]), "ratio_min": min(ratios[n]), "ratio_max": max(ratios[n])})
    rows.sort(key=lambda row: -row["ratio"])
    print(f"\n{'new/old':>8} {'(min-max)':>13} {'old ms':>9} {'new ms':>9}  benchmark")
    for row in rows:
        print(f"{row['ratio']:8.3f} {row['ratio_min']:6.2f}-{row['ratio_max']:<6.2f} {row['old_ms']:9.3f} "
              f"{row['new_ms']:9.3f}  {row['benchmark']}")
    geo = statistics.geometric_mean([row["ratio"] for row in rows]) if rows else float("nan")
    print(f"\ngeomean new/old over {len(rows)} benchmarks: {geo:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"old": args.old, "new": args.new, "rounds": args.rounds, "geomean": geo, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
