"""Sample grids: float NCHW [-1, 1] -> one PNG (written atomically)."""
from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image

from dmd_dar.checkpoint import atomic_write_bytes


def image_grid(images: torch.Tensor, nrow: int, padding: int = 2, pad_value: float = 1.0) -> np.ndarray:
    """uint8 HWC grid of `images` (float NCHW in [-1, 1]), `nrow` images per row."""
    images = images.detach().float().cpu().clamp(-1, 1)
    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), pad_value)
    for i in range(n):
        r, k = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        grid[:, top : top + h, left : left + w] = images[i]
    arr = ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return arr[..., 0] if c == 1 else arr


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8, scale: int = 1) -> None:
    """Write a PNG grid; `scale` > 1 enlarges it (nearest) so small images are easy to look at."""
    img = Image.fromarray(image_grid(images, nrow))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
