"""python -m cnnext [check | summary NAME | info | train NET | bench [--full] | --version]"""
import argparse
import json
import sys


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m cnnext", description=__doc__)
    ap.add_argument("--version", action="store_true", help="print the versions of cnnext and torch and exit")
    sub = ap.add_subparsers(dest="cmd")
    chk = sub.add_parser("check", help="compare every op and every network with stock torch; exit 1 on any failure")
    chk.add_argument("--ops-only", action="store_true", help="skip the networks")
    summ = sub.add_parser("summary", help="print the layer-by-layer table of one network")
    summ.add_argument("name", help="a network of cnnext.models.MODELS")
    summ.add_argument("--depth", type=_positive_int, default=1, help="levels of submodules to show (default 1)")
    summ.add_argument("--in-channels", type=_positive_int, default=1, help="input channels (default 1)")
    summ.add_argument("--time", action="store_true",
                      help="add each layer's median forward time on cnnext and on stock torch")
    summ.add_argument("--parts", action="store_true", help="add rows for the parts of fused blocks")
    sub.add_parser("info", help="print how this build of cnnext was compiled")
    from .train.cli import add_parser as add_train_parser

    train = add_train_parser(sub)
    from .bench import add_parser as add_bench_parser

    add_bench_parser(sub)
    args = ap.parse_args(argv)
    if args.cmd == "train":
        from .train.cli import run as run_train

        return run_train(args, train)

    import cnnext

    if args.version:
        print(f"cnnext {cnnext.__version__} (torch {cnnext.build_info()['torch_runtime']})")
        return 0
    if args.cmd is None:
        ap.error("expected a command: check, summary, info, train or bench")

    if args.cmd == "bench":
        from .bench import main as run_bench

        return run_bench(args)
    if args.cmd == "info":
        print(json.dumps(cnnext.build_info(), indent=2))
        return 0
    if args.cmd == "summary":
        from .models import MODELS

        if args.name not in MODELS:
            ap.error(f"unknown network {args.name!r}; expected one of {', '.join(MODELS)}")
        spec = MODELS[args.name]
        net = spec.build(in_channels=args.in_channels)
        cnnext.summary(net, (args.in_channels, spec.input_size, spec.input_size), depth=args.depth, time=args.time,
                       parts=args.parts)
        return 0
    from .check import run_checks, run_network_checks

    info = cnnext.build_info()
    print(f"cnnext {cnnext.__version__} (CUDA kernels: {'yes' if info['cuda'] else 'no'}), torch {info['torch_runtime']}\n")
    failed = run_checks()
    if not args.ops_only:
        print()
        failed += run_network_checks()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
