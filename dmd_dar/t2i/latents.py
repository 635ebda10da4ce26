"""The latent space of diffusers teachers: token packing, Flux position ids, latent channels, and latents -> images
(VAE decoding, or the fixed latent preview when no VAE is available)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from dmd_dar.models.architectures import architecture_of

LATENT_PREVIEW_RANGE = 3.0  # latent visualisation: x / 3 clamped to [-1, 1] (latents are roughly unit variance)


def pack_latents(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C], the 2x2 patch tokens of Flux and Qwen-Image pipelines."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux/Qwen-Image latents need even height and width, got {h}x{w}")
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of `pack_latents` for latents of size height x width."""
    b, _, d = tokens.shape
    c = d // 4
    return tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def flux_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """Flux image position ids [(H/2)(W/2), 3] for latents of size height x width (row, column in axes 1, 2)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def latent_channels(model: nn.Module) -> int:
    """Channels of the (unpacked) latents the transformer denoises."""
    channels = int(model.config["in_channels"])
    return channels // 4 if architecture_of(model).packed_latents else channels


def vae_downsample_factor(vae: nn.Module) -> int:
    """Pixels per latent of a VAE."""
    cfg = vae.config
    if "temperal_downsample" in cfg:  # Qwen-Image's video VAE
        return 2 ** len(cfg["temperal_downsample"])
    return 2 ** (len(cfg["block_out_channels"]) - 1)


def latent_preview(latents: Tensor) -> Tensor:
    """The documented image of latents when no VAE is available: the first 3 channels (or channel 0 alone when
    there are fewer than 3), divided by 3 and clamped to [-1, 1]. A fixed map, the same for every sample, so
    teacher and student previews compare (per-image normalisation would hide contrast differences)."""
    x = latents.float()
    x = x[:, :3] if x.shape[1] >= 3 else x[:, :1]
    return (x / LATENT_PREVIEW_RANGE).clamp(-1, 1)


@torch.no_grad()
def decode_latents(vae: nn.Module | None, latents: Tensor, batch: int = 4) -> Tensor:
    """Latents (the transformer's space) -> images float NCHW in [-1, 1]: undo the pipeline's latent scaling,
    VAE-decode in chunks; without a VAE, `latent_preview`."""
    if vae is None:
        return latent_preview(latents)
    cfg = vae.config
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    out = []
    for chunk in latents.split(batch):
        z = chunk.to(device=device, dtype=torch.float32)
        if cfg.get("latents_mean") is not None and "temperal_downsample" in cfg:  # Qwen-Image VAE: one video frame
            mean = torch.tensor(cfg["latents_mean"], device=device).view(1, -1, 1, 1)
            std = torch.tensor(cfg["latents_std"], device=device).view(1, -1, 1, 1)
            image = vae.decode((z * std + mean).unsqueeze(2).to(dtype), return_dict=False)[0][:, :, 0]
        else:
            z = z / cfg.get("scaling_factor", 1.0) + (cfg.get("shift_factor") or 0.0)
            image = vae.decode(z.to(dtype), return_dict=False)[0]
        out.append(image.float().clamp(-1, 1))
    return torch.cat(out)
