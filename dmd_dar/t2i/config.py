"""Settings of a diffusers text-to-image teacher (the `t2i:` section of a distillation config)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dmd_dar.errors import UserError
from dmd_dar.models.architectures import CLASS_NAMES, TEXT_TO_IMAGE_CLASS_NAMES, Architecture, architecture_of_class


@dataclass
class T2IConfig:
    """Settings of a diffusers teacher (used when `backbone: diffusers`)."""

    model_class: str = "SD3Transformer2DModel"  # a text-to-image class of dmd_dar.models.architectures
    subfolder: str | None = "transformer"  # of a pipeline root; a model folder itself works too
    dtype: str = "float32"  # weights of teacher, student and fake: float32 | bfloat16 | float16
    prediction: str | None = None  # flow | vp_eps | vp_v; None = the architecture's default (PixArt: vp_eps)
    tiny: bool = False  # a tiny random model of model_class (offline tests); also `teacher: tiny`
    tiny_config: dict[str, Any] = field(default_factory=dict)  # overrides of the tiny model's config
    prompts: str | None = None  # prompts file, one per line (None: the prompts stored in embeddings_cache)
    embeddings_cache: str | None = None  # safetensors prompt cache (dmd_dar.t2i.text); default <prompts>.<class>.safetensors
    text_encoder: str | None = None  # pipeline root holding the text encoders (default: the teacher)
    max_sequence_length: int | None = None  # text tokens (None: the pipeline's default)
    resolution: int = 1024  # pixels; latents are resolution / vae scale factor
    vae: str | None = None  # hub id / path (pipeline root or vae folder), "tiny", or None (latent preview)
    vae_scale_factor: int = 8  # pixels per latent when no VAE is loaded
    guidance_embed: float = 3.5  # guidance-distilled Flux: the guidance the student and fake score are fed
    sampling_shift: float = 1.0  # SD3-style time shift of the teacher's reference sampler
    route_text: bool = False  # also route the text stream of MM-DiTs (SD3, Flux, Qwen-Image)
    sample_batch_size: int = 4  # images per call when the trainer samples grids / report sets (memory)
    lora_mlp: bool = False  # LoRA on the feed-forward linears too (default: attention projections only)


def text_to_image_architecture(model_class: str) -> Architecture:
    """The architecture of t2i.model_class, which must be a text-to-image class."""
    arch = architecture_of_class(model_class) if model_class in CLASS_NAMES else None
    if arch is None or not arch.text_to_image:
        hint = " (class-conditional DiT: family: dit)" if arch is not None else ""
        raise UserError(f"t2i.model_class={model_class!r} is not a text-to-image class; use one of "
                        f"{', '.join(TEXT_TO_IMAGE_CLASS_NAMES)}{hint}")
    return arch
