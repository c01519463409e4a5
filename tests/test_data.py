"""Dataset readers (tiny files written in each standard format), batched augmentation, loaders."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

import leanconv.data as D


def _idx(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + (
        array.astype(np.uint8).tobytes())


def _write_fashion(folder, n_train=20, n_test=10, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        arrays[split] = (images, labels)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{split}-{kind}-ubyte"
            data = _idx(arr)
            if gz:
                with gzip.open(folder / (name + ".gz"), "wb") as f:
                    f.write(data)
            else:
                (folder / name).write_bytes(data)
    return arrays


@pytest.fixture
def no_system_fashion(monkeypatch, tmp_path):
    monkeypatch.setattr(D, "FASHION_MNIST_DIR", tmp_path / "absent")


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_files(tmp_path, no_system_fashion, gz):
    arrays = _write_fashion(tmp_path / "fashion-mnist", gz=gz)
    images, labels = D.load_fashion_mnist("train", tmp_path / "fashion-mnist")
    assert images.shape == (20, 1, 28, 28) and images.dtype == torch.uint8
    assert torch.equal(images[:, 0], torch.from_numpy(arrays["train"][0]))
    assert torch.equal(labels, torch.from_numpy(arrays["train"][1]).long())
    # the folder itself or its parent with a fashion-mnist/ sub-folder
    images, labels = D.load_fashion_mnist("test", tmp_path)
    assert images.shape == (10, 1, 28, 28)
    info, train, test = D.build_data("fashion-mnist", batch_size=8, data_dir=tmp_path)
    assert (info.num_classes, info.in_channels, len(train), len(test)) == (10, 1, 3, 2)
    x, _ = next(iter(test))
    mean, std = 0.2860, 0.3530
    expected = (torch.from_numpy(arrays["t10k"][0][:8]).float() / 255 - mean) / std
    torch.testing.assert_close(x[:, 0], expected)


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path, no_system_fashion):
    with pytest.raises(D.DataError, match=r"apt-get install dataset-fashion-mnist.*--data-dir"):
        D.load_fashion_mnist("train", tmp_path)


def test_truncated_idx_file(tmp_path, no_system_fashion):
    _write_fashion(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(D.DataError, match="truncated"):
        D.load_fashion_mnist("train", tmp_path)


@pytest.mark.skipif(not (D.FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_system_fashion_mnist():
    images, labels = D.load_fashion_mnist("test")
    assert images.shape == (10000, 1, 28, 28)
    assert torch.equal(labels.bincount(), torch.full((10,), 1000))
    assert abs(images.float().mean().item() / 255 - 0.2860) < 0.01


def _write_cifar(root, name):
    rng = np.random.default_rng(1)
    if name == "cifar10":
        folder, key = root / "cifar-10-batches-py", b"labels"
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    else:
        folder, key = root / "cifar-100-python", b"fine_labels"
        files = ["train", "test"]
    folder.mkdir(parents=True)
    batches = {}
    for fname in files:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        labels = rng.integers(0, 100 if name == "cifar100" else 10, 4).tolist()
        with open(folder / fname, "wb") as f:
            pickle.dump({b"data": data, key: labels, b"batch_label": b"x"}, f)
        batches[fname] = (data, labels)
    return batches


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickle_batches(tmp_path, name):
    batches = _write_cifar(tmp_path, name)
    images, labels = D.load_cifar(name, "train", tmp_path)
    n_train = 20 if name == "cifar10" else 4
    assert images.shape == (n_train, 3, 32, 32) and labels.shape == (n_train,)
    first = next(iter(batches.values()))
    # row layout: 1024 red, then 1024 green, then 1024 blue values, each row-major
    assert images[0, 1, 0, 5].item() == first[0][0, 1024 + 5]
    assert images[0, 2, 31, 31].item() == first[0][0, 3071]
    assert labels[:4].tolist() == first[1]
    info, train, _ = D.build_data(name, batch_size=4, data_dir=tmp_path)
    assert info.num_classes == (10 if name == "cifar10" else 100)
    x, _ = next(iter(train))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32


def test_cifar_missing(tmp_path):
    with pytest.raises(D.DataError, match="needs --data-dir"):
        D.load_cifar("cifar10", "train", None)
    with pytest.raises(D.DataError, match=r"data_batch_1 not found.*cs\.toronto\.edu"):
        D.load_cifar("cifar10", "train", tmp_path)


def test_imagefolder(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    pytest.importorskip("torchvision")
    rng = np.random.default_rng(2)
    for part, n in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / part / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / part / cls / f"{i}.png")
    info, train, test = D.build_data("imagefolder", batch_size=4, data_dir=tmp_path,
                                     image_size=16)
    assert (info.num_classes, info.in_channels, info.image_size) == (2, 3, 16)
    x, _ = next(iter(train))
    assert x.shape == (4, 3, 16, 16)
    assert sum(len(yb) for _, yb in test) == 4
    with pytest.raises(D.DataError, match="train/ and val/"):
        D.build_data("imagefolder", batch_size=4, data_dir=tmp_path / "train")


def test_unknown_dataset():
    with pytest.raises(D.DataError, match=r"unknown dataset 'mnist'.*fashion-mnist"):
        D.build_data("mnist", batch_size=4)


def test_synthetic_is_fixed_and_learnable_in_shape():
    a, la = D.load_synthetic("train")
    b, lb = D.load_synthetic("train")
    assert torch.equal(a, b) and torch.equal(la, lb) and a.shape == (512, 3, 32, 32)
    t, _ = D.load_synthetic("test")
    assert t.shape == (256, 3, 32, 32) and not torch.equal(a[:256], t)


# ----------------------------------------------------------------------------------------------
# Batched augmentation equals the per-sample definition
# ----------------------------------------------------------------------------------------------
def test_random_crop_matches_per_sample_crop():
    images = torch.randint(0, 256, (6, 2, 7, 9), dtype=torch.uint8)
    out = D.random_crop(images, 2, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    dy, dx = torch.randint(0, 5, (6,), generator=g), torch.randint(0, 5, (6,), generator=g)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(6):
        y, x = int(dy[i]), int(dx[i])
        assert torch.equal(out[i], padded[i, :, y:y + 7, x:x + 9])
    assert out.shape == images.shape


def test_random_flip_flips_about_half():
    images = torch.arange(1000 * 4).reshape(1000, 1, 1, 4)
    out = D.random_flip(images, torch.Generator().manual_seed(0))
    flipped = (out != images).any(3).flatten()
    assert torch.equal(out[flipped], images[flipped].flip(3))
    assert torch.equal(out[~flipped], images[~flipped])
    assert 400 < flipped.sum().item() < 600


# ----------------------------------------------------------------------------------------------
# Loaders: order, subsets, shards
# ----------------------------------------------------------------------------------------------
def _loader(n=50, **kw):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    info = D.DataInfo("toy", 10, 1, 4, (0.0,), (1 / 255,), 0)
    return D.TensorLoader(images, torch.arange(n), info, **kw)


def test_train_loader_is_a_seeded_permutation():
    loader = _loader(batch_size=8, train=True, augment=False, seed=3)
    labels = torch.cat([y for _, y in loader])
    assert sorted(labels.tolist()) == list(range(50)) and labels.tolist() != list(range(50))
    x, y = next(iter(_loader(batch_size=8, train=True, augment=False, seed=3)))
    torch.testing.assert_close(x[:, 0, 0, 0], y.float())  # images travel with their labels
    # the generator state fully determines the next epoch
    state = loader.generator.get_state()
    epoch2 = torch.cat([y for _, y in loader])
    loader.generator.set_state(state)
    assert torch.equal(torch.cat([y for _, y in loader]), epoch2)
    assert not torch.equal(epoch2, labels)


def test_eval_shards_cover_every_sample_once():
    seen = []
    for rank in range(3):
        loader = _loader(n=50, batch_size=7, train=False, rank=rank, world_size=3)
        seen += torch.cat([y for _, y in loader]).tolist()
    assert sorted(seen) == list(range(50))


def test_distributed_train_loader_uses_distributed_sampler():
    orders = []
    for rank in range(2):
        loader = _loader(n=50, batch_size=5, train=True, augment=False, rank=rank, world_size=2)
        loader.set_epoch(1)
        assert len(loader) == 5 and loader.num_samples == 25
        orders.append(torch.cat([y for _, y in loader]))
        loader.set_epoch(2)
        assert not torch.equal(torch.cat([y for _, y in loader]), orders[-1])
    assert len(set(orders[0].tolist()) | set(orders[1].tolist())) == 50


def test_train_subset_is_fixed_by_the_seed():
    _, a, _ = D.build_data("synthetic", batch_size=16, train_subset=40, seed=0)
    _, b, _ = D.build_data("synthetic", batch_size=16, train_subset=40, seed=0)
    _, c, _ = D.build_data("synthetic", batch_size=16, train_subset=40, seed=1)
    assert len(a.labels) == 40 and torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)
