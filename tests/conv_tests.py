"""Tests that conv2d and conv_transpose2d share: each builds the test functions for one
op (`ours`, against its torch.nn.functional namesake `ref`) from that op's grids,
strategies and arguments; tests/test_conv2d.py and tests/test_conv_transpose2d.py bind
them to test_* names, so pytest collects them in the op's module."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from cnnext.testing import assert_close_scaled, cuda_only, leaf
from conftest import examples


def gradcheck_tests(ours, ref, grid, grid_inputs):
    """test_gradcheck (the float64 output equals torch's; gradcheck) and test_gradgradcheck
    over every case of grid; grid_inputs(case) -> (tensors, keyword arguments)."""

    @pytest.mark.usefixtures("single_thread")
    @pytest.mark.parametrize("case", grid)
    def test_gradcheck(case):
        tensors, kw = grid_inputs(case)
        fn = lambda *t: ours(*t, **kw)  # noqa: E731
        torch.testing.assert_close(fn(*tensors), ref(*tensors, **kw), rtol=1e-12, atol=1e-12)
        assert torch.autograd.gradcheck(fn, tensors)

    @pytest.mark.usefixtures("single_thread")
    @pytest.mark.parametrize("case", grid)
    def test_gradgradcheck(case):
        tensors, kw = grid_inputs(case)
        fn = lambda *t: ours(*t, **kw)  # noqa: E731
        assert torch.autograd.gradgradcheck(fn, tensors)

    return test_gradcheck, test_gradgradcheck


def double_backward_test(ours, ref, shapes, kw, doc):
    """The gradient of a gradient norm (what gradient-penalty training does) equals
    torch's; shapes = (input, weight, bias), the input channels_last."""

    def test_double_backward_matches_torch():
        x0, w0, b0 = (torch.randn(s, dtype=torch.float64) for s in shapes)
        results = []
        for f in (ours, ref):
            x, w, b = leaf(x0, "channels_last"), leaf(w0), leaf(b0)
            y = f(x, w, b, **kw)
            gx, gw = torch.autograd.grad(y.pow(2).sum(), (x, w), create_graph=True)
            penalty = gx.pow(2).sum() + gw.pow(3).sum()
            results.append(torch.autograd.grad(penalty, (x, w, b)))
        for a, e, name in zip(*results, "xwb"):
            assert_close_scaled(a, e, 1e-11, name)

    test_double_backward_matches_torch.__doc__ = doc
    return test_double_backward_matches_torch


def parity_tests(check_parity, confs):
    """test_parity_float64, test_parity_float32 and test_parity_empty_batch: check_parity on
    random configurations from the strategy confs(batch=...)."""

    @settings(max_examples=examples(300))
    @given(c=confs())
    def test_parity_float64(c):
        check_parity(c, torch.float64)

    @settings(max_examples=examples(200))
    @given(c=confs())
    def test_parity_float32(c):
        check_parity(c, torch.float32)

    @settings(max_examples=examples(50))
    @given(c=confs(batch=st.just(0)), dtype=st.sampled_from([torch.float32, torch.float64]))
    def test_parity_empty_batch(c, dtype):
        check_parity(c, dtype)

    return test_parity_float64, test_parity_float32, test_parity_empty_batch


def partial_requires_grad_test(ours, ref, needs, shapes, kw):
    """Only the gradients asked for are computed, and they are right (float32)."""

    @pytest.mark.parametrize("needs", needs)
    def test_partial_requires_grad(needs):
        """Only the gradients asked for are computed, and they are right."""
        x0, w0, b0 = (torch.randn(s) for s in shapes)
        grads = []
        for f in (ours, ref):
            x, w, b = (t.clone().requires_grad_(name in needs) for t, name in zip((x0, w0, b0), "xwb"))
            y = f(x, w, b, **kw)
            assert y.requires_grad
            y.backward(torch.linspace(-1, 1, y.numel()).view(y.shape))
            grads.append([t.grad for t in (x, w, b)])
        for name, a, e in zip("xwb", *grads):
            if name in needs:
                assert_close_scaled(a, e, 1e-5, name)
            else:
                assert a is None and e is None

    return test_partial_requires_grad


def bad_input_tests(ours, ref, name, bad, torch_cases, bad_ops):
    """test_bad_input (each case of bad: (args, exception type, message regex) raises, the
    message starting with the op's name), test_torch_rejects_too (torch rejects the
    torch_cases too: cnnext's checks are not stricter than torch's) and test_bad_op_input
    (each case of bad_ops: (call, exception type, message regex) of a direct op call)."""

    @pytest.mark.parametrize("case", bad)
    def test_bad_input(case):
        args, exc, pattern = bad[case]
        with pytest.raises(exc, match=pattern) as info:
            ours(*args)
        assert str(info.value).lstrip().startswith(f"{name}: ")

    @pytest.mark.parametrize("case", torch_cases)
    def test_torch_rejects_too(case):
        """What cnnext rejects, torch rejects too: the checks are not stricter than torch's."""
        args, _, _ = bad[case]
        with pytest.raises((RuntimeError, ValueError, TypeError)):
            ref(*args)

    @pytest.mark.parametrize("case", bad_ops)
    def test_bad_op_input(case):
        call, exc, pattern = bad_ops[case]
        with pytest.raises(exc, match=pattern):
            call()

    return test_bad_input, test_torch_rejects_too, test_bad_op_input


def compile_dynamic_shapes_test(net, ref_net, params, shapes, doc):
    """net(x, *params) under torch.compile(dynamic=True, backend="aot_eager"): symbolic
    sizes through the fake kernels (no code generation, so it stays quick); output and
    gradients against ref_net, the same function in stock torch, for each input shape."""

    def test_torch_compile_dynamic_shapes():
        import torch._dynamo

        torch._dynamo.reset()
        compiled = torch.compile(net, fullgraph=True, dynamic=True, backend="aot_eager")
        ps = [leaf(torch.randn(s)) for s in params]
        for shape in shapes:
            x = leaf(torch.randn(shape))
            out = compiled(x, *ps)
            grads = torch.autograd.grad(out.square().sum(), (x, *ps))
            refs = [leaf(t) for t in (x, *ps)]
            want = ref_net(*refs)
            ref_grads = torch.autograd.grad(want.square().sum(), refs)
            assert out.shape == want.shape
            assert_close_scaled(out, want, 1e-5, f"output {shape}")
            for a, e in zip(grads, ref_grads):
                assert_close_scaled(a, e, 1e-5, f"grad {shape}")

    test_torch_compile_dynamic_shapes.__doc__ = doc
    return test_torch_compile_dynamic_shapes


def mixed_devices_test(ours, wshape):
    """A convolution with input, weight or bias on the CPU and the others on the GPU raises."""

    @pytest.mark.parametrize("where", ["input_cpu", "weight_cpu", "bias_cpu"])
    @pytest.mark.parametrize("device", cuda_only())
    def test_mixed_devices_raise(device, where):
        x = torch.randn(1, 2, 5, 5, device="cpu" if where == "input_cpu" else device)
        w = torch.randn(wshape, device="cpu" if where == "weight_cpu" else device)
        b = torch.randn(3, device="cpu" if where == "bias_cpu" else device)
        with pytest.raises(RuntimeError, match="same device"):
            ours(x, w, b)

    return test_mixed_devices_raise
