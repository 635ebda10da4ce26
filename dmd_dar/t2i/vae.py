"""The SD-VAE of latent class-conditional models (SiT, REPA and DiT on ImageNet 256): diffusers' `AutoencoderKL`
from a hub id or a local folder ("stabilityai/sd-vae-ft-ema"; REPA trained on the latents of sd-vae-ft-mse, whose
encoder is the same: the two differ only in their fine-tuned decoders), or "tiny" (a seeded random one, tests).

Latents are scaled by the VAE's `scaling_factor` (0.18215 for SD-VAE), as SiT / DiT / REPA train on them:
`encode_images` maps images float NCHW in [-1, 1] to scaled latents, `decode_latents_to_images` maps them back.
Neither switches gradients off (the DMD v1 regression term decodes the student's output); callers wrap them in
`torch.no_grad()` where they only look. A VAE not available offline is one `UserError` line (`load_component`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from dmd_dar.errors import UserError

SD_VAE = "stabilityai/sd-vae-ft-ema"
SD_VAE_SCALE = 0.18215
TINY = "tiny"


def build_tiny_sd_vae(seed: int = 0) -> nn.Module:
    """A tiny random AutoencoderKL with SD-VAE's interface: 4 latent channels, 8 pixels per latent, scale 0.18215."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                            latent_channels=4, norm_num_groups=4, sample_size=64, scaling_factor=SD_VAE_SCALE)
    return vae.eval().requires_grad_(False)


def load_sd_vae(source: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """The VAE `source` names: a hub id, a local VAE folder or a pipeline root (its `vae/`), or "tiny"; frozen."""
    if source == TINY:
        vae = build_tiny_sd_vae()
    else:
        try:
            from diffusers import AutoencoderKL
        except ImportError:
            raise UserError(f"the VAE {source!r} needs diffusers: pip install diffusers (scripts/setup.sh does)") from None
        from dmd_dar.t2i.loading import load_component

        vae = load_component(AutoencoderKL, source, "vae", "VAE", hint="e.g. a local copy of stabilityai/sd-vae-ft-ema")
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def scaling_factor(vae: nn.Module) -> float:
    return float(vae.config.get("scaling_factor") or SD_VAE_SCALE)


def downsample_factor(vae: nn.Module) -> int:
    return 2 ** (len(vae.config["block_out_channels"]) - 1)


def encode_images(vae: nn.Module, images: Tensor, sample: bool = False, generator: torch.Generator | None = None,
                  batch: int = 32) -> Tensor:
    """Images float NCHW in [-1, 1] -> scaled latents (float32, on the VAE's device): the posterior mean, or a draw from
    the posterior (`sample`, with `generator`, a CPU generator, for repeatable draws)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise UserError(f"the VAE encodes RGB images [N, 3, H, W], got {list(images.shape)}")
    factor = downsample_factor(vae)
    if images.shape[-1] % factor or images.shape[-2] % factor:
        raise UserError(f"image size {images.shape[-2]}x{images.shape[-1]} is not a multiple of the VAE's {factor}")
    p = next(vae.parameters())
    out = []
    for chunk in images.split(batch):
        dist = vae.encode(chunk.to(device=p.device, dtype=p.dtype)).latent_dist
        z = dist.mean
        if sample:
            z = z + dist.std * torch.randn(z.shape, generator=generator).to(device=z.device, dtype=z.dtype)
        out.append(z.float() * scaling_factor(vae))
    return torch.cat(out)


def decode_latents_to_images(vae: nn.Module, latents: Tensor, batch: int = 16) -> Tensor:
    """Scaled latents -> images float NCHW in [-1, 1] (float32, on the latents' device), decoded in chunks."""
    p = next(vae.parameters())
    out = []
    for chunk in latents.split(batch):
        z = chunk.to(device=p.device, dtype=torch.float32) / scaling_factor(vae)
        out.append(vae.decode(z.to(p.dtype), return_dict=False)[0].float().clamp(-1, 1).to(latents.device))
    return torch.cat(out)
