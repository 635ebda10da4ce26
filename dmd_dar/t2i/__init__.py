"""Text-to-image teachers (diffusers SD3, Flux, Qwen-Image, PixArt) for DMD: config, text conditions and the prompt
cache, the x0 adapter, latents, loading, tiny test models, and `DiffusersFamily` (the trainer's model family).

Modules, each importing only those above it: config <- text <- latents <- adapters <- tiny <- loading <- family.
"""
from dmd_dar.t2i.adapters import DiffusersDenoiser, ddpm_linear_alphas_cumprod
from dmd_dar.t2i.config import T2IConfig, text_to_image_architecture
from dmd_dar.t2i.latents import (
    LATENT_PREVIEW_RANGE,
    decode_latents,
    flux_image_ids,
    latent_channels,
    latent_preview,
    pack_latents,
    unpack_latents,
    vae_downsample_factor,
)
from dmd_dar.t2i.loading import (
    DTYPES,
    load_component,
    load_teacher,
    load_transformer,
    load_vae,
    pipeline_text_encoder,
    prepare_prompt_cache,
    prompt_cache_path,
    resolve_dtype,
)
from dmd_dar.t2i.text import (
    PromptCache,
    PromptEncoder,
    TextCondition,
    as_text_condition,
    build_prompt_cache,
    encode_in_batches,
    fixed_length,
    load_prompt_cache,
    pipeline_prompt_encoder,
    read_prompts,
    save_prompt_cache,
    transformers_prompt_encoder,
)
from dmd_dar.t2i.tiny import build_tiny_transformer, build_tiny_vae, tiny_prompt_encoder, tiny_transformer_config


def __getattr__(name: str):
    # The family imports diffusers (several seconds): only on first use, so that `import dmd_dar.t2i` (the
    # trainer's T2IConfig, DiT-only runs, machines without diffusers) stays light.
    if name == "DiffusersFamily":
        from dmd_dar.t2i.family import DiffusersFamily

        return DiffusersFamily
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DTYPES", "LATENT_PREVIEW_RANGE", "DiffusersDenoiser", "DiffusersFamily", "PromptCache", "PromptEncoder", "T2IConfig",
    "TextCondition", "as_text_condition", "build_prompt_cache", "build_tiny_transformer", "build_tiny_vae",
    "ddpm_linear_alphas_cumprod", "decode_latents", "encode_in_batches", "fixed_length", "flux_image_ids",
    "latent_channels", "latent_preview", "load_component", "load_prompt_cache", "load_teacher", "load_transformer",
    "load_vae", "pack_latents", "pipeline_prompt_encoder", "pipeline_text_encoder", "prepare_prompt_cache",
    "prompt_cache_path", "read_prompts", "resolve_dtype", "save_prompt_cache", "text_to_image_architecture",
    "tiny_prompt_encoder", "tiny_transformer_config", "transformers_prompt_encoder", "unpack_latents",
    "vae_downsample_factor",
]
