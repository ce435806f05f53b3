"""conv_bn_relu2d on CUDA: parity with the stock triple computed in float64 on the CPU from
the very (rounded) values the CUDA run sees, for float16, bfloat16, float32 and float64.

Every test needs a GPU and a cnnext build with CUDA kernels, and skips itself otherwise.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnext
from cnnext.functional import conv_bn_relu2d
from cnnext.nn import ConvBNReLU2d

HAS_CUDA = torch.cuda.is_available() and bool(cnnext.build_info()["cuda"])
pytestmark = [
    pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a cnnext build with CUDA kernels"),
    pytest.mark.usefixtures("strict_fp32"),
]


ops = torch.ops.cnnext

# Relative to the largest magnitude of the reference. The half types store the pre-BN
# convolution output in their own precision, which the normalisation then magnifies by
# 1/std: their bounds are looser than conv2d's.
RTOL = {torch.float64: 1e-10, torch.float32: 5e-5, torch.float16: 2e-2, torch.bfloat16: 8e-2}
DTYPES = tuple(RTOL)

# (N, C, H, W), out_channels, kernel, stride, padding, dilation, groups, bias, relu
CONFIGS = [
    ((2, 3, 8, 9), 4, 3, 1, 1, 1, 1, True, True),
    ((2, 4, 9, 7), 6, (3, 2), (2, 1), (0, 1), (1, 2), 2, False, True),
    ((3, 6, 6, 6), 6, 3, 1, 1, 1, 6, True, False),     # depthwise, no ReLU
    ((4, 16, 14, 14), 32, 3, 1, 1, 1, 1, True, True),  # several blocks per channel reduction
]


def assert_close_scaled(actual, expected, rtol, what):
    assert actual.shape == expected.shape, what
    if expected.numel() == 0:
        return
    scale = max(expected.abs().max().item(), 1e-30)
    err = (actual.detach().double().cpu() - expected).abs().max().item()
    assert err <= rtol * scale, f"{what}: max abs error {err:.3e} > {rtol:g} * {scale:.3e}"


def make(cfg, dtype, layout):
    shape, o, k, s, p, d, g, bias, relu = cfg
    k = (k, k) if isinstance(k, int) else k
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.randn(o, shape[1] // g, *k, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(o, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    gamma = (torch.rand(o, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    beta = torch.randn(o, generator=gen, dtype=torch.float64).to(dtype)
    rm = torch.randn(o, generator=gen, dtype=torch.float64).to(dtype)
    rv = (torch.rand(o, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return [x, w, b, gamma, beta, rm, rv], dict(stride=s, padding=p, dilation=d, groups=g), relu


def run(fn, tensors, training, kw, relu, gy):
    x, w, b, gamma, beta, rm, rv = tensors
    leaves = [t.requires_grad_() for t in (x, w, b, gamma, beta) if t is not None]
    y = fn(x, w, b, gamma, beta, rm, rv, training, 0.2, 1e-3, relu=relu, **kw)
    return [y.detach(), *torch.autograd.grad(y, leaves, gy.to(y.dtype).to(y.device))], rm, rv


def reference(x, w, b, gamma, beta, rm, rv, training, momentum, eps, relu=True, stride=1, padding=0, dilation=1,
              groups=1):
    y = F.batch_norm(F.conv2d(x, w, b, stride, padding, dilation, groups), rm, rv, gamma, beta, training, momentum,
                     eps)
    return F.relu(y) if relu else y


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_parity(cfg, dtype, layout, training):
    tensors, kw, relu = make(cfg, dtype, layout)
    ref_in = [t.detach().double().clone() if t is not None else None for t in tensors]
    cuda_in = [t.detach().cuda() if t is not None else None for t in tensors]
    y_ref = reference(*[t.detach().clone() if t is not None else None for t in ref_in], training, 0.2, 1e-3, relu,
                      **kw)
    gy = torch.randn(y_ref.shape, dtype=torch.float64).to(dtype).double()
    ours, rm, rv = run(conv_bn_relu2d, cuda_in, training, kw, relu, gy)
    ref, rm_ref, rv_ref = run(reference, ref_in, training, kw, relu, gy)
    names = ["output", "grad_input", "grad_weight"] + (["grad_bias"] if cfg[7] else []) + ["grad_bn_weight",
                                                                                         "grad_bn_bias"]
    for name, a, e in zip(names, ours, ref):
        assert a.dtype == dtype and a.is_cuda
        if name == "grad_bias" and training:
            continue  # zero up to rounding in both
        assert_close_scaled(a, e, RTOL[dtype], f"{name} {dtype} {layout}")
    if layout == "channels_last":
        assert ours[0].is_contiguous(memory_format=torch.channels_last)
    assert_close_scaled(rm, rm_ref, RTOL[dtype], "running_mean")
    assert_close_scaled(rv, rv_ref, RTOL[dtype], "running_var")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_cpu_backend(dtype):
    tensors, kw, relu = make(CONFIGS[3], dtype, "contiguous")
    gy = torch.randn(4, 32, 14, 14, dtype=dtype)
    cpu, _, _ = run(conv_bn_relu2d, [t.clone() if t is not None else None for t in tensors], True, kw, relu, gy)
    gpu, _, _ = run(conv_bn_relu2d, [t.cuda() if t is not None else None for t in tensors], True, kw, relu, gy)
    for a, e in zip(gpu, cpu):
        assert_close_scaled(a, e.double(), RTOL[dtype], "cpu vs cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_module_and_deterministic(dtype):
    m = ConvBNReLU2d(8, 16, 3, padding=1).cuda().to(dtype)
    x = torch.randn(4, 8, 12, 12, device="cuda", dtype=dtype)
    y1, y2 = m(x), m(x)
    assert torch.equal(y1, y2)
    assert m.bn.num_batches_tracked.item() == 2
    m.eval()
    assert m(x).dtype == dtype


def test_empty_batch():
    m = ConvBNReLU2d(3, 4, 3).cuda()
    x = torch.randn(0, 3, 5, 5, device="cuda", requires_grad=True)
    y = m(x)
    y.sum().backward()
    assert y.shape == (0, 4, 3, 3) and torch.count_nonzero(m.conv.weight.grad) == 0


@pytest.mark.parametrize("where", ["weight", "bn_weight", "running_mean"])
def test_mixed_devices_raise(where):
    tensors, kw, relu = make(CONFIGS[0], torch.float32, "contiguous")
    tensors = [t.cuda() if t is not None else None for t in tensors]
    index = {"weight": 1, "bn_weight": 3, "running_mean": 5}[where]
    tensors[index] = tensors[index].cpu()
    with pytest.raises(RuntimeError, match=f"expected {where} to be on the same device as input"):
        conv_bn_relu2d(*tensors, False, **kw)


def test_opcheck():
    tensors, kw, relu = make(CONFIGS[1], torch.float32, "contiguous")
    x, w, b, gamma, beta, rm, rv = [t.cuda() if t is not None else None for t in tensors]
    conf = ([2, 1], [0, 1], [1, 2], 2)
    for args in [(x, w, b, gamma, beta, 1e-3, *conf, True)]:
        r = torch.library.opcheck(ops.conv_bn_relu2d_train.default, args)
        assert set(r.values()) == {"SUCCESS"}, r
    r = torch.library.opcheck(ops.conv_bn_relu2d_eval.default, (x, w, b, gamma, beta, rm, rv, 1e-3, *conf, True))
    assert set(r.values()) == {"SUCCESS"}, r
    out, conv_out, mean, var = ops.conv_bn_relu2d_train(x, w, b, gamma, beta, 1e-3, *conf, True)
    r = torch.library.opcheck(ops.conv_bn_relu2d_train_backward.default,
                              (torch.randn_like(out), out, conv_out, mean, var, gamma, 1e-3, True))
    assert set(r.values()) == {"SUCCESS"}, r


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fuse_on_cuda_half_types(dtype):
    """A fused half-precision model follows the stock one (train step, then eval)."""
    import copy
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1),
                        nn.BatchNorm2d(4)).cuda().to(dtype)
    fused = cnnext.fuse(copy.deepcopy(ref))
    assert sum(isinstance(m, ConvBNReLU2d) for m in fused.modules()) == 2
    x = torch.randn(4, 3, 10, 10, device="cuda").to(dtype)
    for train in (True, False):
        ref.train(train), fused.train(train)
        y_ref, y = ref(x).double().cpu(), fused(x)
        assert_close_scaled(y, y_ref, 2 * RTOL[dtype], f"train={train}")
    for a, b in zip(ref.buffers(), fused.buffers()):
        assert_close_scaled(b.float(), a.double().cpu(), 2 * RTOL[dtype], "buffer")
