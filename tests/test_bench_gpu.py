"""benchmarks/gpu/bench_gpu.py, the GPU benchmark of issue 6, on a machine without a GPU:
it must say so and exit cleanly, and its plumbing (every section, the ratio table, the
JSON) must run (--cpu-dry-run: the CPU backend at batch 1, one call each)."""
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu", "bench_gpu.py")


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=600,
                          cwd=REPO)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the script would measure")
def test_no_gpu_message_and_exit_status():
    res = run()
    assert res.returncode == 0, res.stderr
    assert "no CUDA device" in res.stdout and "nothing was measured" in res.stdout
    res = run("--require-gpu")
    assert res.returncode == 1 and "no CUDA device" in res.stdout


def test_cpu_dry_run(tmp_path):
    out = tmp_path / "dry.json"
    res = run("--cpu-dry-run", "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "CPU DRY RUN" in res.stdout and "| target |" in res.stdout
    data = json.loads(out.read_text())
    sections = {r["section"] for r in data["results"]}
    assert sections >= {"copy", "conv_fwd", "conv_dgrad", "conv_wgrad", "fused_eval", "fused_train",
                        "maxpool_fwd", "maxpool_bwd", "maxunpool", "avgpool_bw", "adaptive_bw",
                        "net_train"}
    for r in data["results"]:
        assert r["median_ms"] > 0 and r["impl"] in ("cnnext", "torch")
    assert all(x["ratio"] > 0 for x in data["ratios"])
