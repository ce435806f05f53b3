"""The CPU weight cache (csrc/cpu/derived_cache.h): the fused op's folded batch norm and
Winograd's transformed weight are reused only while every source is provably unchanged.

Every case checks the result against the same call with the cache emptied first (bitwise:
a hit must give exactly what a recomputation gives) and asserts through the path counters
whether the cache hit or missed. The sources are snapshotted on the second call that sees
them at the same versions, so the first hit is the third call of an evaluation."""
import math
import threading

import pytest
import torch
import torch.nn.functional as F

import cnnext
import cnnext.backends.cpu as cpu_backend
from cnnext import _C
from cnnext._paths import counts, expect_path
from cnnext.functional import conv2d, conv_bn_relu2d

FOLD_HIT, FOLD_MISS = "conv_bn_relu2d.fold_cache_hit", "conv_bn_relu2d.fold_cache_miss"
WINO_HIT, WINO_MISS = "conv2d.winograd.weight_cache_hit", "conv2d.winograd.weight_cache_miss"
WINOGRAD = _C._winograd_available()


def ran(fn):
    before = counts()
    out = fn()
    after = counts()
    return out, {k for k, v in after.items() if v != before.get(k, 0)}


def fresh(fn):
    """fn() computed with the cache emptied first (the reference a hit must equal)."""
    cpu_backend.clear_weight_cache()
    return fn()


class Layer:
    """The fused op's inference arguments, float32, on a shape Winograd takes."""

    def __init__(self, c=32, o=32, hw=14, n=2, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, c, hw, hw, generator=g)
        self.w = torch.randn(o, c, 3, 3, generator=g) * math.sqrt(2.0 / (c * 9))
        self.b = torch.randn(o, generator=g) * 0.1
        self.gamma = torch.rand(o, generator=g) + 0.5
        self.beta = torch.randn(o, generator=g) * 0.1
        self.rm = torch.randn(o, generator=g) * 0.1
        self.rv = torch.rand(o, generator=g) + 0.5
        self.eps = 1e-5

    def sources(self):
        return {"weight": self.w, "bias": self.b, "bn_weight": self.gamma, "bn_bias": self.beta,
                "running_mean": self.rm, "running_var": self.rv}

    def __call__(self):
        return conv_bn_relu2d(self.x, self.w, self.b, self.gamma, self.beta, self.rm, self.rv, False,
                              eps=self.eps, padding=1)

    def reference(self):
        y = F.conv2d(self.x.double(), self.w.double(), self.b.double(), padding=1)
        y = F.batch_norm(y, self.rm.double(), self.rv.double(), self.gamma.double(), self.beta.double(),
                         False, 0.0, self.eps)
        return y.relu()


@pytest.fixture(autouse=True)
def _empty_cache():
    cpu_backend.clear_weight_cache()
    yield
    cpu_backend.clear_weight_cache()


def test_fold_hits_and_equals_a_recomputation():
    layer = Layer()
    with torch.no_grad():
        with expect_path(FOLD_MISS):
            y1 = layer()
        with expect_path(FOLD_MISS):  # the second sighting: recomputed, sources snapshotted
            layer()
        with expect_path(FOLD_HIT):
            y2 = layer()
    # The folded weight and the snapshot of its source (read before fresh() empties the
    # cache: after it a first sighting holds no snapshot yet).
    entries, nbytes = cpu_backend.weight_cache_info()
    assert entries >= 1 and nbytes >= 2 * layer.w.numel() * 4
    assert torch.equal(y1, y2)
    assert torch.equal(y2, fresh(layer))
    ref = layer.reference()
    assert ((y2.double() - ref).abs().max() / ref.abs().max()).item() <= 2e-5


@pytest.mark.skipif(not WINOGRAD, reason="Winograd runs on CPUs with AVX-512F or AVX2 + FMA only")
def test_folded_weight_reaches_the_winograd_cache():
    """The folded weight is the cache's own tensor, so Winograd's transform of it is cached
    too: the third call (the fold's first hit) runs neither the fold nor the transform."""
    layer = Layer(c=64, o=64, hw=28)
    with torch.no_grad(), cpu_backend.flags(winograd=True):
        _, paths = ran(layer)
        assert {FOLD_MISS, WINO_MISS} <= paths
        _, paths = ran(layer)
        assert {FOLD_MISS, WINO_MISS} <= paths
        _, paths = ran(layer)
        assert {FOLD_HIT, WINO_HIT} <= paths and not paths & {FOLD_MISS, WINO_MISS}


@pytest.mark.parametrize("name", ["weight", "bias", "bn_weight", "bn_bias", "running_mean", "running_var"])
@pytest.mark.parametrize("how", ["inplace", "data", "replace"])
def test_fold_sees_every_change_of_every_source(name, how):
    """A change of any of the six sources is seen: in place (bumps the version), through
    .data (does not: the byte comparison sees it) and a new tensor in its place."""
    layer = Layer()
    with torch.no_grad():
        layer()
        layer()
        src = layer.sources()[name]
        if how == "inplace":
            src.mul_(1.5)
        elif how == "data":
            before = src._version
            src.data.mul_(1.5)
            assert src._version == before  # the case a version counter cannot see
        else:
            setattr(layer, {"weight": "w", "bias": "b", "bn_weight": "gamma", "bn_bias": "beta",
                            "running_mean": "rm", "running_var": "rv"}[name], src * 1.5)
        with expect_path(FOLD_MISS):
            y = layer()
    assert torch.equal(y, fresh(layer))
    ref = layer.reference()
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() <= 2e-5


@pytest.mark.skipif(not WINOGRAD, reason="Winograd runs on CPUs with AVX-512F or AVX2 + FMA only")
@pytest.mark.parametrize("how", ["inplace", "data", "data_one_element", "set"])
def test_winograd_cache_sees_writes_through_data(how):
    x = torch.randn(2, 32, 14, 14)
    conv = cnnext.nn.Conv2d(32, 32, 3, padding=1).eval()
    with torch.no_grad(), cpu_backend.flags(winograd=True):
        with expect_path(WINO_MISS):
            y0 = conv(x)
        with expect_path(WINO_MISS):
            assert torch.equal(conv(x), y0)
        with expect_path(WINO_HIT):
            assert torch.equal(conv(x), y0)
        if how == "inplace":
            conv.weight.mul_(-1)
        elif how == "data":
            conv.weight.data.mul_(-1)
        elif how == "data_one_element":
            conv.weight.data[5, 7, 2, 1] += 1.0  # one element of 9216
        else:
            conv.weight.data = -conv.weight.data  # a new storage under the same tensor
        with expect_path(WINO_MISS):
            y = conv(x)
    assert not torch.equal(y, y0)
    assert torch.equal(y, fresh(lambda: conv2d(x, conv.weight.detach(), conv.bias.detach(), 1, 1)))


def test_eps_is_part_of_the_key():
    layer = Layer()
    with torch.no_grad():
        y1 = layer()
        layer.eps = 1e-3
        with expect_path(FOLD_MISS):
            y2 = layer()
    assert not torch.equal(y1, y2)
    assert torch.equal(y2, fresh(layer))


def test_inference_mode_caches_ordinary_parameters():
    """Under torch.inference_mode the parameters (made outside it) are cached, and the
    folded weight is an ordinary tensor, so Winograd caches its transform as well."""
    layer = Layer(c=64, o=64, hw=28)
    with torch.inference_mode():
        y1 = layer()
        layer()
        with expect_path(FOLD_HIT):
            y2 = layer()
        if WINOGRAD:
            _, paths = ran(layer)
            assert WINO_MISS not in paths
    assert torch.equal(y1, y2)


def test_inference_tensors_are_never_cached():
    """Tensors made inside inference mode have no version counter: computed every call."""
    with torch.inference_mode():
        layer = Layer()
        entries = cpu_backend.weight_cache_info()[0]
        with expect_path(FOLD_MISS):
            y1 = layer()
        layer.w.mul_(2)  # allowed in inference mode; no version counter to see it
        for _ in range(3):
            with expect_path(FOLD_MISS):
                y2 = layer()
        # Nothing kept for the fold; at most the entry of the last call's folded weight in
        # Winograd's transform, which goes with it.
        assert cpu_backend.weight_cache_info()[0] <= entries + 1
    assert not torch.equal(y1, y2)
    assert torch.equal(y2, fresh(layer))


def test_entries_go_with_their_weights():
    layers = [Layer(seed=s) for s in range(3)]
    with torch.no_grad():
        for layer in layers:
            layer()
    entries = cpu_backend.weight_cache_info()[0]
    assert entries >= 3
    del layers, layer  # the loop variable held the last one
    with torch.no_grad():
        Layer(seed=9)()  # a lookup drops the entries of freed sources
    assert cpu_backend.weight_cache_info()[0] <= entries - 2
    cpu_backend.clear_weight_cache()
    assert cpu_backend.weight_cache_info() == (0, 0)


def test_model_eval_after_training_steps():
    """ConvBNReLU in eval between SGD steps: never the previous step's weights."""
    torch.manual_seed(0)
    block = cnnext.nn.ConvBNReLU2d(16, 16, 3, padding=1)
    ref = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU())
    ref[0].load_state_dict(block[0].state_dict())
    x = torch.randn(4, 16, 10, 10)
    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    for _ in range(3):
        block.train()
        opt.zero_grad()
        block(x).square().mean().backward()
        opt.step()
        block.eval()
        ref.load_state_dict(block.state_dict())
        ref.eval()
        with torch.no_grad():
            y = block(x)
            y_again = block(x)
            y_ref = ref(x)
        assert torch.equal(y, y_again)
        assert torch.allclose(y, y_ref, rtol=1e-4, atol=1e-5)


def test_threads_share_entries_safely():
    """Threads calling the same layers at once (one changing a weight between calls) all
    get the result of the weights they saw."""
    layers = [Layer(seed=s) for s in range(2)]
    with torch.no_grad():
        expected = [fresh(layer) for layer in layers]
    errors = []

    def work(i):
        try:
            with torch.no_grad():
                for _ in range(20):
                    y = layers[i % 2]()
                    if not torch.equal(y, expected[i % 2]):
                        errors.append(i)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.skipif(not WINOGRAD, reason="Winograd runs on CPUs with AVX-512F or AVX2 + FMA only")
def test_snapshot_only_on_the_second_sighting():
    """A weight whose version moves on between calls (training) is never copied; two calls at
    one version (evaluation) snapshot it once, and the third hits."""
    x = torch.randn(2, 32, 14, 14)
    w = torch.randn(32, 32, 3, 3) * 0.1
    call = lambda: conv2d(x, w, None, 1, 1)
    with torch.no_grad(), cpu_backend.flags(winograd=True):
        with expect_path(WINO_MISS):
            call()
        _, pending = cpu_backend.weight_cache_info()
        for _ in range(3):  # optimizer-like steps: a new version every call
            w.add_(0.01)
            with expect_path(WINO_MISS):
                call()
            assert cpu_backend.weight_cache_info()[1] == pending  # the value's buffer, no copy
        with expect_path(WINO_MISS):
            call()  # the second sighting of this version
        assert cpu_backend.weight_cache_info()[1] == pending + w.numel() * w.element_size()
        with expect_path(WINO_HIT):
            y = call()
    assert torch.equal(y, fresh(call))


@pytest.mark.skipif(not WINOGRAD, reason="Winograd runs on CPUs with AVX-512F or AVX2 + FMA only")
def test_write_through_data_between_sightings():
    """A write the version counter cannot see, between the first and second call, is in the
    second call's value and in its snapshot: the third call hits on the new weight."""
    x = torch.randn(2, 32, 14, 14)
    w = torch.randn(32, 32, 3, 3) * 0.1
    call = lambda: conv2d(x, w, None, 1, 1)
    with torch.no_grad(), cpu_backend.flags(winograd=True):
        y0 = call()
        w.data.mul_(-1)
        with expect_path(WINO_MISS):
            y1 = call()
        with expect_path(WINO_HIT):
            y2 = call()
        w.data[3, 4, 1, 1] += 1.0
        with expect_path(WINO_MISS):
            y3 = call()
    assert torch.equal(y0, -y1) and torch.equal(y1, y2)
    assert torch.equal(y3, fresh(call))
