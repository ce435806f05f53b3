"""cnnext.train.fit: the training loop of "Dive into Deep Learning" for the networks of
cnnext.models, with its progress bar, metrics, curves, checkpoints, exact resume and DDP."""
import contextlib
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from ..models import BACKENDS, MODELS
from . import report
from .data import Batches, default_data_root, load_data, parse_data

__all__ = ["fit", "FitResult", "TrainOptions", "OptionError", "CheckpointError", "DEFAULTS",
           "CHECKPOINT_FORMAT", "load_checkpoint"]

CHECKPOINT_FORMAT = "cnnext.train/1"
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("none", "cosine", "step")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEVICES = ("cpu", "cuda")


class OptionError(ValueError):
    """An option (or a combination of options) a run cannot take."""


class CheckpointError(ValueError):
    """A checkpoint that is not there, cannot be read, or does not fit the options of the run."""


@dataclass
class TrainOptions:
    """Every option of a run (None: resolved when the run starts, see resolve_options)."""
    net: str = None
    data: str = "digits"
    epochs: int = 10
    batch_size: int = 32
    lr: float = None                # 0.05 for sgd, 0.001 for adam
    optimizer: str = "sgd"
    momentum: float = 0.9           # sgd only
    weight_decay: float = 5e-4      # L2 regularisation (the optimizer's weight_decay)
    schedule: str = "step"
    lr_step: int = None             # step schedule: epochs between decays (default max(1, epochs // 2))
    lr_gamma: float = 0.1           # step schedule: the decay factor
    label_smoothing: float = 0.1    # of the cross-entropy loss
    backend: str = "cnnext"
    channels_last: bool = False
    amp: bool = False
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    input_size: int = None          # the network's own (MODELS[net].input_size)
    workers: int = 0
    data_root: str = None
    download: bool = False
    out: str = None
    progress: bool = True


DEFAULTS = TrainOptions()
# What a resumed run must share with its checkpoint (the rest may change: more epochs,
# another output folder or device, ...). Options not given on resume come from the checkpoint.
MUST_MATCH = ("net", "data", "input_size", "batch_size", "backend", "dtype", "optimizer", "lr", "momentum",
              "weight_decay", "schedule", "lr_step", "lr_gamma", "label_smoothing", "seed", "amp")
# Options a resumed run does not take from its checkpoint (out defaults to the checkpoint's folder).
_NOT_INHERITED = ("out", "progress", "download")


@dataclass
class FitResult:
    """What fit() returns. history: one dict per epoch (report.COLUMNS: epoch, train_loss,
    train_acc, test_acc, seconds), those of the checkpoint included on resume; model: the
    trained network (unwrapped from DDP); confusion: the final test confusion matrix
    (int64, rows true class, columns predicted); test_acc: the final test accuracy;
    options: the resolved TrainOptions; start_epoch: the first epoch this call trained."""
    history: list
    model: torch.nn.Module
    confusion: torch.Tensor
    test_acc: float
    classes: list
    options: TrainOptions
    start_epoch: int = 1


# ---------------------------------------------------------------------------- switches
# The two places where features of other issues are switched on.

def amp_supported(backend, device):
    """(whether --amp can run with this backend on this device, why not). Autocast lowers
    activations to bfloat16 (CPU) or float16 (CUDA); cnnext's ops take both dtypes on both
    devices and register autocast rules (csrc/ops/autocast.cpp), so every backend can."""
    return True, ""


def _prepare_ddp_model(model, backend="cnnext", device=torch.device("cpu")):
    """The network as it is handed to DistributedDataParallel, its batch norms synchronised:
    each normalises with the statistics of the whole global batch, so N processes train as
    one process on the global batch would. cnnext.nn.SyncBatchNorm (gloo on CPU, nccl on
    CUDA; inside the fused ConvBNReLU2d blocks too) for the cnnext backend and on CPU, where
    stock torch has no synchronised batch norm; torch.nn.SyncBatchNorm for the torch backend
    on CUDA. Same Parameter objects, so optimizers built before are unaffected."""
    if backend == "torch" and device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    from ..nn import SyncBatchNorm

    return SyncBatchNorm.convert_sync_batchnorm(model)


# ---------------------------------------------------------------------------- options

def _check_choice(name, value, choices):
    if value not in choices:
        raise OptionError(f"expected {name} to be one of {', '.join(map(str, choices))}, got {value!r}")


def _check_positive(name, value, integer=True, allow_zero=False):
    ok = isinstance(value, int) and not isinstance(value, bool) if integer else isinstance(value, (int, float))
    if not ok or (value < 0 if allow_zero else value <= 0) or (not integer and not math.isfinite(value)):
        what = ("a non-negative" if allow_zero else "a positive") + (" integer" if integer else " number")
        raise OptionError(f"expected {name} to be {what}, got {value!r}")


def resolve_options(given, checkpoint_options=None):
    """TrainOptions from `given` (a dict of the options set explicitly; None values count
    as not set), then the checkpoint's options for the rest (on resume), then DEFAULTS.
    Raises OptionError for a value no run can take, CheckpointError when a set option
    contradicts the checkpoint."""
    given = {k: v for k, v in given.items() if v is not None}
    unknown = set(given) - {f.name for f in fields(TrainOptions)}
    if unknown:
        raise TypeError(f"fit() got unknown options {', '.join(sorted(unknown))}")
    if "data" in given:
        given["data"] = _parse_data(given["data"])
    if checkpoint_options is not None:
        mismatched = [(k, checkpoint_options.get(k), given[k]) for k in MUST_MATCH
                      if k in given and given[k] != checkpoint_options.get(k)]
        if mismatched:
            lines = "; ".join(f"{k.replace('_', '-')}: checkpoint {a!r}, now {b!r}" for k, a, b in mismatched)
            raise CheckpointError(f"cannot resume with other options than the checkpoint's ({lines}); "
                                  "leave them out to take the checkpoint's, or start a new run")
        inherited = {k: v for k, v in checkpoint_options.items() if k in asdict(DEFAULTS) and k not in _NOT_INHERITED}
        values = {**asdict(DEFAULTS), **inherited, **given}
        if checkpoint_options.get("schedule") == "cosine" and values["epochs"] != checkpoint_options["epochs"]:
            raise CheckpointError(f"the cosine schedule of this checkpoint anneals over "
                                  f"{checkpoint_options['epochs']} epochs; resume it with --epochs "
                                  f"{checkpoint_options['epochs']}, or start a new run for {values['epochs']}")
    else:
        values = {**asdict(DEFAULTS), **given}
    o = TrainOptions(**values)

    if o.net is None:
        raise OptionError(f"expected a network, one of {', '.join(MODELS)}")
    _check_choice("net", o.net, tuple(MODELS))
    _check_choice("optimizer", o.optimizer, OPTIMIZERS)
    _check_choice("schedule", o.schedule, SCHEDULES)
    _check_choice("backend", o.backend, BACKENDS)
    _check_choice("device", o.device, DEVICES)
    _check_choice("dtype", o.dtype, tuple(DTYPES))
    _check_positive("epochs", o.epochs)
    _check_positive("batch_size", o.batch_size)
    _check_positive("workers", o.workers, allow_zero=True)
    if o.lr is None:
        o.lr = 0.05 if o.optimizer == "sgd" else 0.001
    _check_positive("lr", o.lr, integer=False)
    _check_positive("momentum", o.momentum, integer=False, allow_zero=True)
    _check_positive("weight_decay", o.weight_decay, integer=False, allow_zero=True)
    _check_positive("lr_gamma", o.lr_gamma, integer=False)
    _check_positive("label_smoothing", o.label_smoothing, integer=False, allow_zero=True)
    if o.label_smoothing >= 1:
        raise OptionError(f"expected label_smoothing to be below 1, got {o.label_smoothing!r}")
    if o.schedule == "step":
        if o.lr_step is None:
            o.lr_step = max(1, o.epochs // 2)
        _check_positive("lr_step", o.lr_step)
    else:
        o.lr_step = None
    if o.optimizer == "adam" and o.momentum not in (0, 0.0, DEFAULTS.momentum):
        raise OptionError("momentum is an option of --optimizer sgd (adam has its own betas)")
    if o.input_size is None:
        o.input_size = MODELS[o.net].input_size
    _check_positive("input_size", o.input_size)
    if not isinstance(o.seed, int) or isinstance(o.seed, bool) or o.seed < 0:
        raise OptionError(f"expected seed to be a non-negative integer, got {o.seed!r}")
    if o.amp:
        if o.dtype != "float32":
            raise OptionError(f"--amp mixes float32 with lower precision; it cannot run with --dtype {o.dtype}")
        ok, why = amp_supported(o.backend, o.device)
        if not ok:
            raise OptionError(why)
    if o.device == "cuda":
        if not torch.cuda.is_available():
            raise OptionError("--device cuda: no GPU is visible to torch here "
                              f"(torch {torch.__version__}, CUDA {torch.version.cuda}); use --device cpu")
        if o.backend == "cnnext":
            import cnnext

            if not cnnext.build_info()["cuda"]:
                raise OptionError("--device cuda with --backend cnnext needs cnnext built with its CUDA kernels "
                                  "(python -m cnnext info says how it was built); use --backend torch or rebuild")
    return o


def _parse_data(name):
    try:
        return parse_data(name)
    except ValueError as e:
        raise OptionError(str(e)) from None


# ---------------------------------------------------------------------------- input size

def _takes(spec, in_channels, size, _cache={}):
    """Whether the network runs on size x size input (a forward pass on the meta device)."""
    key = (spec.name, in_channels, size)
    if key not in _cache:
        with torch.device("meta"):
            net = spec.build(in_channels=in_channels, num_classes=10, backend="torch")
        net.eval()
        try:
            with torch.no_grad():
                net(torch.empty(2, in_channels, size, size, device="meta"))
            _cache[key] = True
        except Exception:
            _cache[key] = False
    return _cache[key]


def accepted_sizes(spec, in_channels=1, limit=4096):
    """(smallest, largest) input size (H = W) the network takes, largest None when it takes
    any larger one up to `limit` (the nets with global pooling). Searched around
    spec.input_size: the sizes a net takes form one interval, as its feature maps only grow
    with the input."""
    base = spec.input_size
    lo_bad, lo_ok = 0, base  # the smallest accepted size is in (lo_bad, lo_ok]
    while lo_ok - lo_bad > 1:
        mid = (lo_bad + lo_ok) // 2
        if _takes(spec, in_channels, mid):
            lo_ok = mid
        else:
            lo_bad = mid
    hi_ok, hi_bad = base, None
    probe = base * 2
    while probe <= limit:
        if _takes(spec, in_channels, probe):
            hi_ok, probe = probe, probe * 2
        else:
            hi_bad = probe
            break
    if hi_bad is None:
        return lo_ok, None
    while hi_bad - hi_ok > 1:
        mid = (hi_ok + hi_bad) // 2
        if _takes(spec, in_channels, mid):
            hi_ok = mid
        else:
            hi_bad = mid
    return lo_ok, hi_ok


def check_input_size(net, in_channels, size):
    """OptionError naming the sizes `net` takes when it cannot run on size x size input."""
    spec = MODELS[net]
    if _takes(spec, in_channels, size):
        return
    lo, hi = accepted_sizes(spec, in_channels)
    sizes = f"{lo} to {hi} pixels" if hi is not None else f"{lo} pixels or more"
    raise OptionError(f"{net} cannot take {size}x{size} input: it takes {sizes} a side "
                      f"(it is laid out for {spec.input_size}x{spec.input_size}, the size the data is resized to "
                      f"without --input-size)")


# ---------------------------------------------------------------------------- distributed

@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self):
        return self.rank == 0

    @property
    def on(self):
        return self.world > 1

    def barrier(self):
        if self.on:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def rank_zero_first(self):
        """Rank 0 runs the block (a download) before the others do."""
        if self.on and not self.main:
            self.barrier()
        yield
        if self.on and self.main:
            self.barrier()


def _init_distributed(device):
    """_Dist from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK): initialises the
    default process group (gloo on the CPU, nccl on CUDA) unless it already is."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        owns = True
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns)


def _all_reduce(t, dist_):
    if dist_.on:
        torch.distributed.all_reduce(t)
    return t


# ---------------------------------------------------------------------------- checkpoints

def _rng_state(device):
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def load_checkpoint(path, map_location="cpu"):
    """A checkpoint written by fit(), checked for its format; CheckpointError (or
    FileNotFoundError) saying what is wrong otherwise."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path} (--resume takes the checkpoint.pt a run wrote "
                                "into its --out folder)")
    if os.path.isdir(path):
        raise CheckpointError(f"--resume {path} is a folder; pass the checkpoint file, "
                              f"{os.path.join(path, 'checkpoint.pt')}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: it is damaged or not a file torch.save wrote "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    keys = ("format", "epoch", "options", "model", "optimizer", "rng", "history")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or any(k not in ckpt for k in keys):
        raise CheckpointError(f"{path} is not a checkpoint of `cnnext train` (expected a dict with format "
                              f"{CHECKPOINT_FORMAT!r} and the keys {', '.join(keys)})")
    return ckpt


def _save_checkpoint(path, **state):
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- the loop

def _build(o, in_channels, num_classes, device, dtype):
    torch.manual_seed(o.seed)
    random.seed(o.seed)
    np.random.seed(o.seed)
    model = MODELS[o.net].build(in_channels=in_channels, num_classes=num_classes, backend=o.backend)
    model = model.to(device=device, dtype=dtype)
    if o.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _optimizer(o, model):
    if o.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)


def _scheduler(o, opt):
    if o.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=o.epochs)
    if o.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=o.lr_step, gamma=o.lr_gamma)
    return None


def _progress(o, dist_, loader, epoch):
    if not (o.progress and dist_.main):
        return None
    try:
        from tqdm.auto import tqdm
    except ModuleNotFoundError:
        raise OptionError("the progress bar needs tqdm: pip install tqdm (or pip install 'cnnext[train]'), "
                          "or run with --no-progress") from None
    return tqdm(total=len(loader), desc=f"epoch {epoch}/{o.epochs}", unit="batch", leave=False,
                dynamic_ncols=True, file=sys.stderr)


def _train_epoch(model, loader, opt, scaler, o, device, dist_, epoch):
    model.train()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss * n, correct, n
    bar = _progress(o, dist_, loader, epoch)
    start, seen = time.perf_counter(), 0
    amp = torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cpu" else torch.float16) \
        if o.amp else contextlib.nullcontext()
    for step, (x, y) in enumerate(loader, 1):
        opt.zero_grad(set_to_none=True)
        with amp:
            out = model(x)
            loss = F.cross_entropy(out, y, label_smoothing=o.label_smoothing)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        with torch.no_grad():
            n = y.numel()
            sums[0] += loss.detach().double() * n
            sums[1] += (out.argmax(dim=1) == y).sum()
            sums[2] += n
        seen += n
        if bar is not None:
            bar.update(1)
            if step % 10 == 0 or step == len(loader):
                s = sums.tolist()
                bar.set_postfix(loss=f"{s[0] / s[2]:.4f}", acc=f"{s[1] / s[2]:.4f}",
                                img_s=f"{seen * dist_.world / (time.perf_counter() - start):,.0f}")
    if bar is not None:
        bar.close()
    s = _all_reduce(sums, dist_).tolist()
    return s[0] / s[2], s[1] / s[2], int(s[2])


@torch.no_grad()
def _evaluate(model, loader, num_classes, device, o, dist_):
    model.eval()
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cpu" else torch.float16) \
        if o.amp else contextlib.nullcontext()
    for x, y in loader:
        with amp:
            pred = model(x).argmax(dim=1)
        confusion += torch.bincount(y * num_classes + pred, minlength=num_classes * num_classes)
    confusion = _all_reduce(confusion, dist_).view(num_classes, num_classes).cpu()
    total = int(confusion.sum())
    return (confusion.diag().sum().item() / total if total else float("nan")), confusion


def fit(net=None, data=None, *, resume=None, log=print, **options):
    """Trains `net` (a name of cnnext.models.MODELS) on `data` and returns a FitResult
    (its .history: one dict per epoch with epoch, train_loss, train_acc, test_acc, seconds).

        from cnnext.train import fit
        result = fit("lenet", "digits", epochs=10, out="runs/lenet")
        result.history[-1]["test_acc"]

    data: "digits" (scikit-learn's 8x8 digits, offline), "mnist", "fashion-mnist",
    "cifar10" (torchvision; download=True fetches them into data_root) or
    "folder:PATH" (an ImageFolder tree). Images are resized to the network's input size
    (input_size, default MODELS[net].input_size) and normalised; in_channels follow the data.

    Options (the TrainOptions fields; `python -m cnnext train --help` describes each):
    epochs, batch_size (per process), lr, optimizer ("sgd", "adam"), momentum,
    weight_decay, schedule ("none", "cosine", "step"; lr_step, lr_gamma), backend
    ("cnnext", "torch"), channels_last, amp, seed, device ("cpu", "cuda"), dtype
    ("float32", "float64"), input_size, workers, data_root, download, out, progress.

    With out=DIR, every epoch (re)writes DIR/metrics.csv, DIR/curves.png and
    DIR/checkpoint.pt; the end writes DIR/confusion.csv. resume=PATH continues the run of
    a checkpoint.pt exactly (same batches, RNG states, optimizer and scheduler state) up
    to `epochs`; options not given are the checkpoint's, and those given must agree with
    it (CheckpointError otherwise). Under torchrun (WORLD_SIZE > 1) it trains with
    DistributedDataParallel; rank 0 writes the files and logs. `log` prints the lines
    (None: silent).
    """
    log = log or (lambda *a, **k: None)
    ckpt = None
    if resume is not None:
        ckpt = load_checkpoint(resume)
        if net is None:
            net = ckpt["options"]["net"]
    given = dict(options, net=net, data=data)
    o = resolve_options(given, ckpt["options"] if ckpt is not None else None)
    if o.out is None and resume is not None:
        o.out = os.path.dirname(os.path.abspath(resume))
    start_epoch = ckpt["epoch"] + 1 if ckpt is not None else 1
    if ckpt is not None and start_epoch > o.epochs:
        raise CheckpointError(f"the checkpoint {resume} has finished {ckpt['epoch']} epochs already; "
                              f"pass --epochs greater than {ckpt['epoch']} to train on")

    dist_ = _init_distributed(o.device)
    try:
        result = _fit(o, ckpt, resume, start_epoch, dist_, log if dist_.main else (lambda *a, **k: None))
        # Every rank done before any tears gloo down: a rank that destroys its group while
        # rank 0 still writes the run's files can make a process abort ("terminate called
        # without an active exception", SIGABRT; seen in CI on the 2-core VM). Not on an
        # exception: the other ranks might never arrive.
        dist_.barrier()
        return result
    finally:
        if dist_.owns_group:
            torch.distributed.destroy_process_group()


def _fit(o, ckpt, resume, start_epoch, dist_, log):
    device = torch.device(o.device, dist_.local_rank) if o.device == "cuda" else torch.device("cpu")
    dtype = DTYPES[o.dtype]
    dataset = load_data(o.data, o.input_size, o.data_root or default_data_root(), o.download,
                        dist_.rank_zero_first)
    check_input_size(o.net, dataset.in_channels, o.input_size)
    if ckpt is not None and ckpt.get("world_size", 1) != dist_.world:
        log(f"warning: the checkpoint was written by {ckpt.get('world_size', 1)} process(es), this run has "
            f"{dist_.world}: the data order differs from an uninterrupted run")

    model = _build(o, dataset.in_channels, dataset.num_classes, device, dtype)
    if dist_.on and dist_.rank:
        torch.manual_seed(o.seed + dist_.rank)  # each rank its own dropout masks; the weights are rank 0's
    opt = _optimizer(o, model)
    sched = _scheduler(o, opt)
    scaler = torch.amp.GradScaler("cuda") if o.amp and device.type == "cuda" else None
    history = []
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            if sched is not None:
                sched.load_state_dict(ckpt["scheduler"])
            if scaler is not None and ckpt.get("scaler") is not None:
                scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"the checkpoint {resume} does not fit this run's network or optimizer: "
                                  f"{str(e).splitlines()[0]}") from None
        rng = ckpt["rng"]
        _set_rng_state(rng[dist_.rank] if dist_.rank < len(rng) else rng[0], device)
        history = [dict(r) for r in ckpt["history"] if r["epoch"] < start_epoch]
    train_model = model
    if dist_.on:
        train_model = torch.nn.parallel.DistributedDataParallel(
            _prepare_ddp_model(model, o.backend, device), device_ids=[device.index] if device.type == "cuda" else None)

    common = dict(batch_size=o.batch_size, size=o.input_size, dtype=dtype, device=device,
                  channels_last=o.channels_last, rank=dist_.rank, world=dist_.world, workers=o.workers)
    train_loader = Batches(dataset, "train", shuffle=True, seed=o.seed, **common)
    test_loader = Batches(dataset, "test", shuffle=False, **common)

    if o.out and dist_.main:
        os.makedirs(o.out, exist_ok=True)
    world = f", {dist_.world} processes (DDP, {'nccl' if device.type == 'cuda' else 'gloo'})" if dist_.on else ""
    log(f"{o.net} ({o.backend}) on {dataset.name}: {len(dataset.train)} training / {len(dataset.test)} test "
        f"images, {dataset.in_channels}x{o.input_size}x{o.input_size}, {dataset.num_classes} classes; "
        f"{o.optimizer} lr {o.lr:g}, batch {o.batch_size}, {o.dtype} on {device}{world}")
    if ckpt is not None:
        log(f"resuming from {resume} at epoch {start_epoch} of {o.epochs}")

    test_acc, confusion = float("nan"), None
    for epoch in range(start_epoch, o.epochs + 1):
        t0 = time.perf_counter()
        train_loader.set_epoch(epoch)
        loss, acc, n = _train_epoch(train_model, train_loader, opt, scaler, o, device, dist_, epoch)
        if sched is not None:
            sched.step()
        test_acc, confusion = _evaluate(model, test_loader, dataset.num_classes, device, o, dist_)
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch, "train_loss": loss, "train_acc": acc, "test_acc": test_acc, "seconds": seconds}
        history.append(row)
        rng = _rng_state(device)
        if dist_.on:
            gathered = [None] * dist_.world
            torch.distributed.all_gather_object(gathered, rng)
            rng = gathered
        else:
            rng = [rng]
        if o.out and dist_.main:
            report.write_metrics(os.path.join(o.out, "metrics.csv"), history)
            report.plot_curves(os.path.join(o.out, "curves.png"), history, o.epochs,
                               title=f"{o.net} ({o.backend}) on {dataset.name.split(os.sep)[-1]}")
            _save_checkpoint(
                os.path.join(o.out, "checkpoint.pt"), epoch=epoch, options=asdict(o), world_size=dist_.world,
                model=model.state_dict(), optimizer=opt.state_dict(),
                scheduler=sched.state_dict() if sched is not None else None,
                scaler=scaler.state_dict() if scaler is not None else None,
                rng=rng, data_order={"sampler": "DistributedSampler", "seed": o.seed, "next_epoch": epoch + 1},
                history=history, classes=dataset.classes)
        log(report.epoch_line(row, o.epochs, n / seconds))

    log(f"final test accuracy {test_acc:.4f} ({int(confusion.diag().sum())}/{int(confusion.sum())})")
    log("confusion matrix (rows: true class):")
    log(report.format_confusion(confusion, dataset.classes))
    if o.out and dist_.main:
        report.write_confusion(os.path.join(o.out, "confusion.csv"), confusion, dataset.classes)
        files = ("metrics.csv", "curves.png", "checkpoint.pt", "confusion.csv")
        log(f"wrote {', '.join(os.path.join(o.out, f) for f in files)}")
    return FitResult(history, model, confusion, test_acc, dataset.classes, o, start_epoch)
