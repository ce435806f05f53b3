"""cnnext.nn.Conv2d is a drop-in for torch.nn.Conv2d: same parameters, init, state_dict, results."""
import copy

import pytest
import torch

import cnnext
from conftest import assert_close_scaled, assert_state_dict_round_trip, to_layout

# kwargs of both constructors (after in_channels, out_channels, kernel_size)
CONFIGS = {
    "default": (4, 6, 3, {}),
    "padding_1": (4, 6, 3, dict(padding=1)),
    "rect": (4, 6, (3, 2), dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2))),
    "same_even_kernel": (4, 6, (4, 3), dict(padding="same")),
    "same_dilated": (4, 6, 2, dict(padding="same", dilation=(3, 2))),
    "valid": (4, 6, 3, dict(padding="valid")),
    "no_bias": (4, 6, 3, dict(bias=False, padding=1)),
    "groups": (4, 6, 3, dict(groups=2, padding=1)),
    "depthwise": (4, 8, 3, dict(groups=4, stride=2, padding=2)),
    "pointwise": (4, 6, 1, {}),
}
PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


def make_pair(in_ch, out_ch, kernel, kwargs, seed=0, **extra):
    torch.manual_seed(seed)
    ours = cnnext.nn.Conv2d(in_ch, out_ch, kernel, **kwargs, **extra)
    torch.manual_seed(seed)
    ref = torch.nn.Conv2d(in_ch, out_ch, kernel, **kwargs, **extra)
    return ours, ref


def test_is_torch_conv2d():
    m = cnnext.nn.Conv2d(3, 4, 3)
    assert isinstance(m, torch.nn.Conv2d)
    assert isinstance(m, torch.nn.Module)
    assert type(m) is not torch.nn.Conv2d


@pytest.mark.parametrize("case", CONFIGS)
def test_parameters_init_and_repr(case):
    ours, ref = make_pair(*CONFIGS[case], seed=123)
    assert [(n, p.shape, p.dtype) for n, p in ours.named_parameters()] == \
           [(n, p.shape, p.dtype) for n, p in ref.named_parameters()]
    assert list(ours.state_dict()) == list(ref.state_dict())
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b), name  # same initialisation from the same seed
    assert repr(ours) == repr(ref)
    for attr in ("stride", "padding", "dilation", "groups", "padding_mode", "kernel_size"):
        assert getattr(ours, attr) == getattr(ref, attr), attr


def test_different_seed_different_init():
    ours, _ = make_pair(4, 6, 3, {}, seed=1)
    other, _ = make_pair(4, 6, 3, {}, seed=2)
    assert not torch.equal(ours.weight, other.weight)


@pytest.mark.parametrize("direction", ["torch_to_cnnext", "cnnext_to_torch"])
def test_state_dict_loads_both_ways(direction):
    ours, ref = make_pair(4, 6, 3, dict(padding=1, groups=2), seed=0)
    src, dst = (ref, ours) if direction == "torch_to_cnnext" else (ours, ref)
    ours_out, ref_out = assert_state_dict_round_trip(src, dst, torch.randn(2, 4, 7, 7))
    torch.testing.assert_close(ours_out, ref_out, rtol=1e-5, atol=1e-5)


def test_state_dict_without_bias_rejected_like_torch():
    ours, ref = make_pair(4, 6, 3, {})
    no_bias = torch.nn.Conv2d(4, 6, 3, bias=False).state_dict()
    for m in (ours, ref):
        with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "bias"'):
            m.load_state_dict(no_bias)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize("case", CONFIGS)
def test_forward_backward_match_torch(case, padding_mode, dtype):
    in_ch, out_ch, kernel, kwargs = CONFIGS[case]
    if padding_mode != "zeros" and kwargs.get("padding", 0) in (0, "valid"):
        kwargs = dict(kwargs, padding=1)  # a padding mode needs some padding to matter
    ours, ref = make_pair(in_ch, out_ch, kernel, kwargs, padding_mode=padding_mode, dtype=dtype)
    x0 = torch.randn(2, in_ch, 9, 8, dtype=dtype)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    outs, grads = [], []
    for m in (ours, ref):
        x = x0.clone().requires_grad_()
        y = m(x)
        y.backward(torch.linspace(-2, 2, y.numel(), dtype=dtype).view(y.shape))
        outs.append(y)
        grads.append([x.grad] + [p.grad for p in m.parameters()])
    assert_close_scaled(outs[0], outs[1], rtol, "output")
    assert len(grads[0]) == len(grads[1]) == (2 if kwargs.get("bias") is False else 3)
    for a, b, what in zip(*grads, ["input", "weight", "bias"]):
        assert_close_scaled(a, b, rtol, f"grad {what}")


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_unbatched_and_channels_last(padding_mode):
    ours, ref = make_pair(3, 4, 3, dict(padding=1, padding_mode=padding_mode, stride=(1, 2)), dtype=torch.float64)
    x = torch.randn(3, 6, 7, dtype=torch.float64)
    assert_close_scaled(ours(x), ref(x), 1e-12, "unbatched")
    assert ours(x).shape == ref(x).shape == (4, 6, 4)
    ours_cl = copy.deepcopy(ours).to(memory_format=torch.channels_last)
    xb = to_layout(torch.randn(2, 3, 6, 7, dtype=torch.float64), "channels_last")
    y, y_ref = ours_cl(xb), ref(xb)
    assert_close_scaled(y, y_ref, 1e-12, "channels_last")
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_empty_batch():
    ours, ref = make_pair(3, 4, 3, dict(padding=1))
    x = torch.randn(0, 3, 5, 5, requires_grad=True)
    y = ours(x)
    assert y.shape == ref(x).shape == (0, 4, 5, 5)
    y.sum().backward()
    assert torch.count_nonzero(ours.weight.grad) == 0 and torch.count_nonzero(ours.bias.grad) == 0


def test_dtype_and_device_kwargs():
    m = cnnext.nn.Conv2d(3, 4, 3, device="cpu", dtype=torch.float64)
    assert m.weight.dtype == m.bias.dtype == torch.float64
    assert m.weight.device.type == "cpu"
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    ref = torch.nn.Conv2d(3, 4, 3, dtype=torch.float64)
    ref.load_state_dict(m.state_dict())
    assert_close_scaled(m(x), ref(x), 1e-12)
    m.float()
    assert m.weight.dtype == torch.float32
    assert m(x.float()).dtype == torch.float32


def test_meta_device_construction():
    """device='meta' builds without memory, as torch.nn.Conv2d does, and runs on the fake kernel."""
    m = cnnext.nn.Conv2d(3, 4, (3, 2), stride=2, padding=1, device="meta")
    ref = torch.nn.Conv2d(3, 4, (3, 2), stride=2, padding=1, device="meta")
    assert m.weight.is_meta and m.weight.shape == ref.weight.shape
    x = torch.empty(2, 3, 9, 8, device="meta")
    assert m(x).shape == ref(x).shape == (2, 4, 5, 5)


def test_half_modules_run_on_cpu():
    """float16 / bfloat16 modules run on the CPU and give the dtype stock gives."""
    for dtype in (torch.float16, torch.bfloat16):
        m = cnnext.nn.Conv2d(3, 4, 3, dtype=dtype)
        ref = torch.nn.Conv2d(3, 4, 3, dtype=dtype)
        ref.load_state_dict(m.state_dict())
        x = torch.randn(1, 3, 5, 5, dtype=dtype)
        y = m(x)
        assert y.dtype == dtype
        torch.testing.assert_close(y, ref(x), rtol=2e-2, atol=2e-2)


def test_dtype_mismatch_rejected():
    m = cnnext.nn.Conv2d(3, 4, 3)
    with pytest.raises(RuntimeError, match=r"expected weight to have the same dtype as input \(Double\), got Float"):
        m(torch.randn(1, 3, 5, 5, dtype=torch.float64))


@pytest.mark.parametrize("kwargs", [
    dict(groups=3),                              # 4 in_channels not divisible by 3
    dict(padding="same", stride=2),
    dict(padding="full"),
    dict(padding_mode="mirror"),
], ids=["groups", "same_strided", "padding_string", "padding_mode"])
def test_constructor_rejects_like_torch(kwargs):
    with pytest.raises(ValueError) as ref_info:
        torch.nn.Conv2d(4, 6, 3, **kwargs)
    with pytest.raises(ValueError) as info:
        cnnext.nn.Conv2d(4, 6, 3, **kwargs)
    assert str(info.value) == str(ref_info.value)


def test_train_step_matches_torch():
    """A few SGD steps on the same data leave both modules with the same weights."""
    ours, ref = make_pair(3, 4, 3, dict(padding=1, padding_mode="reflect"), dtype=torch.float64)
    xs = torch.randn(3, 2, 3, 6, 6, dtype=torch.float64)
    for m in (ours, ref):
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        for x in xs:
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        assert_close_scaled(a, b, 1e-12, name)
