"""Summarises a pytest-benchmark run and writes the README's ratio table.

    python -m pytest benchmarks ... --benchmark-json=benchmarks/results/raw/cpu.json
    python benchmarks/report.py benchmarks/results/raw/cpu.json \\
        --summary benchmarks/results/cpu-summary.json --readme README.md
    python benchmarks/report.py benchmarks/results/cpu-summary.json --readme README.md

The input is either pytest-benchmark's raw JSON (tens of MB: every round's time; it
stays out of git, benchmarks/results/raw/ is ignored) or a summary this script wrote
(a few kB, committed: per benchmark group the cnnext and torch median times and their
ratio, with the date, machine and torch version of the run). --summary writes the
summary of a raw run; the README table renders the same from either file. Each
benchmark group holds one cnnext and one torch run of the same work; the ratio is
cnnext's median time over torch's (below 1: cnnext is faster). With --readme the table
replaces the text between the README's bench markers.
"""
import argparse
import json
import platform
import re
from collections import defaultdict

SUMMARY_FORMAT = "cnnext-benchmark-summary/1"


def summarize(raw):
    """The summary (a dict) of pytest-benchmark's raw JSON (a dict)."""
    groups = defaultdict(dict)
    for b in raw["benchmarks"]:
        params = b.get("params") or {}
        impl = params.get("impl", params.get("backend"))  # the bf16 autocast step names it backend
        if impl is None:
            continue
        # The bf16 benchmarks compare like with like ("cnnext-bf16" against "torch-bf16");
        # their "torch-fp32" and Winograd's "cnnext_gemm" are kept beside the pair.
        impl = {"cnnext-bf16": "cnnext", "torch-bf16": "torch"}.get(impl, impl).replace("-", "_")
        groups[b["group"]][impl] = b["stats"]["median"]
    machine = raw.get("machine_info", {})
    cpu = machine.get("cpu", {})
    torch_version = machine.get("torch")
    if torch_version is None:  # runs before benchmarks/conftest.py recorded it
        torch_version = __import__("torch").__version__
    benchmarks = {}
    for name in sorted(groups):
        g = groups[name]
        entry = {impl + "_ms": g[impl] * 1e3 for impl in sorted(g)}
        if "cnnext" in g and "torch" in g:
            entry["ratio"] = g["cnnext"] / g["torch"]
        benchmarks[name] = entry
    return {
        "format": SUMMARY_FORMAT,
        "what": "median time per benchmark (ms) of cnnext and stock torch, ratio = cnnext / torch; "
                "written by benchmarks/report.py from a pytest-benchmark run",
        "datetime": raw.get("datetime", ""),
        "commit": raw.get("commit_info", {}).get("id"),
        "commit_dirty": raw.get("commit_info", {}).get("dirty"),
        "pytest_benchmark": raw.get("version"),
        "machine": {
            "cpu": cpu.get("brand_raw", machine.get("processor") or platform.processor()),
            "cores": cpu.get("count"),
            "flags_avx512": sorted(f for f in cpu.get("flags", []) if f.startswith("avx512")),
            "system": f"{machine.get('system', '')} {machine.get('release', '')}".strip(),
            "python": machine.get("python_version"),
        },
        "torch": torch_version,
        "cnnext_build": machine.get("cnnext_build"),
        "cnnext_cpu_isa": machine.get("cnnext_cpu_isa"),
        "benchmarks": benchmarks,
    }


def load(path):
    """The summary of path, which holds either a raw pytest-benchmark run or a summary."""
    with open(path) as f:
        data = json.load(f)
    if data.get("format") == SUMMARY_FORMAT:
        return data
    if "benchmarks" in data and isinstance(data["benchmarks"], list):
        return summarize(data)
    raise SystemExit(f"{path}: neither a pytest-benchmark JSON nor a {SUMMARY_FORMAT} summary")


def table(summary):
    machine = summary["machine"]
    lines = [
        f"Measured {summary['datetime'][:10]} on {machine['cpu']}, {machine['cores'] or '?'} cores"
        + (f", cnnext's kernels at {summary['cnnext_cpu_isa']}" if summary.get("cnnext_cpu_isa") else "")
        + f", torch {summary['torch']}; median times, ratio = cnnext / torch (below 1.00: cnnext faster).",
        "",
        "| benchmark | cnnext (ms) | torch (ms) | ratio | others: time / torch's |",
        "|---|---:|---:|---:|---|",
    ]
    for name, b in sorted(summary["benchmarks"].items()):
        if "ratio" in b:
            others = ", ".join(f"{k[:-3]} {b[k] / b['torch_ms']:.2f}" for k in sorted(b)
                               if k.endswith("_ms") and k not in ("cnnext_ms", "torch_ms"))
            lines.append(f"| {name} | {b['cnnext_ms']:.2f} | {b['torch_ms']:.2f} | {b['ratio']:.2f} | {others} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", help="a pytest-benchmark JSON file or a summary written by --summary")
    ap.add_argument("--summary", metavar="OUT", help="write the summary (medians, ratios, machine) to OUT")
    ap.add_argument("--readme", help="README whose bench section to replace")
    ap.add_argument("--section", default="bench",
                    help="the README section, between <!-- SECTION:start --> and <!-- SECTION:end --> "
                         "(default bench; bench-avx2 holds a run on a CPU without AVX-512)")
    args = ap.parse_args()
    summary = load(args.json)
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(summary, f, indent=1, sort_keys=False)
            f.write("\n")
    text = table(summary)
    print(text)
    if args.readme:
        with open(args.readme) as f:
            readme = f.read()
        sec = re.escape(args.section)
        new, n = re.subn(
            rf"(<!-- {sec}:start -->\n).*?(\n<!-- {sec}:end -->)", lambda m: m.group(1) + text + m.group(2), readme,
            flags=re.S,
        )
        if n != 1:
            raise SystemExit(f"README has no <!-- {args.section}:start --> ... <!-- {args.section}:end --> section")
        with open(args.readme, "w") as f:
            f.write(new)


if __name__ == "__main__":
    main()
