"""`python -m cnnext train NET [options]`: the argument parser and its runner (wrapping
cnnext.train.fit). Imports nothing heavy until the command runs."""
import argparse

from ..models import BACKENDS, MODELS
from .data import DATASETS

__all__ = ["add_parser", "run"]

HELP = """Train a network of cnnext.models the way "Dive into Deep Learning" does: a
progress bar per epoch, a line per epoch, and in --out DIR: metrics.csv, curves.png,
checkpoint.pt (every epoch) and confusion.csv. Run under torchrun for DDP
(torchrun --nproc_per_node=2 -m cnnext train ...): gloo on the CPU, nccl on CUDA, rank 0
writes the files; --batch-size is per process, and BatchNorm layers are synchronised
(statistics of the global batch, cnnext.nn.SyncBatchNorm)."""


def _data_arg(value):
    from .data import parse_data

    try:
        return parse_data(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _net_arg(value):
    if value not in MODELS:
        raise argparse.ArgumentTypeError(f"unknown network {value!r}; expected one of {', '.join(MODELS)}")
    return value


def add_parser(sub):
    """Adds the `train` subcommand to an argparse subparsers object. Options default to
    None (= not given), so that a resumed run can tell them from the checkpoint's."""
    p = sub.add_parser("train", help="train a network (real data, progress, curves, checkpoints, DDP)",
                       description=HELP, usage="python -m cnnext train NET [--data DATA] [--epochs N] [--out DIR] "
                                               "[options] (--help lists them)")
    p.add_argument("net", nargs="?", type=_net_arg, metavar="NET",
                   help=f"one of {', '.join(MODELS)} (with --resume: the checkpoint's by default)")
    g = p.add_argument_group("data")
    g.add_argument("--data", type=_data_arg, metavar="DATA",
                   help=f"{', '.join(DATASETS)} (torchvision) or folder:PATH (an ImageFolder tree; its train/ "
                        "and test/ subfolders when present, else a fixed 80/20 split); default digits "
                        "(scikit-learn's 8x8 digits, offline)")
    g.add_argument("--data-root", metavar="DIR", help="where torchvision datasets are (default $CNNEXT_DATA or "
                                                      "~/.cache/cnnext/data)")
    g.add_argument("--download", action="store_true", default=None, help="download a torchvision dataset that is "
                                                                          "not in --data-root")
    g.add_argument("--input-size", type=int, metavar="N", help="resize images to NxN (default: the network's "
                                                                "own input size, e.g. 32 for lenet)")
    g.add_argument("--batch-size", type=int, metavar="N", help="images per batch and process (default 32)")
    g.add_argument("--workers", type=int, metavar="N",
                   help="data-loader processes for folder: data (default 0); the in-memory datasets are "
                        "batched by tensor indexing in the main process")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, metavar="N", help="train up to epoch N (default 10)")
    t.add_argument("--lr", type=float, help="learning rate (default 0.05 for sgd, 0.001 for adam)")
    t.add_argument("--optimizer", choices=("sgd", "adam"), help="default sgd")
    t.add_argument("--momentum", type=float, help="sgd momentum (default 0.9)")
    t.add_argument("--weight-decay", type=float, help="L2 regularisation (default 5e-4)")
    t.add_argument("--schedule", choices=("none", "cosine", "step"),
                   help="learning-rate schedule: step (default: times --lr-gamma every --lr-step epochs), "
                        "cosine (anneals to 0 over --epochs), none")
    t.add_argument("--lr-step", type=int, metavar="N", help="step schedule: epochs between decays "
                                                             "(default half of --epochs)")
    t.add_argument("--lr-gamma", type=float, help="step schedule: the factor (default 0.1)")
    t.add_argument("--label-smoothing", type=float, metavar="EPS",
                   help="of the cross-entropy loss (default 0.1)")
    t.add_argument("--seed", type=int, help="seeds the weights, the batch order and dropout (default 0)")
    r = p.add_argument_group("how it runs")
    r.add_argument("--backend", choices=BACKENDS, help="cnnext's layers (default) or the same network from "
                                                      "stock torch.nn")
    r.add_argument("--device", choices=("cpu", "cuda"), help="default cpu")
    r.add_argument("--dtype", choices=("float32", "float64"), help="default float32")
    r.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="run the network and its input in channels_last memory format")
    r.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="autocast: bfloat16 on the CPU, float16 (with a gradient scaler) on CUDA; "
                        "--backend torch only for now")
    r.add_argument("--threads", type=int, metavar="N", help="torch intra-op threads (default torch's own)")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a tqdm progress bar per epoch (default on)")
    o = p.add_argument_group("output")
    o.add_argument("--out", metavar="DIR", help="write metrics.csv, curves.png, checkpoint.pt and confusion.csv "
                                                "here (default runs/NET-DATA; with --resume the checkpoint's folder)")
    o.add_argument("--resume", metavar="PATH", help="continue the run of a checkpoint.pt exactly; options left "
                                                    "out are the checkpoint's, options given must agree with it "
                                                    "(--epochs may grow)")
    return p


_OPTIONS = ("data", "data_root", "download", "input_size", "batch_size", "workers", "epochs", "lr", "optimizer",
            "momentum", "weight_decay", "schedule", "lr_step", "lr_gamma", "label_smoothing", "seed", "backend",
            "device", "dtype", "channels_last", "amp", "progress", "out")


def run(args, parser):
    """Runs `python -m cnnext train` for parsed args; exit status 0, or parser.error (2)
    with the message of a bad option, dataset or checkpoint."""
    import os

    import torch

    from .data import DataError
    from .loop import CheckpointError, OptionError, fit

    if args.net is None and args.resume is None:
        parser.error(f"expected a network (one of {', '.join(MODELS)}) or --resume PATH")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"expected --threads to be a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    options = {k: getattr(args, k) for k in _OPTIONS}
    if options["out"] is None and args.resume is None:
        data = options["data"] or "digits"
        tag = os.path.basename(data[len("folder:"):].rstrip(os.sep)) if data.startswith("folder:") else data
        options["out"] = os.path.join("runs", f"{args.net}-{tag}")
    try:
        fit(args.net, resume=args.resume, **options)
    except (OptionError, CheckpointError, DataError, FileNotFoundError) as e:
        parser.error(str(e))
    return 0
