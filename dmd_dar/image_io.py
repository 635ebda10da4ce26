"""Image files at the boundary of the library: uint8 NHWC on disk, float NCHW in [-1, 1] inside.

Supported image sets (`load_images`):
- a folder of PNG (or JPEG) files, read in name order;
- an `.npz` file whose `arr_0` is uint8 N x H x W x C (C = 1 or 3; the ADM evaluator format);
- a sampling run's output folder that contains `samples.npz` (used in preference to any PNGs there).

Every problem with a path or an array (missing, empty, wrong shape or dtype) raises UserError with one
line that says what is wrong.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dmd_dar.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SAMPLES_FILE = "samples.npz"
NPZ_KEY = "arr_0"


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
    images = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float()
    return images / 127.5 - 1.0


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


def _read_npz(path: Path) -> np.ndarray:
    try:
        with np.load(path) as data:
            if NPZ_KEY not in data.files:
                raise UserError(f"{path}: no '{NPZ_KEY}' array in the .npz (found {data.files}); save images as arr_0")
            return data[NPZ_KEY]
    except UserError:
        raise
    except Exception as err:  # zip/pickle errors: a damaged or foreign file
        raise UserError(f"{path}: cannot read as .npz ({type(err).__name__}: {err})") from err


def _read_image_file(path: Path) -> np.ndarray:
    """One image file -> uint8 H x W x C; transparency is composited onto white."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGBA", "LA", "P", "PA") or "transparency" in img.info:
                rgba = img.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(white, rgba).convert("RGB")
            elif img.mode not in ("L", "RGB"):
                img = img.convert("RGB")
            array = np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read image ({err})") from err
    return array[..., None] if array.ndim == 2 else array


def _read_image_folder(folder: Path) -> np.ndarray:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"{folder}: no PNG/JPEG images and no {SAMPLES_FILE} in this folder")
    arrays = [_read_image_file(p) for p in files]
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        raise UserError(f"{folder}: images have different sizes {sorted(sizes)}; resize them to one size first")
    if any(a.shape[-1] == 3 for a in arrays):  # mixed grey and colour: promote grey to RGB
        arrays = [np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a for a in arrays]
    return np.stack(arrays)


def load_uint8_nhwc(path: str | os.PathLike, limit: int | None = None) -> np.ndarray:
    """Read an image set (folder of images, .npz, or a run folder with samples.npz) as uint8 NHWC."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder (expected an image folder, a .npz, or a run folder with {SAMPLES_FILE})")
    if path.is_dir():
        array = _read_npz(path / SAMPLES_FILE) if (path / SAMPLES_FILE).is_file() else _read_image_folder(path)
    elif path.suffix.lower() == ".npz":
        array = _read_npz(path)
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        array = _read_image_file(path)[None]
    else:
        raise UserError(f"{path}: not an image folder, .npz or image file")
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] not in (1, 3) or array.shape[0] == 0:
        raise UserError(
            f"{path}: expected uint8 images shaped (N, H, W, C) with C = 1 or 3, "
            f"got dtype {array.dtype} shape {tuple(array.shape)}"
        )
    if limit is not None:
        if limit < 1:
            raise UserError(f"limit must be a positive number of images, got {limit}")
        array = array[:limit]
    return array


def load_images(path: str | os.PathLike, limit: int | None = None) -> torch.Tensor:
    """Read an image set as float32 NCHW in [-1, 1] (see the module docstring for the formats)."""
    return from_uint8_nhwc(load_uint8_nhwc(path, limit))


def save_images(images: Any, path: str | os.PathLike) -> Path:
    """Write float NCHW [-1, 1] images: `*.npz` -> one file with arr_0 (uint8 NHWC); else a folder of
    PNGs 000000.png, 000001.png, ... Written atomically (temp + rename); an existing .npz or PNG-only
    folder is replaced.
    """
    array = to_uint8_nhwc(images)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".npz":
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.npz", dir=path.parent)
        os.close(fd)
        try:
            np.savez(tmp, arr_0=array)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: exists and is not a folder; choose another output path")
    if path.is_dir() and any(p.suffix.lower() != ".png" for p in path.iterdir()):
        raise UserError(f"{path}: folder holds files other than PNGs; refusing to replace it, choose another path")
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        tmp_dir.chmod(0o755)  # mkdtemp makes it private
        digits = max(6, len(str(len(array) - 1)))
        for i, image in enumerate(array):
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(tmp_dir / f"{i:0{digits}d}.png")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp_dir, path)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return path
