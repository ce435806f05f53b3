"""The op table (csrc/ops/op_table.h) against what is registered: every op of the
torch.ops.cnnext namespace is in the table with the table's schema, and each has its
kernels (CPU, CUDA, Autograd, fake) and, where cnnext.functional calls it, the direct
eager entry that functional takes."""
import ast
import inspect

import pytest
import torch
from torch._library.simple_registry import singleton as _python_registry

import cnnext
import cnnext.functional as CF

TABLE = cnnext._C._op_table()  # (name, schema, entry); looks up (and types) every handle
NAMES = [name for name, _, _ in TABLE]
EAGER = cnnext._C.eager

# Ops without an Autograd kernel, and why: an in-place update of running statistics,
# never differentiated (its inputs are buffers and batch statistics without gradient).
NOT_DIFFERENTIABLE = {"cnnext::batch_norm_update_stats_"}


def _registered():
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("cnnext::"))


def _has_kernel(name, key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(name, key)


def test_table_is_the_namespace():
    assert len(set(NAMES)) == len(NAMES), "an op is listed twice"
    assert sorted(NAMES) == _registered()


@pytest.mark.parametrize("name, schema", [(n, s) for n, s, _ in TABLE], ids=NAMES)
def test_schema_is_the_tables(name, schema):
    registered = torch._C._get_schema(name, "")
    assert str(registered) == str(torch._C.parse_schema(schema))


@pytest.mark.parametrize("name", NAMES)
def test_device_kernels(name):
    assert _has_kernel(name, "CPU")
    # Every build registers the CUDA key: a CUDA build its kernels, a CPU-only build the
    # op's message that says how to rebuild (test_cpu_only_build_says_how_to_rebuild).
    assert _has_kernel(name, "CUDA")


class _CudaShell(torch.Tensor):
    """A tensor whose device is cuda, without storage (a CPU-only torch can make one)."""

    @staticmethod
    def __new__(cls, *size):
        return torch.Tensor._make_wrapper_subclass(cls, size, dtype=torch.float64, device="cuda")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise AssertionError(f"{func} reached Python: the CUDA kernel was expected to raise first")


@pytest.mark.skipif(cnnext.build_info()["cuda"], reason="a CUDA build runs its kernels instead")
def test_cpu_only_build_says_how_to_rebuild():
    cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    with pytest.raises(RuntimeError, match=r"channel_sum: got CUDA tensors, but this cnnext build has no CUDA "
                                           r"kernels.*Rebuild with a CUDA build of torch"):
        torch.ops.cnnext.channel_sum.default.redispatch(cuda, _CudaShell(2, 3, 4, 4))


@pytest.mark.parametrize("name", NAMES)
def test_autograd_kernel(name):
    assert _has_kernel(name, "Autograd") == (name not in NOT_DIFFERENTIABLE)


@pytest.mark.parametrize("name", NAMES)
def test_fake_kernel(name):
    assert _python_registry.find(name).fake_impl.kernel is not None, f"{name} has no register_fake kernel"


def test_eager_entries_are_the_tables():
    eager = [n.split("::")[1] for n, _, entry in TABLE if entry == "eager"]
    assert {entry for _, _, entry in TABLE} <= {"eager", "internal"}
    assert list(EAGER.ops) == eager
    for name in eager:
        assert callable(getattr(EAGER, name))


def _functional_calls():
    """The op names cnnext.functional calls as _ops.<name>."""
    tree = ast.parse(inspect.getsource(CF))
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "_ops"}


def test_functional_calls_ops_of_the_table():
    calls = _functional_calls()
    assert {"conv2d", "max_pool2d_with_indices", "conv_bn_relu2d_train"} <= calls  # the parse found them
    assert calls <= {n.split("::")[1] for n in NAMES}
    # Each op functional calls has a direct eager entry, except the in-place statistics
    # update, which it calls through torch.ops.
    assert calls - set(EAGER.ops) == {"batch_norm_update_stats_"}


class _Reached(Exception):
    pass


@pytest.mark.parametrize("name", list(EAGER.ops))
def test_functional_takes_the_eager_entry(name, monkeypatch):
    def spy(*args):
        raise _Reached(name)

    monkeypatch.setattr(EAGER, name, spy)
    with pytest.raises(_Reached):
        getattr(CF._ops, name)()
