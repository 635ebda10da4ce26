"""Image files at the boundary of the library: uint8 NHWC on disk, float NCHW in [-1, 1] inside.

Supported image sets (`load_images`):
- a folder of PNG (or JPEG) files, read in name order;
- an `.npz` file whose `arr_0` is uint8 N x H x W x C (C = 1 or 3; the ADM evaluator format);
- a sampling run's output folder that contains `samples.npz` (used in preference to any PNGs there).

Every problem with a path or an array (missing, empty, wrong shape or dtype) raises UserError with one
line that says what is wrong.

The readers of single files (`read_image`, `read_npz`, `image_files`) are shared with `dmd_dar.data`;
writes go through `dmd_dar.checkpoint` (atomic).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dmd_dar.checkpoint import atomic_dir, atomic_write
from dmd_dar.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SAMPLES_FILE = "samples.npz"
NPZ_KEY = "arr_0"
LABELS_KEY = "arr_1"  # optional integer class labels next to the images (dmd_dar.data reads them)
GREY_MODES = ("L", "1", "I;16", "I")  # PIL modes read as one grey channel


def from_uint8_nhwc(array: Any) -> torch.Tensor:
    """uint8 N x H x W x C (numpy or torch) -> float32 torch N x C x H x W in [-1, 1]."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise UserError(f"expected uint8 images (N, H, W, C), got dtype {array.dtype}")
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise UserError(
            f"expected uint8 images shaped (N, H, W, C) with C = 1 or 3, got shape {tuple(array.shape)}"
        )
    if array.shape[0] == 0:
        raise UserError(f"the image array is empty (shape {tuple(array.shape)})")
    # In place after the one copy that .float() makes: a whole dataset is converted at once.
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def to_uint8_nhwc(images: Any) -> np.ndarray:
    """float N x C x H x W in [-1, 1] (torch or numpy) -> uint8 numpy N x H x W x C (values clamped)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise UserError(f"expected float images NCHW in [-1, 1], got {getattr(images, 'dtype', type(images))}")
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise UserError(f"expected float images (N, C, H, W) with C = 1 or 3, got shape {tuple(images.shape)}")
    if not bool(torch.isfinite(images).all()):
        raise UserError("cannot save images that contain NaN or inf")
    scaled = ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255)
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def check_uint8_nhwc(array: np.ndarray, where: str | os.PathLike) -> np.ndarray:
    """`array` itself if it is a non-empty uint8 N x H x W x C with C = 1 or 3, else a UserError naming `where`."""
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] not in (1, 3) or array.shape[0] == 0:
        raise UserError(
            f"{where}: expected uint8 images shaped (N, H, W, C) with C = 1 or 3, "
            f"got dtype {array.dtype} shape {tuple(array.shape)}"
        )
    return array


def read_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """The images (`arr_0`, unchecked) and the labels (`arr_1`, or None) of an `.npz`."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            if NPZ_KEY not in data.files:
                raise UserError(f"{path}: no '{NPZ_KEY}' array in the .npz (found {data.files}); "
                                f"store images as {NPZ_KEY} uint8 NHWC")
            return data[NPZ_KEY], (data[LABELS_KEY] if LABELS_KEY in data.files else None)
    except UserError:
        raise
    except Exception as err:  # zip/npy errors: a damaged or foreign file
        raise UserError(f"{path}: cannot read as .npz ({type(err).__name__}: {err})") from err


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The PNG/JPEG files directly in `folder`, in name order."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """One image file -> uint8 H x W x C: C = 1 for grey, 3 for colour; transparency is composited onto white."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGBA", "LA", "PA", "P") or "transparency" in img.info:
                rgba = img.convert("RGBA")  # palette images carry their transparency into the alpha channel
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                array = np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
            elif img.mode in GREY_MODES:
                array = np.asarray(img.convert("L"))[..., None]
            else:
                array = np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read image ({err})") from err
    return array


def as_rgb(array: np.ndarray) -> np.ndarray:
    """uint8 ... x C with C = 1 or 3 -> ... x 3 (grey repeated)."""
    return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array


def common_channels(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Images read from one set: all grey stays grey; mixed grey and colour promotes the grey ones to RGB."""
    return [as_rgb(a) for a in arrays] if any(a.shape[-1] == 3 for a in arrays) else list(arrays)


def _read_image_folder(folder: Path) -> np.ndarray:
    files = image_files(folder)
    if not files:
        raise UserError(f"{folder}: no PNG/JPEG images and no {SAMPLES_FILE} in this folder")
    arrays = [read_image(p) for p in files]
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        raise UserError(f"{folder}: images have different sizes {sorted(sizes)}; resize them to one size first")
    return np.stack(common_channels(arrays))


def load_uint8_nhwc(path: str | os.PathLike, limit: int | None = None) -> np.ndarray:
    """Read an image set (folder of images, .npz, or a run folder with samples.npz) as uint8 NHWC."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder (expected an image folder, a .npz, or a run folder with {SAMPLES_FILE})")
    if path.is_dir():
        array = read_npz(path / SAMPLES_FILE)[0] if (path / SAMPLES_FILE).is_file() else _read_image_folder(path)
    elif path.suffix.lower() == ".npz":
        array = read_npz(path)[0]
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        array = read_image(path)[None]
    else:
        raise UserError(f"{path}: not an image folder, .npz or image file")
    check_uint8_nhwc(array, path)
    if limit is not None:
        if limit < 1:
            raise UserError(f"limit must be a positive number of images, got {limit}")
        array = array[:limit]
    return array


def split_named_set(spec: str) -> tuple[str, str]:
    """A command line's image set, `NAME=PATH` or `PATH` (then named by its path); a path that itself contains
    `=` and exists is taken whole."""
    name, sep, path = spec.partition("=")
    return (name, path) if sep and not Path(spec).exists() else (spec, spec)


def load_images(path: str | os.PathLike, limit: int | None = None) -> torch.Tensor:
    """Read an image set as float32 NCHW in [-1, 1] (see the module docstring for the formats)."""
    return from_uint8_nhwc(load_uint8_nhwc(path, limit))


def save_images(images: Any, path: str | os.PathLike) -> Path:
    """Write float NCHW [-1, 1] images: `*.npz` -> one file with arr_0 (uint8 NHWC); else a folder of
    PNGs 000000.png, 000001.png, ... Written atomically (temp + rename); an existing .npz or PNG-only
    folder is replaced, any other folder is refused.
    """
    array = to_uint8_nhwc(images)
    path = Path(path)
    if path.suffix.lower() == ".npz":
        return atomic_write(path, lambda tmp: np.savez(tmp, **{NPZ_KEY: array}))
    digits = max(6, len(str(len(array) - 1)))
    with atomic_dir(path, own_files=lambda name: name.lower().endswith(".png"), previous="a folder of PNGs") as tmp:
        for i, image in enumerate(array):
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(tmp / f"{i:0{digits}d}.png")
    return path
