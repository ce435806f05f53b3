"""`python -m cnnext bench`: quick mode on toy sizes writes bench.json and bench.png with
positive ratios for every layer and network."""
import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_quick_tiny(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "cnnext", "bench", "--tiny", "--repeats", "3", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "bench.json").read_text())
    assert result["format"] == "cnnext-bench/1" and result["mode"] == "quick-tiny"
    kinds = {r["kind"] for r in result["rows"]}
    assert kinds == {"layer", "network"}
    for r in result["rows"]:
        assert r["cnnext_ms"] > 0 and r["stock_ms"] > 0
        assert r["ratio"] > 0 and math.isfinite(r["ratio"])
        assert r["ratio"] == pytest.approx(r["cnnext_ms"] / r["stock_ms"])
        assert r["name"] in proc.stdout
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert "geomean ratio, layers" in proc.stdout
    # the progress bar goes to stderr
    assert "cnnext bench" in proc.stderr


def test_measure_pair_interleaves():
    from cnnext.bench import measure_pair

    calls = []
    a, b = measure_pair(lambda: calls.append("a"), lambda: calls.append("b"), repeats=4, warmup=1)
    assert a >= 0 and b >= 0
    timed = calls[2:]
    assert timed == ["a", "b", "b", "a", "a", "b", "b", "a"]
