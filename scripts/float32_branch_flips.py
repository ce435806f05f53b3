"""Why a float32 network's gradient can differ from its stock twin's by percents, and why
that is not a kernel error (docs/DESIGN.md, "CPU Winograd", accuracy of whole networks).

For each seed, four float32 runs of one network (parity.compare_float64's setting: batch 2,
BatchNorm in training) are held against float64: stock torch with oneDNN convolutions, stock
torch with them off (PyTorch's own convolution, another summation order), cnnext with
Winograd off (GEMM path) and on. For each run it prints the error against a float64 run
taking the same ReLU / max-pool branches, and the branches it took differently from the
float64 run, with their float64 tie gaps (relative to the layer's largest input). Then the
stock-against-stock gradient difference (oneDNN on vs off), compared directly as
tests/test_models.py's old float32 parity test compared cnnext with stock.

    python scripts/float32_branch_flips.py [--net resnet18] [--seeds 1,2,3]
"""
import argparse
import copy
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cnnext.backends.cpu as cpu_backend  # noqa: E402
from cnnext.models import MODELS  # noqa: E402
from cnnext.models.parity import GRAD_FLOOR, _worst, compare_float64  # noqa: E402

warnings.filterwarnings("ignore", message="TF32 acceleration")


def stock_vs_stock(name, seed, batch=2):
    """Stock float32 with oneDNN convolutions against stock float32 without: (error, where)."""
    torch.manual_seed(seed)
    a = MODELS[name].build(backend="torch", in_channels=1, num_classes=10).train(MODELS[name].has_batchnorm)
    b = copy.deepcopy(a)
    gen = torch.Generator().manual_seed(seed + 1)
    size = MODELS[name].input_size
    x = torch.randn((batch, 1, size, size), generator=gen, dtype=torch.float64).float()
    gy = torch.randn((batch, 10), generator=gen, dtype=torch.float64).float()
    a(x).backward(gy)
    with torch.backends.mkldnn.flags(enabled=False):
        b(x).backward(gy)
    floor = GRAD_FLOOR[torch.float32] * max(p.grad.abs().max().item() for p in a.parameters())
    return _worst([(n, q.grad, p.grad) for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters())], floor)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--net", default="resnet18", choices=list(MODELS))
    ap.add_argument("--seeds", default="1")
    a = ap.parse_args()
    for seed in map(int, a.seeds.split(",")):
        rows = {}
        with cpu_backend.flags(winograd=False):
            r = compare_float64(a.net, torch.float32, batch=2, seed=seed)
        rows["cnnext GEMM"], rows["stock oneDNN"] = (r, "cnnext"), (r, "stock")
        with cpu_backend.flags(winograd=True), torch.backends.mkldnn.flags(enabled=False):
            r = compare_float64(a.net, torch.float32, batch=2, seed=seed)
        rows["cnnext Winograd"], rows["stock no oneDNN"] = (r, "cnnext"), (r, "stock")
        for k, (r, who) in rows.items():
            e = r.errors[who]
            flips = ", ".join(f"{layer} x{c} (gap {g:.1e})" for layer, c, g in r.flips[who]) or "-"
            print(f"{a.net} seed {seed} {k:16s} vs float64 on its branches: output {e['output'][0]:.1e} "
                  f"gradients {e['gradients'][0]:.1e} BN buffers {e['buffers'][0]:.1e}; branches unlike float64: {flips}")
        err, where = stock_vs_stock(a.net, seed)
        print(f"{a.net} seed {seed} stock oneDNN vs stock no oneDNN, gradients compared directly: {err:.1e} at {where}")


if __name__ == "__main__":
    main()
