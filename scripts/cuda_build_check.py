"""Checks an installed CUDA build of cnnext on a host without a GPU (run by cuda_build_check.sh).

1. cnnext.build_info()['cuda'] is True and torch is a CUDA build.
2. Every cnnext operator (as registered with the dispatcher, not a hard-coded list) has a
   kernel for the CUDA dispatch key.
3. Calling ops on tensors whose device is CUDA enters cnnext's CUDA path: without a GPU
   no CUDA tensor can be allocated, so the inputs are storage-less wrapper tensors with
   device cuda, and each call is sent to the CUDA dispatch key. cnnext's kernel then runs
   until it first touches the CUDA runtime, where torch raises its missing-driver error.
   The error's C++ stack trace (TORCH_SHOW_CPP_STACKTRACES=1) must hold a frame of a
   cnnext:: function. A build without CUDA kernels fails this differently
   (NotImplementedError "Could not run ... 'CUDA' backend", or cnnext's "this cnnext build
   has no CUDA kernels"), and so does a kernel that never reaches the runtime (it would
   return). On a host with a GPU
   the same ops run on real CUDA tensors and are compared with the CPU results instead.
Exits non-zero with a message on the first failure.
"""
import os
import re
import sys

os.environ.setdefault("TORCH_SHOW_CPP_STACKTRACES", "1")

import torch  # noqa: E402

import cnnext  # noqa: E402

DRIVER_ERROR = re.compile(r"no NVIDIA driver|driver version is insufficient|cudaErrorInsufficientDriver|"
                          r"cudaErrorNoDevice|no CUDA-capable device", re.I)
CUDA_KEYSET = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)


def fail(msg):
    sys.exit(f"cuda_build_check: FAIL: {msg}")


class CudaShell(torch.Tensor):
    """A tensor with device cuda and no storage; every op on it is sent to the CUDA key."""

    calls = []

    @staticmethod
    def __new__(cls, *size):
        return torch.Tensor._make_wrapper_subclass(cls, size, dtype=torch.float32, device="cuda")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(str(func))
        return func.redispatch(CUDA_KEYSET, *args, **(kwargs or {}))


def calls(make):
    """(name, op, args) for a few ops of each family; make(*size) makes an input tensor."""
    x = make(2, 4, 8, 8)
    return [
        ("conv2d", torch.ops.cnnext.conv2d.default, (x, make(6, 4, 3, 3), make(6), [1, 1], [1, 1], [1, 1], 1)),
        ("max_pool2d_with_indices", torch.ops.cnnext.max_pool2d_with_indices.default,
         (x, [2, 2], [2, 2], [0, 0], [1, 1], False)),
        ("avg_pool2d", torch.ops.cnnext.avg_pool2d.default, (x, [2, 2], [2, 2], [0, 0], False, True, None)),
    ]


def main():
    info = cnnext.build_info()
    print("build_info:", info)
    if torch.version.cuda is None:
        fail(f"torch {torch.__version__} is not a CUDA build")
    if info.get("cuda") is not True:
        fail("cnnext.build_info()['cuda'] is not True: the extension was built without CUDA kernels")

    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("cnnext::"))
    table = sorted(name for name, _, _ in cnnext._C._op_table())  # csrc/ops/op_table.h
    if names != table:
        fail(f"the registered cnnext operators {names} are not those of the op table {table}")
    missing = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]
    print(f"{len(names)} cnnext operators; with a CUDA kernel: {len(names) - len(missing)}")
    if missing:
        fail(f"operators without a CUDA kernel: {missing}")

    if torch.cuda.is_available():
        print("a GPU is visible: running the ops on CUDA tensors against their CPU results")
        torch.manual_seed(0)
        for name, op, args in calls(lambda *s: torch.randn(*s, dtype=torch.float64)):
            want = op(*args)
            got = op(*[a.cuda() if isinstance(a, torch.Tensor) else a for a in args])
            for w, g in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)):
                torch.testing.assert_close(g.cpu(), w)
            print(f"  {name}: CUDA result matches CPU")
        return

    for name, op, args in calls(CudaShell):
        CudaShell.calls.clear()
        try:
            op(*args)
        except NotImplementedError as e:
            fail(f"{name}: no CUDA kernel ran: {str(e).splitlines()[0]}")
        except Exception as e:  # torch raises the driver error as RuntimeError or torch.AcceleratorError
            text = str(e)
            if "has no CUDA kernels" in text or not DRIVER_ERROR.search(text):
                fail(f"{name}: expected the CUDA runtime's missing-driver error, got {type(e).__name__}: {text[:2000]}")
            first = next((ln for ln in text.splitlines() if DRIVER_ERROR.search(ln)), text.splitlines()[0])
            # TORCH_SHOW_CPP_STACKTRACES=1: the C++ frames, innermost first; one of them must be
            # a function of cnnext's (the op's CUDA path), below torch's CUDA runtime call.
            frames = [ln.strip() for ln in text.splitlines() if re.match(r"\s*#\d+ cnnext::", ln)]
            print(f"  {name}: {type(e).__name__}: {first.strip()}")
            if not frames:
                fail(f"{name}: the driver error did not come from inside cnnext (no cnnext:: frame in its C++ "
                     f"stack trace; ops seen: {CudaShell.calls}):\n{text[:4000]}")
            where, _, at = frames[0].partition(" from ")
            print(f"    raised under {where[:110]}... at {at}")
        else:
            fail(f"{name}: returned without touching the CUDA runtime, on storage-less tensors")
    print("every call entered the CUDA path and stopped at the missing driver")


if __name__ == "__main__":
    main()
