"""Turns a pytest-benchmark JSON file into the README's ratio table.

    python benchmarks/report.py benchmarks/results/cpu.json [--readme README.md]

Each benchmark group holds one cnnext and one torch run of the same work; the ratio
is cnnext's median time over torch's (below 1: cnnext is faster). With --readme the
table replaces the text between the README's bench markers.
"""
import argparse
import json
import platform
import re
from collections import defaultdict


def load(path):
    with open(path) as f:
        data = json.load(f)
    groups = defaultdict(dict)
    for b in data["benchmarks"]:
        groups[b["group"]][b["params"]["impl"]] = b["stats"]["median"]
    return data, groups


def table(data, groups):
    machine = data.get("machine_info", {})
    lines = [
        f"Measured {data.get('datetime', '')[:10]} on {machine.get('cpu', {}).get('brand_raw', platform.processor())}, "
        f"{machine.get('cpu', {}).get('count', '?')} cores, torch {__import__('torch').__version__}; "
        "median times, ratio = cnnext / torch (below 1.00: cnnext faster).",
        "",
        "| benchmark | cnnext (ms) | torch (ms) | ratio |",
        "|---|---:|---:|---:|",
    ]
    for name in sorted(groups):
        g = groups[name]
        if "cnnext" in g and "torch" in g:
            lines.append(f"| {name} | {g['cnnext'] * 1e3:.2f} | {g['torch'] * 1e3:.2f} | {g['cnnext'] / g['torch']:.2f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--readme", help="README whose bench section to replace")
    args = ap.parse_args()
    text = table(*load(args.json))
    print(text)
    if args.readme:
        with open(args.readme) as f:
            readme = f.read()
        new, n = re.subn(
            r"(<!-- bench:start -->\n).*?(\n<!-- bench:end -->)", lambda m: m.group(1) + text + m.group(2), readme, flags=re.S
        )
        if n != 1:
            raise SystemExit("README has no <!-- bench:start --> ... <!-- bench:end --> section")
        with open(args.readme, "w") as f:
            f.write(new)


if __name__ == "__main__":
    main()
