"""Datasets by name, read from their standard on-disk formats (never downloaded), and fast loaders.

``build_data(name, ...)`` returns the train and test loaders of one dataset:

==============  ===========================================================  =================
name            on-disk format                                                train augmentation
==============  ===========================================================  =================
fashion-mnist   the four IDX files (``.gz`` or not) of Debian's               pad-2 crop + flip
                ``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist)
                or of ``--data-dir``
cifar10         ``cifar-10-batches-py/`` python-pickle batches                pad-4 crop + flip
cifar100        ``cifar-100-python/`` python-pickle ``train`` / ``test``      pad-4 crop + flip
imagefolder     ``train/`` and ``val/`` with one folder per class (ImageNet   RandomResizedCrop
                layout; needs torchvision)                                    224 + flip; test:
                                                                              resize 256, center
                                                                              224
synthetic       generated in memory from a fixed seed (smoke tests)           pad-4 crop + flip
==============  ===========================================================  =================

The small datasets live in memory as one ``uint8`` tensor; :class:`TensorLoader` gathers a batch
by index and augments it as a whole on tensors (random crop through one gather, flip through one
``where``), which is many times faster on a 2-core CPU than per-sample PIL transforms in a
``DataLoader``. All randomness (order and augmentation) comes from the loader's own
``torch.Generator``, whose state a checkpoint saves, so a resumed run sees the same batches.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = [
    "DATASETS",
    "FASHION_MNIST_DIR",
    "DataError",
    "DataInfo",
    "TensorLoader",
    "available_datasets",
    "build_data",
    "load_cifar",
    "load_fashion_mnist",
    "load_synthetic",
    "shard_indices",
]

# Where Debian's dataset-fashion-mnist package installs the IDX files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


class DataError(RuntimeError):
    """A dataset is missing or malformed; the message says what to do."""


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about a dataset, and its normalisation."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 0  # pad-and-crop augmentation of the in-memory datasets (0 = none)
    default_recipe: str = "fashion-mnist"


# Per-channel statistics of the training sets (the values every reference implementation uses).
DATASETS: dict[str, DataInfo] = {
    "fashion-mnist": DataInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,), 2,
                              "fashion-mnist"),
    "cifar10": DataInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                        4, "cifar"),
    "cifar100": DataInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409),
                         (0.2673, 0.2564, 0.2762), 4, "cifar"),
    "imagefolder": DataInfo("imagefolder", 0, 3, 224, (0.485, 0.456, 0.406),
                            (0.229, 0.224, 0.225), 0, "imagenet"),
    "synthetic": DataInfo("synthetic", 10, 3, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 4,
                          "fashion-mnist"),
}


def available_datasets() -> list[str]:
    return list(DATASETS)


def dataset_info(name: str) -> DataInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(
            f"unknown dataset {name!r}; available datasets: {', '.join(DATASETS)}"
        ) from None


# ----------------------------------------------------------------------------------------------
# Readers: each returns (images uint8 (N, C, H, W), labels int64 (N,))
# ----------------------------------------------------------------------------------------------
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_FASHION_HOWTO = (
    "install Debian's package (sudo apt-get install dataset-fashion-mnist, which puts the IDX "
    f"files in {FASHION_MNIST_DIR}) or pass --data-dir DIR with the four files "
    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
    "t10k-labels-idx1-ubyte.gz (from https://github.com/zalandoresearch/fashion-mnist)"
)


def _read_idx(path: Path) -> torch.Tensor:
    """One IDX file (magic 0x0000 0x08 ndim, big-endian int32 dims, then uint8 data)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    start = 4 + 4 * ndim
    if len(raw) - start != math.prod(dims):
        raise DataError(f"{path} is truncated: expected {math.prod(dims)} values for shape "
                        f"{dims}, found {len(raw) - start}")
    return torch.frombuffer(bytearray(raw[start:]), dtype=torch.uint8).reshape(dims)


def _find_file(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (stem + ".gz", stem):
            if (d / name).is_file():
                return d / name
    return None


def load_fashion_mnist(split: str, data_dir: str | os.PathLike | None = None):
    """Fashion-MNIST from the IDX files: first Debian's location, then ``data_dir``.

    Returns ``(images, labels)``: ``uint8 (N, 1, 28, 28)`` and ``int64 (N,)``.
    """
    dirs = [FASHION_MNIST_DIR]
    if data_dir is not None:
        dirs += [Path(data_dir), Path(data_dir) / "fashion-mnist"]
    image_stem, label_stem = _FASHION_FILES[split]
    image_path, label_path = _find_file(dirs, image_stem), _find_file(dirs, label_stem)
    if image_path is None or label_path is None:
        looked = ", ".join(str(d) for d in dirs)
        raise DataError(f"Fashion-MNIST {split} files not found (looked in {looked}): "
                        f"{_FASHION_HOWTO}")
    images, labels = _read_idx(image_path), _read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{image_path} and {label_path} do not hold matching images and labels")
    return images.unsqueeze(1).contiguous(), labels.long()


def load_cifar(name: str, split: str, data_dir: str | os.PathLike | None = None):
    """CIFAR-10/100 from the python-pickle batches of the official archive.

    ``data_dir`` is the folder holding ``cifar-10-batches-py`` / ``cifar-100-python`` (or that
    folder itself). Returns ``uint8 (N, 3, 32, 32)`` and ``int64 (N,)``.
    """
    folder, files, key = {
        "cifar10": ("cifar-10-batches-py",
                    {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                    b"labels"),
        "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]}, b"fine_labels"),
    }[name]
    howto = (f"download the python version from https://www.cs.toronto.edu/~kriz/cifar.html, "
             f"extract it and pass --data-dir to the folder that contains {folder}/")
    if data_dir is None:
        raise DataError(f"{name} needs --data-dir: {howto}")
    root = Path(data_dir)
    root = root / folder if (root / folder).is_dir() else root
    images, labels = [], []
    for fname in files[split]:
        path = root / fname
        if not path.is_file():
            raise DataError(f"{name}: {path} not found: {howto}")
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            data, target = batch[b"data"], batch[key]
        except Exception as e:
            raise DataError(
                f"{path} is not a CIFAR python batch ({type(e).__name__}: {e})") from None
        images.append(torch.as_tensor(data, dtype=torch.uint8).reshape(-1, 3, 32, 32))
        labels.append(torch.as_tensor(target, dtype=torch.long))
    return torch.cat(images), torch.cat(labels)


def load_synthetic(split: str, num_samples: int | None = None, num_classes: int = 10,
                   in_channels: int = 3, image_size: int = 32):
    """A learnable toy set: per-class blocky random templates plus noise, fixed by a seed.

    Train and test draw from the same templates with different noise (512 / 256 images by
    default), so a small model reaches high test accuracy within a few epochs.
    """
    n = num_samples or (512 if split == "train" else 256)
    g = torch.Generator().manual_seed(1234)
    coarse = torch.rand(num_classes, in_channels, 4, 4, generator=g)
    templates = F.interpolate(coarse, size=(image_size, image_size), mode="nearest")
    g.manual_seed(1 if split == "train" else 2)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    noise = torch.rand(n, in_channels, image_size, image_size, generator=g)
    images = (0.7 * templates[labels] + 0.3 * noise) * 255
    return images.round().to(torch.uint8), labels


# ----------------------------------------------------------------------------------------------
# Batched tensor augmentation and the in-memory loader
# ----------------------------------------------------------------------------------------------
def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad each side by ``padding`` and crop back to the input size at a random offset per
    image (torchvision ``RandomCrop(size, padding)``), for a whole batch with one gather."""
    n, _, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (N, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (N, 1, W)
    batch = torch.arange(n)[:, None, None]
    # Advanced indices separated by a slice put the indexed dims first: (N, H, W, C).
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2)


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def shard_indices(n: int, rank: int, world_size: int) -> torch.Tensor:
    """Indices ``rank, rank + world, ...``: every sample exactly once over all ranks, no padding."""
    return torch.arange(rank, n, world_size)


class TensorLoader:
    """Batches of an in-memory ``uint8`` image tensor, augmented on the fly as whole batches.

    Training order: a permutation drawn from ``generator`` (one process), or a
    ``DistributedSampler`` with ``set_epoch`` (several). Evaluation: in order, over this rank's
    shard without padding. Yields ``(float images normalised, int64 labels)``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DataInfo, *,
                 batch_size: int, train: bool, augment: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False) -> None:
        self.images, self.labels, self.info = images, labels, info
        self.batch_size, self.train, self.augment = batch_size, train, augment and train
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.generator = torch.Generator().manual_seed(seed + 7919 * rank)
        self.mean = torch.tensor(info.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(info.std).view(1, -1, 1, 1)
        self.sampler = None
        if train and world_size > 1:
            from torch.utils.data import DistributedSampler

            self.sampler = DistributedSampler(range(len(labels)), num_replicas=world_size,
                                              rank=rank, shuffle=True, seed=seed,
                                              drop_last=drop_last)

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        if self.sampler is not None:
            return self.sampler.num_samples
        if self.train:
            return len(self.labels)
        return len(shard_indices(len(self.labels), self.rank, self.world_size))

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def _order(self) -> torch.Tensor:
        if self.sampler is not None:
            return torch.tensor(list(self.sampler), dtype=torch.long)
        if self.train:
            return torch.randperm(len(self.labels), generator=self.generator)
        return shard_indices(len(self.labels), self.rank, self.world_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            idx = order[start:start + self.batch_size]
            images = self.images[idx]
            if self.augment:
                if self.info.crop_padding:
                    images = random_crop(images, self.info.crop_padding, self.generator)
                images = random_flip(images, self.generator)
            images = (images.float().div_(255) - self.mean) / self.std
            yield images, self.labels[idx]


# ----------------------------------------------------------------------------------------------
# ImageNet-style folders (torchvision)
# ----------------------------------------------------------------------------------------------
def _imagefolder(data_dir, batch_size, eval_batch_size, image_size, augment, seed, rank,
                 world_size, workers, train_subset):
    try:
        from torchvision import datasets, transforms
    except ImportError:
        raise DataError("imagefolder needs torchvision: pip install 'leanconv[vision]'") from None
    from torch.utils.data import DataLoader, DistributedSampler, Subset

    if data_dir is None:
        raise DataError("imagefolder needs --data-dir DIR with train/ and val/ class folders")
    root = Path(data_dir)
    for part in ("train", "val"):
        if not (root / part).is_dir():
            raise DataError(f"imagefolder: {root / part} not found; --data-dir must hold "
                            "train/ and val/, each with one sub-folder per class")
    info = DATASETS["imagefolder"]
    normalize = transforms.Normalize(info.mean, info.std)
    resize = round(image_size / 0.875)  # 224 -> 256
    train_tf = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    if not augment:
        train_tf = [transforms.Resize(resize), transforms.CenterCrop(image_size)]
    train_set = datasets.ImageFolder(root / "train", transforms.Compose(
        [*train_tf, transforms.ToTensor(), normalize]))
    test_set = datasets.ImageFolder(root / "val", transforms.Compose(
        [transforms.Resize(resize), transforms.CenterCrop(image_size), transforms.ToTensor(),
         normalize]))
    if train_set.classes != test_set.classes:
        raise DataError(f"imagefolder: train/ and val/ class folders differ under {root}")
    if train_subset:
        train_set = Subset(train_set, _subset(len(train_set), train_subset, seed).tolist())
    generator = torch.Generator().manual_seed(seed + 7919 * rank)
    if world_size > 1:
        sampler = DistributedSampler(train_set, world_size, rank, shuffle=True, seed=seed)
        train = DataLoader(train_set, batch_size, sampler=sampler, num_workers=workers,
                           generator=generator)
    else:
        train = DataLoader(train_set, batch_size, shuffle=True, generator=generator,
                           num_workers=workers)
    test = DataLoader(Subset(test_set, shard_indices(len(test_set), rank, world_size).tolist()),
                      eval_batch_size, shuffle=False, num_workers=workers)
    info = DataInfo("imagefolder", len(test_set.classes), 3, image_size, info.mean, info.std, 0,
                    "imagenet")
    return info, train, test


# ----------------------------------------------------------------------------------------------
def _subset(n: int, size: int, seed: int) -> torch.Tensor:
    """A fixed random subset of ``size`` indices out of ``n`` (sorted), chosen by ``seed``."""
    if size >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:size].sort().values


def load_arrays(name: str, split: str, data_dir=None):
    """``(images uint8 (N, C, H, W), labels int64)`` of an in-memory dataset."""
    if name == "fashion-mnist":
        return load_fashion_mnist(split, data_dir)
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, split, data_dir)
    if name == "synthetic":
        return load_synthetic(split)
    dataset_info(name)
    raise DataError(f"{name} is not an in-memory dataset")


def build_data(name: str, *, batch_size: int, eval_batch_size: int | None = None,
               data_dir=None, augment: bool = True, seed: int = 0, rank: int = 0,
               world_size: int = 1, train_subset: int | None = None,
               test_subset: int | None = None, image_size: int | None = None,
               workers: int = 0):
    """``(info, train_loader, test_loader)`` of dataset ``name`` for this rank.

    ``train_subset``/``test_subset`` keep a fixed random subset (chosen by ``seed`` and ``0``).
    The train loader has a ``generator`` whose state a checkpoint saves (imagefolder's random
    transforms draw from torch's global generator, which a checkpoint saves too); the test
    loader covers this rank's shard, without padding.
    """
    info = dataset_info(name)
    eval_batch_size = eval_batch_size or batch_size
    if name == "imagefolder":
        return _imagefolder(data_dir, batch_size, eval_batch_size, image_size or 224, augment,
                            seed, rank, world_size, workers, train_subset)
    loaders = []
    for split in ("train", "test"):
        images, labels = load_arrays(name, split, data_dir)
        subset = train_subset if split == "train" else test_subset
        if subset:
            keep = _subset(len(labels), subset, seed if split == "train" else 0)
            images, labels = images[keep], labels[keep]
        loaders.append(TensorLoader(
            images, labels, info, batch_size=batch_size if split == "train" else eval_batch_size,
            train=split == "train", augment=augment, seed=seed, rank=rank,
            world_size=world_size))
    return info, loaders[0], loaders[1]
