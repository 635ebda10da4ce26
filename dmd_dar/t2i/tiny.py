"""Tiny random stand-ins for offline tests: transformers of each text-to-image architecture, VAEs, a prompt encoder.

Used by `teacher: tiny` / `t2i.tiny: true` (the recipes' end-to-end tests) and `t2i.vae: tiny`; seeded, so a tiny
run is repeatable.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from dmd_dar.errors import UserError
from dmd_dar.models.architectures import ARCHITECTURES, Architecture, architecture_of, architecture_of_class
from dmd_dar.t2i.text import PromptEncoder, TextCondition

# Per architecture: a config with 4 latent channels, 2 blocks, width 16.
_TINY_CONFIGS = {
    "sd3": dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
                pos_embed_max_size=16),
    "flux": dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                 joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(2, 2, 4)),
    "qwen_image": dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                       joint_attention_dim=16, axes_dims_rope=(2, 2, 4)),
    "pixart": dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
                   patch_size=2, cross_attention_dim=16, caption_channels=12),
}
TINY_CLASS_NAMES = tuple(a.class_name for a in ARCHITECTURES if a.name in _TINY_CONFIGS)


def tiny_transformer_config(model_class: str, overrides: dict | None = None) -> dict:
    """Config dict of a tiny transformer of `model_class` (a text-to-image diffusers class)."""
    arch = architecture_of_class(model_class)
    if arch.name not in _TINY_CONFIGS:
        raise UserError(f"there is no tiny {model_class}; tiny models exist for {', '.join(TINY_CLASS_NAMES)}")
    return {**_TINY_CONFIGS[arch.name], **(overrides or {})}


def build_tiny_transformer(model_class: str, overrides: dict | None = None, seed: int = 0) -> nn.Module:
    """A tiny random transformer (offline). Every parameter gets N(0, 0.05) noise on top of diffusers' init, so
    the zero-initialised gates and output layers do not make it the zero function."""
    config = tiny_transformer_config(model_class, overrides)
    cls = architecture_of_class(model_class).diffusers_class()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**config)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def build_tiny_vae(arch: Architecture, latent_channels: int, seed: int = 0) -> nn.Module:
    """A tiny random VAE of the architecture's pipelines with a scale factor of 8: AutoencoderKL, or
    AutoencoderKLQwenImage for Qwen-Image."""
    cls = arch.vae_class()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch.vae_class_name == "AutoencoderKLQwenImage":
            return cls(base_dim=4, z_dim=latent_channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                       latents_mean=[0.1] * latent_channels, latents_std=[2.0] * latent_channels).eval()
        return cls(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                   up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                   latent_channels=latent_channels, norm_num_groups=4, sample_size=64, shift_factor=0.1).eval()


def tiny_prompt_encoder(model: nn.Module, seq_len: int = 6) -> PromptEncoder:
    """`encode(prompts) -> TextCondition` with random embeddings of the right widths for a (tiny) model,
    a fixed function of each prompt's text (seeded by its SHA-256). For tests: no text encoder needed."""
    arch, cfg = architecture_of(model), model.config
    width = cfg.get("caption_channels") or cfg.get("joint_attention_dim")
    pooled = cfg.get("pooled_projection_dim") if arch.pooled_text else None

    def encode(prompts: list[str]) -> TextCondition:
        rows = []
        for p in prompts:
            g = torch.Generator().manual_seed(int(hashlib.sha256(p.encode()).hexdigest()[:12], 16))
            rows.append((torch.randn(seq_len, width, generator=g), torch.randn(pooled, generator=g) if pooled else None,
                         int(torch.randint(2, seq_len + 1, (1,), generator=g))))
        mask = torch.stack([(torch.arange(seq_len) < n).long() for _, _, n in rows]) if arch.text_mask else None
        return TextCondition(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]) if pooled else None, mask)

    return encode
