"""`python -m cnnext train` and cnnext.train.fit: files, exact resume, backend parity,
DDP under torchrun, the data pipeline and the error messages. Short runs on digits."""
import csv
import os
import socket
import subprocess
import sys

import pytest
import torch

from cnnext.__main__ import main
from cnnext.models import MODELS
from cnnext.train import CheckpointError, DataError, OptionError, accepted_sizes, fit, load_checkpoint, load_data
from cnnext.train.data import Batches, import_torchvision
from cnnext.train.loop import _rng_state, _set_rng_state

# tqdm, matplotlib and scikit-learn are dependencies of cnnext[train] (the README installs
# them): these tests fail rather than skip without them. torchvision is optional: its
# tests skip when it does not import.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def small_digits(monkeypatch):
    """digits cut to its first 384 training and 96 test images: the float64 runs take a
    quarter of the time. In this process only (not in torchrun's)."""
    import cnnext.train.data as data

    full = data._digits

    def small():
        train, test, classes = full()
        return (data.Split(train.images[:384], train.labels[:384]), data.Split(test.images[:96], test.labels[:96]),
                classes)

    monkeypatch.setattr(data, "_digits", small)


def cli(capsys, *args):
    """Runs `python -m cnnext train ARGS` in this process: (exit status, stdout, stderr)."""
    try:
        code = main(["train", *args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def torchvision_or_skip():
    try:
        return import_torchvision()
    except DataError as e:
        pytest.skip(str(e))


# ---------------------------------------------------------------------------- the command

def test_cli_trains_writes_files_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = cli(capsys, "lenet", "--data", "digits", "--epochs", "2", "--out", str(out))
    assert code == 0, err
    assert "lenet (cnnext) on digits: 1437 training / 360 test images, 1x32x32, 10 classes" in stdout
    assert "epoch 1/2  train loss" in stdout and "epoch 2/2  train loss" in stdout
    assert "img_s=" in err and "epoch 1/2" in err  # the tqdm bar, on stderr
    assert "final test accuracy" in stdout and "<- predicted" in stdout
    metrics = rows(out / "metrics.csv")
    assert metrics[0] == ["epoch", "train_loss", "train_acc", "test_acc", "seconds"]
    assert [r[0] for r in metrics[1:]] == ["1", "2"]
    assert float(metrics[2][3]) > 0.5  # it learns: 2 epochs on digits are far above chance (0.1)
    assert float(metrics[2][1]) < float(metrics[1][1])
    with open(out / "curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    confusion = rows(out / "confusion.csv")
    assert len(confusion) == 11 and sum(int(v) for r in confusion[1:] for v in r[1:]) == 360
    ckpt = load_checkpoint(str(out / "checkpoint.pt"))
    assert ckpt["epoch"] == 2 and ckpt["options"]["net"] == "lenet" and ckpt["optimizer"]["state"]

    code, stdout, err = cli(capsys, "--resume", str(out / "checkpoint.pt"), "--epochs", "3", "--no-progress")
    assert code == 0, err
    assert f"resuming from {out / 'checkpoint.pt'} at epoch 3 of 3" in stdout
    assert "epoch 1/" not in stdout and "epoch 3/3  train loss" in stdout
    assert err == ""
    resumed = rows(out / "metrics.csv")
    assert resumed[:3] == metrics and [r[0] for r in resumed[1:]] == ["1", "2", "3"]
    assert load_checkpoint(str(out / "checkpoint.pt"))["epoch"] == 3


def _tiny_dropout_net(in_channels=1, num_classes=10, backend="cnnext"):
    """A small network with dropout, on 8x8 input: its masks make a resume depend on the RNG states."""
    from cnnext.models import Layers

    L = Layers(backend)
    return torch.nn.Sequential(L.conv(in_channels, 8, 3, padding=1), torch.nn.ReLU(), L.max_pool(2, 2),
                               torch.nn.Flatten(), torch.nn.Dropout(0.3), torch.nn.Linear(8 * 4 * 4, num_classes))


@pytest.fixture
def tiny_dropout_net(monkeypatch):
    from cnnext.models import ModelSpec

    monkeypatch.setitem(MODELS, "tiny", ModelSpec("tiny", _tiny_dropout_net, 8, False, True))


@pytest.mark.parametrize("net", ["lenet", "tiny"])
def test_resume_is_exact_float64(tmp_path, small_digits, tiny_dropout_net, net):
    """2 epochs, then a resume to 4, equals 4 epochs straight: metrics and parameters.
    Momentum, a step schedule that decays after epoch 3 (a scheduler started afresh on
    resume would decay after epoch 5) and, for the tiny net, dropout masks (the RNG
    states) must all come back from the checkpoint."""
    opts = dict(epochs=4, dtype="float64", schedule="step", lr_step=3, lr_gamma=0.2, lr=0.05, batch_size=64,
                progress=False, seed=3, log=None)
    straight = fit(net, "digits", **opts)
    fit(net, "digits", out=str(tmp_path / "b"), **{**opts, "epochs": 2})
    resumed = fit(resume=str(tmp_path / "b" / "checkpoint.pt"), epochs=4, log=None, progress=False)
    assert resumed.start_epoch == 3 and resumed.options.schedule == "step" and resumed.options.dtype == "float64"
    key = ("epoch", "train_loss", "train_acc", "test_acc")
    assert [[r[k] for k in key] for r in resumed.history] == [[r[k] for k in key] for r in straight.history]
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(straight.confusion, resumed.confusion)


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    import random

    import numpy as np

    state = _rng_state(torch.device("cpu"))
    expected = (torch.rand(3), np.random.rand(3), random.random())
    path = tmp_path / "rng.pt"
    torch.save(state, path)
    torch.rand(5), np.random.rand(5), random.random()
    _set_rng_state(torch.load(path, weights_only=True), torch.device("cpu"))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and (got[1] == expected[1]).all() and got[2] == expected[2]


def test_backends_give_the_same_float64_losses(small_digits):
    common = dict(epochs=2, dtype="float64", batch_size=64, progress=False, log=None, seed=1)
    a = fit("lenet", "digits", backend="cnnext", **common)
    b = fit("lenet", "digits", backend="torch", **common)
    for ra, rb in zip(a.history, b.history):
        assert abs(ra["train_loss"] - rb["train_loss"]) <= 1e-10 * abs(rb["train_loss"])
        assert ra["train_acc"] == rb["train_acc"] and ra["test_acc"] == rb["test_acc"]
    assert a.history[1]["train_loss"] < a.history[0]["train_loss"]
    for (name, p), (_, q) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.allclose(p, q, rtol=1e-9, atol=1e-12), name


def test_amp_with_the_cnnext_backend():
    """--amp with cnnext's ops: bfloat16 autocast on the CPU, float32 parameters, and it learns
    as the torch backend does."""
    r = fit("lenet", "digits", epochs=1, backend="cnnext", amp=True, batch_size=128, progress=False, log=None)
    ref = fit("lenet", "digits", epochs=1, backend="torch", amp=True, batch_size=128, progress=False, log=None)
    assert r.options.amp and r.model[0].weight.dtype == torch.float32
    assert type(r.model[0]).__module__.startswith("cnnext")
    assert abs(r.history[0]["train_loss"] - ref.history[0]["train_loss"]) <= 0.05 * ref.history[0]["train_loss"]
    assert r.history[0]["train_acc"] > 0.1


def test_amp_with_the_torch_backend_and_channels_last():
    r = fit("lenet", "digits", epochs=1, backend="torch", amp=True, channels_last=True, batch_size=128,
            progress=False, log=None)
    assert r.options.amp and torch.isfinite(torch.tensor(r.history[0]["train_loss"]))
    assert r.model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert r.history[0]["train_acc"] > 0.1


def test_torchrun_two_processes_write_one_metrics_file(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "-m", "cnnext", "train", "lenet", "--data", "digits", "--epochs", "1", "--batch-size", "128",
           "--no-progress", "--out", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("epoch 1/1  train loss") == 1, p.stdout  # rank 0 alone logs
    assert "2 processes (DDP, gloo)" in p.stdout
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "confusion.csv", "curves.png", "metrics.csv"]
    metrics = rows(out / "metrics.csv")
    assert len(metrics) == 2 and metrics[1][0] == "1"
    # the test accuracy is over all 360 test images, summed over both ranks
    assert sum(int(v) for r in rows(out / "confusion.csv")[1:] for v in r[1:]) == 360
    assert load_checkpoint(str(out / "checkpoint.pt"))["world_size"] == 2


# ---------------------------------------------------------------------------- data

def test_digits_split_and_normalised_batches():
    ds = load_data("digits", 32)
    assert (len(ds.train), len(ds.test), ds.in_channels, ds.num_classes) == (1437, 360, 1, 10)
    b = Batches(ds, "train", 2000, 32, torch.float64, "cpu", shuffle=True, seed=0)
    b.set_epoch(1)
    (x, y), = list(b)
    assert x.shape == (1437, 1, 32, 32) and x.dtype == torch.float64
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.1
    assert torch.equal(torch.bincount(y), torch.bincount(ds.train.labels))


def test_batch_order_is_a_function_of_seed_and_epoch_and_ranks_partition_the_data():
    ds = load_data("digits", 8)

    def labels(epoch, rank=0, world=1, shuffle=True, seed=0):
        b = Batches(ds, "train" if shuffle else "test", 64, 8, torch.float32, "cpu", shuffle=shuffle, seed=seed,
                    rank=rank, world=world)
        b.set_epoch(epoch)
        return torch.cat([x.flatten(1) for x, _ in b])

    assert torch.equal(labels(2), labels(2))
    assert not torch.equal(labels(2), labels(3)) and not torch.equal(labels(2), labels(2, seed=1))
    both = torch.cat([labels(2, 0, 2), labels(2, 1, 2)])
    assert len(both) == 1438  # 1437 split over 2 ranks: one sample repeated (DistributedSampler)
    assert len(torch.unique(both, dim=0)) == len(torch.unique(labels(2), dim=0))
    test = torch.cat([labels(0, r, 2, shuffle=False) for r in (0, 1)])
    assert len(test) == 360 and len(torch.unique(test, dim=0)) == len(torch.unique(labels(0, shuffle=False), dim=0))


def _png_tree(root, n=6, size=12):
    from PIL import Image

    for c, value in (("dark", 30), ("light", 220)):
        os.makedirs(root / c)
        for i in range(n):
            px = bytes([value + (i * 3) % 20, 40, 255 - value] * size * size)
            Image.frombytes("RGB", (size, size), px).save(root / c / f"{i}.png")


def test_folder_data_trains_with_three_channels(tmp_path):
    torchvision_or_skip()
    _png_tree(tmp_path / "imgs")
    r = fit("lenet", f"folder:{tmp_path / 'imgs'}", epochs=2, batch_size=4, progress=False, log=None, lr=0.01)
    assert r.classes == ["dark", "light"] and r.model[0].weight.shape[1] == 3
    assert int(r.confusion.sum()) == 2  # 20% of 12 images held out
    assert r.history[-1]["train_loss"] < r.history[0]["train_loss"] + 1.0


def test_folder_with_train_and_test_subfolders(tmp_path):
    torchvision_or_skip()
    _png_tree(tmp_path / "d" / "train", n=4)
    _png_tree(tmp_path / "d" / "test", n=3)
    r = fit("lenet", f"folder:{tmp_path / 'd'}", epochs=1, batch_size=4, workers=1, progress=False, log=None)
    assert int(r.confusion.sum()) == 6


def test_torchvision_dataset_missing_says_to_download(tmp_path, capsys):
    torchvision_or_skip()
    code, _, err = cli(capsys, "lenet", "--data", "mnist", "--data-root", str(tmp_path), "--epochs", "1",
                       "--out", str(tmp_path / "o"))
    assert code == 2
    assert f"MNIST is not in {tmp_path}: run again with --download" in err and "--data digits works offline" in err


def _write_mnist(root, n_train=96, n_test=32):
    """A tiny MNIST in torchvision's raw idx format: class k is a bright square at a place of its own."""
    import struct

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.arange(n) % 10
        images = torch.zeros(n, 28, 28, dtype=torch.uint8)
        for i, k in enumerate(labels.tolist()):
            r, c = 2 + 8 * (k // 3), 2 + 8 * (k % 3)
            images[i, r:r + 6, c:c + 6] = 200 + i % 50
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">iiii", 2051, n, 28, 28)
                                                           + images.numpy().tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 2049, n)
                                                           + labels.to(torch.uint8).numpy().tobytes())


def test_mnist_from_torchvision_files(tmp_path):
    torchvision_or_skip()
    _write_mnist(tmp_path)
    ds = load_data("mnist", 32, root=str(tmp_path))
    assert (len(ds.train), len(ds.test), ds.in_channels, ds.num_classes) == (96, 32, 1, 10)
    assert ds.train.images.dtype == torch.uint8 and ds.train.images.shape == (96, 1, 28, 28)
    r = fit("lenet", "mnist", data_root=str(tmp_path), epochs=3, batch_size=16, progress=False, log=None)
    assert int(r.confusion.sum()) == 32 and r.history[-1]["train_acc"] > 0.3


def test_torchvision_download_offline_says_what_to_do(tmp_path, capsys, monkeypatch):
    tv = torchvision_or_skip()

    def offline(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried http://...")

    monkeypatch.setattr(tv.datasets.FashionMNIST, "download", offline)
    code, _, err = cli(capsys, "lenet", "--data", "fashion-mnist", "--download", "--data-root", str(tmp_path),
                       "--epochs", "1", "--out", str(tmp_path / "o"))
    assert code == 2
    assert (f"could not download FashionMNIST into {tmp_path} (Error downloading train-images-idx3-ubyte.gz:): "
            "this machine may be offline") in err


# ---------------------------------------------------------------------------- errors

@pytest.mark.parametrize("args, message", [
    (["resnet50"], "unknown network 'resnet50'; expected one of lenet, alexnet, vgg11, nin, googlenet, resnet18"),
    (["lenet", "--data", "imagenet"], "unknown dataset 'imagenet'; expected one of digits, mnist, fashion-mnist, "
                                      "cifar10 or folder:PATH"),
    (["lenet", "--input-size", "28"], "lenet cannot take 28x28 input: it takes 32 to 35 pixels a side"),
    (["lenet", "--amp", "--backend", "torch", "--dtype", "float64"], "--amp mixes float32 with lower precision"),
    (["lenet", "--batch-size", "0"], "expected batch_size to be a positive integer, got 0"),
    (["lenet", "--lr", "-1"], "expected lr to be a positive number, got -1.0"),
    ([], "expected a network (one of lenet"),
    (["--resume", "/nonexistent/checkpoint.pt"], "no checkpoint at /nonexistent/checkpoint.pt"),
    (["lenet", "--data", "folder:/nonexistent/images"], "/nonexistent/images"),
])
def test_bad_input_is_an_argparse_error(capsys, tmp_path, args, message):
    if "folder:" in " ".join(args):
        torchvision_or_skip()
    code, out, err = cli(capsys, *args, "--epochs", "1", "--out", str(tmp_path / "o"), "--no-progress")
    assert code == 2 and message in err, err
    assert "Traceback" not in err and "epoch 1/1" not in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_without_a_gpu(capsys, tmp_path):
    code, _, err = cli(capsys, "lenet", "--device", "cuda", "--out", str(tmp_path))
    assert code == 2 and "--device cuda: no GPU is visible" in err


def test_input_size_ranges():
    assert accepted_sizes(MODELS["lenet"]) == (32, 35)
    lo, hi = accepted_sizes(MODELS["resnet18"])
    assert hi is None and lo <= 32
    with pytest.raises(OptionError, match=r"alexnet cannot take 100x100 input: it takes \d+ to \d+ pixels"):
        fit("alexnet", "digits", input_size=100, log=None)


def test_resume_errors(tmp_path, capsys):
    fit("lenet", "digits", epochs=1, batch_size=256, schedule="cosine", out=str(tmp_path), progress=False, log=None)
    path = str(tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"batch-size: checkpoint 256, now 32.*backend: checkpoint 'cnnext', "
                                              r"now 'torch'"):
        fit(resume=path, batch_size=32, backend="torch", log=None)
    code, _, err = cli(capsys, "alexnet", "--resume", path)
    assert code == 2 and "net: checkpoint 'lenet', now 'alexnet'" in err
    with pytest.raises(CheckpointError, match="has finished 1 epochs already; pass --epochs greater than 1"):
        fit(resume=path, log=None)
    with pytest.raises(CheckpointError, match="cosine schedule of this checkpoint anneals over 1 epochs"):
        fit(resume=path, epochs=3, log=None)
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*corrupt.pt: it is damaged"):
        fit(resume=str(bad), log=None)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="is not a checkpoint of `cnnext train`"):
        fit(resume=str(other), log=None)
    with pytest.raises(CheckpointError, match="is a folder"):
        fit(resume=str(tmp_path), log=None)


def test_other_subcommands_still_parse(capsys):
    assert main(["info"]) == 0
    assert '"cuda"' in capsys.readouterr().out


@pytest.mark.parametrize("backend", ["cnnext", "torch"])
def test_ddp_model_gets_synchronised_batch_norm(backend):
    """Under DDP every batch norm of a BN net is a synchronised one (on CPU cnnext's, since
    stock has none there), holding the same Parameter objects, with unchanged keys."""
    from cnnext.models import MODELS
    from cnnext.nn import SyncBatchNorm
    from cnnext.train.loop import _prepare_ddp_model

    for name in ("resnet18", "densenet"):
        net = MODELS[name].build(in_channels=1, backend=backend)
        keys = list(net.state_dict())
        params = [id(p) for p in net.parameters()]
        bns = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
        out = _prepare_ddp_model(net, backend, torch.device("cpu"))
        assert out is net and bns > 0
        assert sum(isinstance(m, SyncBatchNorm) for m in out.modules()) == bns
        assert list(out.state_dict()) == keys and [id(p) for p in out.parameters()] == params
