"""The data of `cnnext train`: the datasets, their fixed train/test splits, and batches.

digits, mnist, fashion-mnist and cifar10 are held in memory as uint8 (or float) tensors
at their own resolution; a batch is cut from them by tensor indexing and resized to the
network's input size, scaled to [0, 1] and normalised (per-channel mean and std of the
training split) in one pass over the batch. `folder:PATH` reads image files through
torchvision's ImageFolder in a torch DataLoader (its `workers` processes).

The order of the training batches is that of torch's DistributedSampler for the
process's rank: a permutation drawn from (seed + epoch), so it is a function of the
seed and the epoch alone (a resumed run sees the batches the uninterrupted one saw).
"""
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.data.distributed import DistributedSampler

__all__ = ["DATASETS", "DataError", "Dataset", "load_data", "parse_data", "Batches", "import_torchvision"]

# The names --data takes besides folder:PATH.
DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10")
_TORCHVISION = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10"}
# A folder without train/ and test/ (or val/) subfolders is split with this fraction held out.
FOLDER_TEST_FRACTION = 0.2
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class DataError(RuntimeError):
    """A dataset that cannot be had: not downloaded, offline, no torchvision, a bad folder."""


def default_data_root():
    """Where torchvision datasets are looked for and downloaded to: $CNNEXT_DATA, else
    $XDG_CACHE_HOME/cnnext/data (~/.cache/cnnext/data)."""
    if os.environ.get("CNNEXT_DATA"):
        return os.environ["CNNEXT_DATA"]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "cnnext", "data")


def parse_data(name):
    """The canonical form of a --data value: one of DATASETS, or folder:ABSOLUTE_PATH.
    Raises ValueError naming the choices for anything else."""
    if isinstance(name, str) and name.startswith("folder:"):
        path = name[len("folder:"):]
        if not path:
            raise ValueError("expected data 'folder:PATH' to name a folder, got 'folder:' with no path")
        return "folder:" + os.path.abspath(os.path.expanduser(path))
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)} or folder:PATH "
                         "(an ImageFolder tree: one subfolder of images per class)")
    return name


# torchvision wheels built for CUDA fail to import on a CPU-only torch because their
# compiled ops library does not load; defining the two operator schemas that
# torchvision's Python side checks at import lets the rest (datasets, transforms) import.
_TORCHVISION_SHIM = None


def import_torchvision(purpose="this dataset"):
    """`import torchvision`, with the schema shim above when its compiled ops do not load;
    DataError saying how to install it when it is not installed."""
    global _TORCHVISION_SHIM
    try:
        import torchvision
        return torchvision
    except ModuleNotFoundError as e:
        if e.name != "torchvision":
            raise
        raise DataError(f"{purpose} needs torchvision, which is not installed: pip install torchvision "
                        "(the one built for your torch; with --no-deps if pip would replace torch), "
                        "or use --data digits, which needs only scikit-learn") from None
    except RuntimeError as e:
        if "torchvision::nms" not in str(e) or _TORCHVISION_SHIM is not None:
            raise DataError(f"{purpose} needs torchvision, which fails to import: {e}") from e
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_SHIM = lib  # the definitions live as long as this object
    try:
        import torchvision
    except Exception as e:
        raise DataError(f"{purpose} needs torchvision, which fails to import: {e}") from e
    return torchvision


@dataclass
class Split:
    """One split held in memory: images (N, C, H, W), uint8 (0-255) or float32 in [0, 1]; labels int64."""
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self):
        return len(self.labels)

    def scaled(self, index):
        x = self.images[index]
        return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


@dataclass
class Dataset:
    """A dataset split in two: `train` and `test` are Splits (in memory) or torch datasets
    of (float image tensor in [0, 1], label) pairs (folder: data)."""
    name: str
    classes: list
    in_channels: int
    train: object
    test: object
    mean: tuple = ()
    std: tuple = ()
    in_memory: bool = True
    native_size: tuple = field(default=())

    @property
    def num_classes(self):
        return len(self.classes)


def _resize(x, size):
    """A float batch resized to size x size (bilinear; antialiased when it shrinks)."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    down = x.shape[-1] > size or x.shape[-2] > size
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=down)


def _channel_stats(split, size, limit=10000, chunk=1000):
    """Per-channel mean and std of the pixels of the first `limit` training images as the
    network sees them (in [0, 1], resized to size x size); float64 sums."""
    c = split.images.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    n = 0
    for i in range(0, min(len(split), limit), chunk):
        x = _resize(split.scaled(slice(i, min(i + chunk, limit))), size).double()
        s += x.sum(dim=(0, 2, 3))
        s2 += (x * x).sum(dim=(0, 2, 3))
        n += x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / n
    std = (s2 / n - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def _digits():
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ModuleNotFoundError as e:
        raise DataError("--data digits needs scikit-learn: pip install scikit-learn "
                        "(or pip install 'cnnext[train]')") from e
    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float().div_(16).unsqueeze(1)  # 1797 x 1 x 8 x 8, in [0, 1]
    labels = torch.from_numpy(bunch.target).long()
    train_idx, test_idx = train_test_split(torch.arange(len(labels)).numpy(), test_size=0.2, random_state=0,
                                           stratify=labels.numpy())
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return Split(images[train_idx], labels[train_idx]), Split(images[test_idx], labels[test_idx]), \
        [str(i) for i in range(10)]


def _torchvision_dataset(name, root, download, rank_zero_first):
    tv = import_torchvision(f"--data {name}")
    cls = getattr(tv.datasets, _TORCHVISION[name])
    root = os.path.expanduser(root)

    def load(download):
        return cls(root, train=True, download=download), cls(root, train=False, download=download)

    try:
        with rank_zero_first():
            train, test = load(download)
    except (RuntimeError, OSError) as e:  # torchvision's "Dataset not found", "Error downloading"; URLError ...
        what = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if download:
            raise DataError(f"could not download {cls.__name__} into {root} ({what}): this machine may be "
                            f"offline; download it where there is internet (python -m cnnext train ... --data "
                            f"{name} --download --data-root DIR) and copy DIR here, or use --data digits") from None
        if "not found" in str(e).lower():
            raise DataError(f"{cls.__name__} is not in {root}: run again with --download to fetch it "
                            f"(needs internet access), or copy torchvision's {cls.__name__} files there "
                            f"(--data-root DIR picks another folder); --data digits works offline") from None
        raise DataError(f"could not load {cls.__name__} from {root}: {what}") from None

    def split(ds):
        data = ds.data if isinstance(ds.data, torch.Tensor) else torch.from_numpy(ds.data)
        images = data.unsqueeze(1) if data.dim() == 3 else data.permute(0, 3, 1, 2)
        labels = torch.as_tensor(ds.targets, dtype=torch.long)
        return Split(images.contiguous(), labels)

    return split(train), split(test), list(train.classes)


def _folder_images(path):
    return sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))


def _folder(path, size):
    tv = import_torchvision("--data folder:PATH")
    from torchvision import transforms

    if not os.path.isdir(path):
        raise DataError(f"--data folder:{path}: no such folder")
    tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])
    parts = {p: os.path.join(path, p) for p in ("train", "test", "val") if os.path.isdir(os.path.join(path, p))}
    try:
        if "train" in parts and ("test" in parts or "val" in parts):
            train = tv.datasets.ImageFolder(parts["train"], transform=tf)
            test = tv.datasets.ImageFolder(parts.get("test", parts.get("val")), transform=tf)
            if train.classes != test.classes:
                raise DataError(f"--data folder:{path}: train/ has classes {train.classes}, "
                                f"its test folder {test.classes}; they must be the same")
        else:
            full = tv.datasets.ImageFolder(path, transform=tf)
            # A fixed split (generator seeded with 0, not with --seed): the same test images in every run.
            order = torch.randperm(len(full), generator=torch.Generator().manual_seed(0)).tolist()
            n_test = max(1, int(round(FOLDER_TEST_FRACTION * len(full))))
            if len(full) - n_test < 1:
                raise DataError(f"--data folder:{path}: {len(full)} image(s) cannot be split into train and test")
            test = torch.utils.data.Subset(full, sorted(order[:n_test]))
            train = torch.utils.data.Subset(full, sorted(order[n_test:]))
            train.classes = test.classes = full.classes
    except FileNotFoundError as e:  # ImageFolder: no class folders, or a class without images
        raise DataError(f"--data folder:{path}: {e} (expected one subfolder of images per class, "
                        f"optionally under train/ and test/)") from None
    return train, test, list(train.classes)


def load_data(name, size, root=None, download=False, rank_zero_first=None):
    """The Dataset named by `name` (see parse_data) for a network taking size x size input."""
    import contextlib

    name = parse_data(name)
    rank_zero_first = rank_zero_first or contextlib.nullcontext
    if name.startswith("folder:"):
        train, test, classes = _folder(name[len("folder:"):], size)
        return Dataset(name, classes, 3, train, test, (0.5,) * 3, (0.5,) * 3, in_memory=False)
    if name == "digits":
        train, test, classes = _digits()
    else:
        train, test, classes = _torchvision_dataset(name, root or default_data_root(), download, rank_zero_first)
    mean, std = _channel_stats(train, size)
    return Dataset(name, classes, train.images.shape[1], train, test, mean, std, True,
                   tuple(train.images.shape[2:]))


class _Len:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


class Batches:
    """The batches of one split for one epoch at a time: (images, labels) on `device`,
    images resized to size x size, normalised, of `dtype`, channels_last if asked.

    shuffle=True (training): DistributedSampler's order for (rank, world) from seed + epoch
    (set_epoch before each epoch); each rank gets ceil(N / world) samples (a few repeated
    when N does not divide). shuffle=False (test): rank r takes samples r, r + world, ...,
    every sample exactly once over all ranks."""

    def __init__(self, dataset, split, batch_size, size, dtype, device, channels_last=False, shuffle=False,
                 seed=0, rank=0, world=1, workers=0):
        self.data = getattr(dataset, split)
        self.in_memory = dataset.in_memory
        self.batch_size, self.size, self.dtype, self.device = batch_size, size, dtype, torch.device(device)
        self.channels_last, self.workers = channels_last, workers
        self.mean = torch.tensor(dataset.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(dataset.std, dtype=torch.float32).view(1, -1, 1, 1)
        n = len(self.data)
        if shuffle:
            self.sampler = DistributedSampler(_Len(n), num_replicas=world, rank=rank, shuffle=True, seed=seed)
        else:
            self.sampler = list(range(rank, n, world))
        self.shuffle = shuffle

    def set_epoch(self, epoch):
        if self.shuffle:
            self.sampler.set_epoch(epoch)

    def num_samples(self):
        return len(self.sampler)

    def __len__(self):
        return math.ceil(self.num_samples() / self.batch_size)

    def _finish(self, x, y):
        """float32 [0, 1] batch at any size -> the network's input."""
        x = (_resize(x, self.size) - self.mean) / self.std
        non_blocking = self.device.type == "cuda"
        x = x.to(device=self.device, dtype=self.dtype, non_blocking=non_blocking)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=non_blocking)

    def __iter__(self):
        order = torch.as_tensor(list(iter(self.sampler)), dtype=torch.long)
        if self.in_memory:
            for i in range(0, len(order), self.batch_size):
                idx = order[i:i + self.batch_size]
                yield self._finish(self.data.scaled(idx), self.data.labels[idx])
            return
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(self.data, order.tolist()), batch_size=self.batch_size, shuffle=False,
            num_workers=self.workers, pin_memory=self.device.type == "cuda")
        for x, y in loader:
            yield self._finish(x.float(), y)
