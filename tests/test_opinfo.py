"""torch's own test database run against cnnext (issue 13).

The OpInfo entries of torch.testing._internal.common_methods_invocations.op_db for the
ops cnnext implements, and the ModuleInfo entries of common_modules.module_db for their
modules, drive cnnext.functional and cnnext.nn:

- every sample input (sample_inputs) in float32 and float64, as given, non-contiguous
  (SampleInput.noncontiguous) and channels_last: output (and max-pooling indices), first
  derivatives, second derivatives (double backward, grad_output included) and forward-mode
  AD (torch.func.jvp) against stock torch computed on contiguous float64 copies of the same
  values; and the memory format of the output and input gradient against stock's in the
  same layout;
- every error input (error_inputs): cnnext raises the exception type torch raises, with a
  message that names the argument at fault;
- every ModuleInfo input, in training and eval mode: the cnnext module loaded with the stock
  module's state_dict gives stock's output, gradients (input and parameters), running
  statistics, double backward and forward-mode tangent.

One test per (entry, sample, dtype, layout), so each failure is its own. The samples' values
come from torch's make_tensor under a fixed seed.

Where stock misbehaves the reference is an exact answer instead (tests/reference.py, max_pool_reference):
stock's max_pool2d backward aborts the process ("double free or corruption") when a window
lies entirely in the padding (its index points outside the plane), in either layout.
"""
import copy
import functools
import re

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.common_modules import module_db

import cnnext
import cnnext.functional as CF
import cnnext.nn as CN
from reference import assert_close as _close
from reference import assert_same_format as _same_format
from reference import channels_last as _channels_last
from reference import float64_copy as _float64_copy
from reference import max_pool_reference, window_in_padding

# OpInfo name (variant) -> the cnnext function. torch also has `max_pool2d_with_indices_backward`
# (an aten backward op, which cnnext does not expose as a function: it is reached through
# max_pool2d's backward, which every max_pool2d sample here checks).
FUNCTIONS = {
    ("nn.functional.conv2d", ""): CF.conv2d,
    ("nn.functional.conv_transpose2d", ""): CF.conv_transpose2d,
    ("nn.functional.max_pool2d", ""): CF.max_pool2d,
    ("nn.functional.avg_pool2d", ""): CF.avg_pool2d,
    ("nn.functional.adaptive_avg_pool2d", ""): CF.adaptive_avg_pool2d,
    ("nn.functional.max_unpool2d", ""): CF.max_unpool2d,
    ("nn.functional.max_unpool2d", "grad"): CF.max_unpool2d,
}
OPINFOS = {(o.name, o.variant_test_name): o for o in op_db if (o.name, o.variant_test_name) in FUNCTIONS}
assert set(OPINFOS) == set(FUNCTIONS), f"OpInfo entries missing from this torch: {set(FUNCTIONS) - set(OPINFOS)}"

DTYPES = (torch.float64, torch.float32)
LAYOUTS = ("given", "noncontiguous", "channels_last")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The samples are tiny: one intra-op thread keeps each call from waiting on a parallel
    region of a busy machine (the multi-threaded paths are covered by the parity tests)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _entry_id(key):
    name, variant = key
    return name.replace("nn.functional.", "") + (f"_{variant}" if variant else "")


# --------------------------------------------------------------------------------------------
# Samples: generated once per (entry, dtype) under a fixed seed
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _samples(key, dtype):
    torch.manual_seed(1234)
    return tuple(OPINFOS[key].sample_inputs("cpu", dtype, requires_grad=True))


def _sample_count(key, dtype):
    return len(_samples(key, dtype))


def _relayout(sample, layout):
    """(input, args, kwargs) of the sample as fresh leaves in the given layout."""
    if layout == "noncontiguous":
        sample = sample.noncontiguous()

    def fix(t):
        if not isinstance(t, torch.Tensor):
            return t
        requires_grad = t.requires_grad
        t = t.detach()
        if layout == "channels_last":
            out = _channels_last(t)
        else:  # the very strides given (some samples are sliced channels_last), as a fresh leaf
            out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype)
            out.copy_(t)
        return out.requires_grad_(requires_grad)

    return fix(sample.input), [fix(a) for a in sample.args], {k: fix(v) for k, v in sample.kwargs.items()}


def _differentiable(inp, args, kwargs):
    """The floating tensors that require grad, in argument order."""
    return [t for t in (inp, *args, *kwargs.values())
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]


def _outputs(result):
    """(differentiable output, other outputs (indices))."""
    if isinstance(result, tuple):
        return result[0], list(result[1:])
    return result, []


def _stock(key, inp, args, kwargs):
    fn = OPINFOS[key].op
    if key[0] == "nn.functional.max_pool2d" and window_in_padding(inp, *args, **kwargs):
        return max_pool_reference
    return fn


def _random_like(t, gen):
    return torch.randn(t.shape, dtype=torch.float64, generator=gen).to(t.dtype)


# --------------------------------------------------------------------------------------------
# OpInfo samples
# --------------------------------------------------------------------------------------------

def _sample_params():
    for key in FUNCTIONS:
        for dtype in DTYPES:  # (the max_unpool2d "grad" samples differ in number by dtype)
            for i in range(_sample_count(key, dtype)):
                for layout in LAYOUTS:
                    yield pytest.param(key, i, dtype, layout,
                                       id=f"{_entry_id(key)}-{i}-{str(dtype)[6:]}-{layout}")


def _run(fn, inp, args, kwargs, gen_seed):
    """Output, other outputs, first derivatives, second derivatives (of <g, v> in the inputs
    and grad_output) and the forward-mode tangent of fn at the given inputs; grad_output,
    v and the tangents drawn from gen_seed in each input's dtype, so that both sides get the
    same values (float32 ones exactly representable in float64)."""
    result = fn(inp, *args, **kwargs)
    out, extra = _outputs(result)
    diff = _differentiable(inp, args, kwargs)
    gen = torch.Generator().manual_seed(gen_seed)
    go = _random_like(out, gen).requires_grad_()
    grads = torch.autograd.grad(out, diff, go, create_graph=True, allow_unused=True)
    vs = [_random_like(t, gen) for t in diff]
    terms = [(g * v).sum() for g, v in zip(grads, vs) if g is not None and g.requires_grad]
    if terms:
        second = torch.autograd.grad(sum(terms), [*diff, go], allow_unused=True)
    else:  # grads independent of the inputs and grad_output (none here, but be exact)
        second = [None] * (len(diff) + 1)
    tangents = [_random_like(t, gen) for t in diff]

    def primal_fn(*prim):
        it = iter(prim)
        sub = lambda t: next(it) if any(t is d for d in diff) else t  # noqa: E731
        i2 = sub(inp)
        a2 = [sub(a) for a in args]
        k2 = {k: sub(v) for k, v in kwargs.items()}
        return _outputs(fn(i2, *a2, **k2))[0]

    _, tangent_out = torch.func.jvp(primal_fn, tuple(t.detach() for t in diff), tuple(tangents))
    return out, extra, grads, second, tangent_out


@pytest.mark.parametrize("key, index, dtype, layout", list(_sample_params()))
def test_opinfo_sample(key, index, dtype, layout):
    sample = _samples(key, dtype)[index]
    inp, args, kwargs = _relayout(sample, layout)
    ref_inp, ref_args, ref_kwargs = (_float64_copy(inp), [_float64_copy(a) for a in args],
                                     {k: _float64_copy(v) for k, v in kwargs.items()})
    stock = _stock(key, ref_inp, ref_args, ref_kwargs)
    seed = 1000 + index

    ours = _run(FUNCTIONS[key], inp, args, kwargs, seed)
    want = _run(stock, ref_inp, ref_args, ref_kwargs, seed)

    out, extra, grads, second, tangent = ours
    r_out, r_extra, r_grads, r_second, r_tangent = want
    _close(out, r_out, dtype, "output")
    for a, e in zip(extra, r_extra):
        _close(a, e, dtype, "indices")
    names = [f"grad[{i}]" for i in range(len(grads))]
    for a, e, name in zip(grads, r_grads, names):
        assert (a is None) == (e is None), name
        if a is not None:
            _close(a, e, dtype, name)
    for i, (a, e) in enumerate(zip(second, r_second)):
        name = "double backward " + ("grad_output" if i == len(second) - 1 else f"input {i}")
        if a is None or e is None:  # unused in one: the other must be zero
            other = a if e is None else e
            assert other is None or not other.any(), name
            continue
        _close(a, e, dtype, name)
    _close(tangent, r_tangent, dtype, "forward-mode tangent")

    # Memory formats as stock's in the same layout and dtype: the output, the input gradient.
    if stock is max_pool_reference:
        # stock's backward would abort: check the output's format, and the input gradient
        # against torch's rule for max pooling (the input's suggested memory format)
        with torch.no_grad():
            s_out = _outputs(OPINFOS[key].op(inp.detach(), *[a.detach() if isinstance(a, torch.Tensor) else a
                                                             for a in args], **kwargs))[0]
        _same_format(out, s_out, "output")
        if inp.dim() == 4 and grads[0] is not None:
            fmt = suggest_memory_format(inp)
            assert grads[0].is_contiguous(memory_format=fmt), f"input gradient strides {grads[0].stride()}"
        return
    s_inp, s_args, s_kwargs = _relayout(sample, layout)
    s_out, _ = _outputs(OPINFOS[key].op(s_inp, *s_args, **s_kwargs))
    _same_format(out, s_out, "output")
    if s_inp.requires_grad:
        s_gx, = torch.autograd.grad(s_out, s_inp, torch.ones_like(s_out))
        gx, = torch.autograd.grad(out, inp, torch.ones_like(out), retain_graph=True)
        _same_format(gx, s_gx, "input gradient")


# --------------------------------------------------------------------------------------------
# OpInfo error inputs
# --------------------------------------------------------------------------------------------

# torch's error regex (a distinctive part) -> what cnnext's message must name.
ERROR_NAMES = {
    "should be the same": "input|weight|bias",
    "non-positive stride": "stride",
    "negative padding": "padding",
    "dilation should be greater than zero": "dilation",
    "Expected 3-dimensional input for 3-dimensional weight": "weight",
    "expected weight to be at least": "weight|groups",
    "non-positive groups": "groups",
    "pad must be non-negative": "padding",
    "pad should be at most half": "padding",
    "divisor must be not zero": "divisor_override",
    "Expected 3D or 4D": "input",
    "Output size is too small": "output size|output_size|input",
    "Expected shape of indices": "indices",
    "Input dimension should be at least 3": "input",
    "output_size must be 2": "output_size",
    "elements of output_size": "output_size",
}


def _error_params():
    for key, opinfo in OPINFOS.items():
        if opinfo.error_inputs_func is None:
            continue
        for i, _ in enumerate(opinfo.error_inputs("cpu")):
            yield pytest.param(key, i, id=f"{_entry_id(key)}-{i}")


@pytest.mark.parametrize("key, index", list(_error_params()))
def test_opinfo_error_input(key, index):
    opinfo = OPINFOS[key]
    err = list(opinfo.error_inputs("cpu"))[index]
    s = err.sample_input
    with pytest.raises(err.error_type, match=err.error_regex) as stock:
        opinfo.op(s.input, *s.args, **s.kwargs)
    with pytest.raises(Exception) as ours:
        FUNCTIONS[key](s.input, *s.args, **s.kwargs)
    assert type(ours.value) is type(stock.value), \
        f"cnnext raised {type(ours.value).__name__}: {ours.value}; torch {type(stock.value).__name__}: {stock.value}"
    names = [v for k, v in ERROR_NAMES.items() if k in err.error_regex.replace("\\", "")]
    assert names, f"no argument name listed for torch's error {err.error_regex!r}"
    assert re.search(names[0], str(ours.value)), f"message does not name {names[0]}: {ours.value}"


# --------------------------------------------------------------------------------------------
# ModuleInfo entries
# --------------------------------------------------------------------------------------------

MODULES = {
    "Conv2d": CN.Conv2d,
    "ConvTranspose2d": CN.ConvTranspose2d,
    "MaxPool2d": CN.MaxPool2d,
    "AvgPool2d": CN.AvgPool2d,
    "AdaptiveAvgPool2d": CN.AdaptiveAvgPool2d,
    # BatchNorm2d has no cnnext twin by itself: its inputs run through the fused op, as
    # cnnext.fuse(nn.Sequential(nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(...))).
    "BatchNorm2d": None,
}
MODULE_INFOS = {m.module_cls.__name__: m for m in module_db if m.module_cls.__name__ in MODULES}
assert set(MODULE_INFOS) == set(MODULES)


@functools.lru_cache(maxsize=None)
def _module_inputs(name, dtype, training):
    torch.manual_seed(4321)
    info = MODULE_INFOS[name]
    return tuple(info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=training))


def _build(name, module_input, dtype, training):
    """(stock module, cnnext module), the cnnext one holding copies of the stock's state."""
    c = module_input.constructor_input
    torch.manual_seed(7)
    if name == "BatchNorm2d":
        bn = nn.BatchNorm2d(*c.args, **c.kwargs, dtype=dtype)
        ch = bn.num_features
        stock = nn.Sequential(nn.Conv2d(ch, ch, 1, bias=False, dtype=dtype), bn)
        with torch.no_grad():
            for p in bn.parameters():
                p.uniform_(0.5, 1.5)
        stock.train(training)
        ours = cnnext.fuse(copy.deepcopy(stock))
        assert isinstance(ours[0], CN.FusedConv2d), "cnnext.fuse did not fuse the conv with the batch norm"
        return stock, ours
    stock = MODULE_INFOS[name].module_cls(*c.args, **c.kwargs)
    stock = stock.to(dtype).train(training)
    ours = MODULES[name](*c.args, **c.kwargs).to(dtype)
    ours.load_state_dict(stock.state_dict())
    return stock, ours.train(training)


def _module_params():
    for name in MODULES:
        for training in (True, False):
            for i, mi in enumerate(_module_inputs(name, torch.float64, training)):
                for dtype in DTYPES:
                    for layout in ("given", "channels_last"):
                        yield pytest.param(name, training, i, dtype, layout,
                                           id=f"{name}-{'train' if training else 'eval'}-{i}-{mi.desc or 'default'}-"
                                              f"{str(dtype)[6:]}-{layout}")


def _module_run(module, x, seed, forward_ad=True, double_backward=True):
    """Output, input/parameter gradients, double backward (of <grad_input, v> in the input
    and grad_output) and forward-mode tangent in the input of module at x."""
    out = module(x)
    out, extra = _outputs(out)
    gen = torch.Generator().manual_seed(seed)
    go = _random_like(out, gen).requires_grad_()
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [x, *params], go, create_graph=double_backward, allow_unused=True)
    v = _random_like(x, gen)
    second = torch.autograd.grad((grads[0] * v).sum(), [x, go], allow_unused=True) if double_backward else ()
    t = _random_like(x, gen)
    tangent = None
    if forward_ad:
        with fwAD.dual_level():
            dual = fwAD.make_dual(x.detach(), t)
            tangent = fwAD.unpack_dual(_outputs(module(dual))[0]).tangent
    return out, extra, grads, second, tangent


@pytest.mark.parametrize("name, training, index, dtype, layout", list(_module_params()))
def test_module_info(name, training, index, dtype, layout):
    mi = _module_inputs(name, dtype, training)[index]
    x = mi.forward_input.args[0].detach()
    if layout == "channels_last":
        x = _channels_last(x)
    x = x.clone(memory_format=torch.preserve_format).requires_grad_()
    stock, ours = _build(name, mi, dtype, training)
    stock64 = copy.deepcopy(stock).double()
    x64 = x.detach().double().contiguous().requires_grad_()
    # Forward-mode AD of the fused conv+BN(+ReLU) is test_module_info_fused_forward_ad's.
    forward_ad = name != "BatchNorm2d"
    # The fused op in training has no double backward (documented): it must raise.
    double_backward = not (name == "BatchNorm2d" and (training or not ours[1].track_running_stats))
    if not double_backward:
        with pytest.raises(RuntimeError, match="double backward"):
            _module_run(copy.deepcopy(ours), x, 5, False, True)
    out, extra, grads, second, tangent = _module_run(ours, x, 5, forward_ad, double_backward)
    want = _module_run(stock64, x64, 5, forward_ad, double_backward)
    _close(out, want[0], dtype, "output")
    for a, e in zip(extra, want[1]):
        _close(a, e, dtype, "indices")
    for i, (a, e) in enumerate(zip(grads, want[2])):
        assert (a is None) == (e is None), f"gradient {i}"
        if a is not None:
            _close(a, e, dtype, f"gradient {i} ({'input' if i == 0 else 'parameter'})")
    for a, e, what in zip(second, want[3], ("input", "grad_output")):
        if a is None or e is None:  # unused in one: the other must be zero
            other = a if e is None else e
            assert other is None or not other.any(), f"double backward {what}"
            continue
        _close(a, e, dtype, f"double backward {what}")
    if forward_ad:
        _close(tangent, want[4], dtype, "forward-mode tangent")
    for (bname, a), (_, e) in zip(ours.named_buffers(), stock64.named_buffers()):
        _close(a, e if not a.is_floating_point() else e, dtype, f"buffer {bname}")
    # the output's memory format as stock's on the same input
    s_out = _outputs(stock(x.detach()))[0]
    _same_format(out, s_out, "output")


@pytest.mark.parametrize("training", [True, False])
def test_module_info_fused_forward_ad(training):
    mi = _module_inputs("BatchNorm2d", torch.float64, training)[0]
    x = mi.forward_input.args[0].detach()
    stock, ours = _build("BatchNorm2d", mi, torch.float64, training)
    t = _random_like(x, torch.Generator().manual_seed(3))
    tangents = []
    for module in (ours, stock):
        with fwAD.dual_level():
            tangents.append(fwAD.unpack_dual(module(fwAD.make_dual(x, t))).tangent)
    _close(tangents[0], tangents[1], torch.float64, "forward-mode tangent")


def _module_error_params():
    for name, info in MODULE_INFOS.items():
        if info.module_error_inputs_func is None:
            continue
        errs = info.module_error_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=False,
                                             training=True)
        for i, _ in enumerate(errs):
            yield pytest.param(name, i, id=f"{name}-{i}")


@pytest.mark.parametrize("name, index", list(_module_error_params()))
def test_module_info_error_input(name, index):
    info = MODULE_INFOS[name]
    err = list(info.module_error_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=False,
                                             training=True))[index]
    mi = err.module_error_input
    c, f = mi.constructor_input, mi.forward_input

    def build_and_run(make):
        module = make(c)
        return module(*f.args, **f.kwargs)

    if name == "BatchNorm2d":
        def make_stock(c):
            return nn.BatchNorm2d(*c.args, **c.kwargs)

        def make_ours(c):
            bn = nn.BatchNorm2d(*c.args, **c.kwargs)
            ch = bn.num_features
            model = cnnext.fuse(nn.Sequential(nn.Conv2d(ch, ch, 1, bias=False), bn))
            assert isinstance(model[0], CN.FusedConv2d)
            return model
    else:
        def make_stock(c):
            return info.module_cls(*c.args, **c.kwargs)

        def make_ours(c):
            return MODULES[name](*c.args, **c.kwargs)

    with pytest.raises(err.error_type, match=err.error_regex) as stock:
        build_and_run(make_stock)
    with pytest.raises(Exception) as ours:
        build_and_run(make_ours)
    assert type(ours.value) is type(stock.value), \
        f"cnnext raised {type(ours.value).__name__}: {ours.value}; torch {type(stock.value).__name__}: {stock.value}"
    word = {"eps must be positive": "eps", "non-empty 3D or 4D": "input", "pad should be at most half": "padding"}
    names = [v for k, v in word.items() if k in err.error_regex.replace("\\", "")]
    assert names and re.search(names[0], str(ours.value)), f"message does not name {names}: {ours.value}"
