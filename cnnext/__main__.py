"""python -m cnnext [check | info]"""
import argparse
import json
import sys


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m cnnext", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="compare every op with stock torch; exit 1 on any failure")
    sub.add_parser("info", help="print how this build of cnnext was compiled")
    args = ap.parse_args(argv)

    import cnnext

    if args.cmd == "info":
        print(json.dumps(cnnext.build_info(), indent=2))
        return 0
    from .check import run_checks

    info = cnnext.build_info()
    print(f"cnnext {cnnext.__version__} (CUDA kernels: {'yes' if info['cuda'] else 'no'}), torch {info['torch_runtime']}\n")
    return 1 if run_checks() else 0


if __name__ == "__main__":
    sys.exit(main())
