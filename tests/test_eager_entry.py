"""cnnext._C.eager, the direct entries cnnext.functional calls in eager mode (csrc/eager.cpp):
the same op, output and gradients as torch.ops.cnnext, through every dispatch key
(autograd, dispatch modes, fake tensors), with torch.ops taking over wherever
__torch_function__ is asked for (a tensor subclass, a TorchFunctionMode) and errors
raised with the type and message torch.ops raises."""
import threading

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import cnnext
import cnnext.functional as CF

OPS = torch.ops.cnnext
EAGER = cnnext._C.eager


def _randn(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _cases():
    """(name, positional arguments): every entry, with gradients where there are any."""
    x = _randn(2, 4, 7, 9)
    w = _randn(6, 4, 3, 3, seed=1)
    b = _randn(6, seed=2)
    wt = _randn(4, 3, 3, 3, seed=3)
    pooled, idx = torch.nn.functional.max_pool2d(x, 2, return_indices=True)
    bn_w, bn_b = _randn(6, seed=4), _randn(6, seed=5)
    rm, rv = _randn(6, seed=6), _randn(6, seed=7).abs() + 0.5
    return [
        ("conv2d", (x, w, b, [1, 2], [1, 0], [1, 1], 1)),
        ("conv2d", (x, w, None, [1, 1], [0, 0], [2, 1], 1)),
        ("conv_transpose2d", (x, wt, None, [2, 2], [1, 1], [1, 0], 1, [1, 1])),
        ("avg_pool2d", (x, [3, 2], [2, 2], [1, 1], True, False, None)),
        ("avg_pool2d", (x, [2, 2], [2, 1], [0, 0], False, True, 3)),
        ("adaptive_avg_pool2d", (x, [3, 4])),
        ("max_pool2d_with_indices", (x, [3, 3], [2, 2], [1, 1], [1, 1], True)),
        ("max_unpool2d", (pooled, idx, [7, 9])),
        ("conv_bn_relu2d_eval", (x, w, b, bn_w, bn_b, rm, rv, 1e-5, [1, 1], [1, 1], [1, 1], 1, True)),
        ("conv_bn_relu2d_train", (x, w, None, bn_w, None, 1e-3, [2, 1], [1, 1], [1, 1], 1, False)),
    ]


CASES = _cases()
IDS = [f"{name}-{i}" for i, (name, _) in enumerate(CASES)]


def _with_grad(args):
    return tuple(a.detach().clone().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a
                 for a in args)


def _outputs(result):
    return list(result) if isinstance(result, (tuple, list)) else [result]


@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
def test_entry_matches_torch_ops(case):
    name, args = CASES[case]
    a_fast, a_slow = _with_grad(args), _with_grad(args)
    fast = _outputs(getattr(EAGER, name)(*a_fast))
    slow = _outputs(getattr(OPS, name)(*a_slow))
    assert len(fast) == len(slow)
    for f, s in zip(fast, slow):
        assert f.dtype == s.dtype and f.shape == s.shape and f.stride() == s.stride()
        assert torch.equal(f, s)
    # Gradients through the autograd node the direct entry's call recorded.
    diff = [(f, s) for f, s in zip(fast, slow) if f.requires_grad]
    assert diff, "each case has a differentiable output"
    g = [_randn(*f.shape, seed=10 + i) for i, (f, _) in enumerate(diff)]
    ins_fast = [a for a in a_fast if isinstance(a, torch.Tensor) and a.requires_grad]
    ins_slow = [a for a in a_slow if isinstance(a, torch.Tensor) and a.requires_grad]
    gf = torch.autograd.grad([f for f, _ in diff], ins_fast, g, allow_unused=True)
    gs = torch.autograd.grad([s for _, s in diff], ins_slow, g, allow_unused=True)
    assert any(x is not None for x in gf)
    for x, y in zip(gf, gs):
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.equal(x, y)


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
def test_entry_goes_through_dispatch_modes(case):
    name, args = CASES[case]
    with _Recorder() as rec:
        getattr(EAGER, name)(*args)
    assert f"cnnext.{name}.default" in rec.seen


def test_entry_runs_on_fake_tensors():
    x = _randn(2, 4, 7, 9, dtype=torch.float32)
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        out, idx = EAGER.max_pool2d_with_indices(fx, [3, 3], [2, 2], [1, 1], [1, 1], True)
        conv = EAGER.conv2d(fx, torch.empty(5, 4, 3, 3), None, [2, 2], [1, 1], [1, 1], 1)
    assert type(out).__name__ == "FakeTensor" and out.shape == (2, 4, 4, 5) and idx.dtype == torch.int64
    assert conv.shape == (2, 5, 4, 5)


class _FunctionRecorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


class _Tagged(torch.Tensor):
    calls = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(str(func))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def test_functional_defers_to_torch_function_mode():
    x = _randn(1, 2, 6, 6)
    with _FunctionRecorder() as rec:
        out = CF.avg_pool2d(x, 2)
        CF.max_pool2d(x, 3, 2)
    assert "cnnext.avg_pool2d" in rec.seen and "cnnext.max_pool2d_with_indices" in rec.seen
    torch.testing.assert_close(out, torch.nn.functional.avg_pool2d(x, 2))


def test_functional_defers_to_torch_function_subclass():
    x = _randn(1, 2, 6, 6)
    _Tagged.calls.clear()
    out = CF.adaptive_avg_pool2d(x.as_subclass(_Tagged), 1)
    assert "cnnext.adaptive_avg_pool2d" in _Tagged.calls
    assert torch.allclose(out.as_subclass(torch.Tensor), x.mean((2, 3), keepdim=True))


def test_functional_takes_the_entry_outside_those(monkeypatch):
    # Swap the direct entry for a recorder: a plain eager call must reach it, a call
    # under a TorchFunctionMode must not.
    calls = []
    real = EAGER.avg_pool2d

    def spy(*args):
        calls.append(args[1:])
        return real(*args)

    monkeypatch.setattr(EAGER, "avg_pool2d", spy)
    x = _randn(1, 2, 6, 6)
    torch.testing.assert_close(CF.avg_pool2d(x, 3, 1, 1), torch.nn.functional.avg_pool2d(x, 3, 1, 1))
    assert calls == [([3, 3], [1, 1], [1, 1], False, True, None)]
    with _FunctionRecorder():
        CF.avg_pool2d(x, 2)
    assert len(calls) == 1


@pytest.mark.parametrize("args, exc, match", [
    ((_randn(1, 2, 6, 6), [2, 2], [0, 0], [0, 0], False, True, None), RuntimeError, "stride"),
    ((_randn(1, 2, 6, 6), [2, 2], [2, 2], [0, 0], False, True, 0), RuntimeError, "divisor_override"),
    ((_randn(6, 6), [2, 2], [2, 2], [0, 0], False, True, None), RuntimeError, r"3-D \(C, H, W\) or 4-D"),
])
def test_entry_raises_as_torch_ops(args, exc, match):
    with pytest.raises(exc, match=match) as fast:
        EAGER.avg_pool2d(*args)
    with pytest.raises(exc, match=match) as slow:
        OPS.avg_pool2d(*args)
    assert type(fast.value) is type(slow.value)
    assert str(fast.value).splitlines()[0] == str(slow.value).splitlines()[0]


def test_entry_from_threads():
    # The entries release the GIL while the op runs: concurrent calls stay correct.
    x = _randn(4, 8, 32, 32, dtype=torch.float32)
    w = _randn(8, 8, 3, 3, dtype=torch.float32, seed=1)
    want = OPS.conv2d(x, w, None, [1, 1], [1, 1], [1, 1], 1)
    results, errors = [], []

    def work():
        try:
            for _ in range(5):
                results.append(EAGER.conv2d(x, w, None, [1, 1], [1, 1], [1, 1], 1))
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 20 and all(torch.equal(r, want) for r in results)
