"""benchmarks/report.py: the summary of a pytest-benchmark run (ratios, the instruction-set
level cnnext's kernels ran at) and the README section it replaces (--section: the AVX-512
table and the AVX2 table live side by side)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT = os.path.join(ROOT, "benchmarks", "report.py")


def raw_run(isa):
    bench = lambda impl, median: {"group": "conv2d forward x", "params": {"impl": impl},
                                   "stats": {"median": median}}
    return {"datetime": "2026-12-07T01:00:00", "benchmarks": [bench("cnnext", 0.002), bench("torch", 0.004)],
            "machine_info": {"cpu": {"brand_raw": "Some CPU", "count": 2, "flags": ["avx2"]},
                             "torch": "2.13.0+cpu", "cnnext_cpu_isa": isa}}


def run(tmp_path, *args):
    return subprocess.run([sys.executable, REPORT, *args], capture_output=True, text=True, cwd=tmp_path)


def test_summary_records_the_isa_and_the_section_is_replaced(tmp_path):
    (tmp_path / "raw.json").write_text(json.dumps(raw_run("avx2")))
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- bench:start -->\nold 512\n<!-- bench:end -->\n"
                      "b\n<!-- bench-avx2:start -->\nold avx2\n<!-- bench-avx2:end -->\nc\n")
    out = run(tmp_path, "raw.json", "--summary", "s.json", "--readme", str(readme), "--section", "bench-avx2")
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["cnnext_cpu_isa"] == "avx2"
    assert abs(summary["benchmarks"]["conv2d forward x"]["ratio"] - 0.5) < 1e-12
    text = readme.read_text()
    assert "old 512" in text and "old avx2" not in text
    assert "cnnext's kernels at avx2" in text and "| conv2d forward x | 2.00 | 4.00 | 0.50 |" in text
    # The summary renders the same table again.
    again = run(tmp_path, "s.json")
    assert again.returncode == 0 and "| conv2d forward x | 2.00 | 4.00 | 0.50 |" in again.stdout


def test_missing_section_is_an_error(tmp_path):
    (tmp_path / "raw.json").write_text(json.dumps(raw_run("avx512")))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench:start -->\nx\n<!-- bench:end -->\n")
    out = run(tmp_path, "raw.json", "--readme", str(readme), "--section", "bench-avx2")
    assert out.returncode != 0 and "bench-avx2:start" in out.stderr
    assert readme.read_text() == "<!-- bench:start -->\nx\n<!-- bench:end -->\n"
