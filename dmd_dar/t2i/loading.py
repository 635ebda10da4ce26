"""Loading what a text-to-image run names: transformers, VAEs, text encoders (one hub-or-local loader for all),
the prompt-embedding cache of a run, and weight dtypes. Anything unavailable is one UserError line."""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dmd_dar.checkpoint import hub_offline
from dmd_dar.errors import UserError
from dmd_dar.models.architectures import Architecture, architecture
from dmd_dar.t2i.adapters import DiffusersDenoiser
from dmd_dar.t2i.config import T2IConfig, text_to_image_architecture
from dmd_dar.t2i.text import (
    PromptCache,
    PromptEncoder,
    build_prompt_cache,
    fixed_length,
    load_prompt_cache,
    pipeline_prompt_encoder,
)
from dmd_dar.t2i.tiny import build_tiny_vae

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_component(cls: type, source: str | os.PathLike, subfolder: str | None, what: str,
                   torch_dtype: torch.dtype | None = None, hint: str = "", **options: Any):
    """`cls.from_pretrained` of one pipeline component (`what`: "teacher weights", "VAE", "text encoders") from a
    local pipeline root (with `subfolder/`), the component's own folder, or a hub id. A missing folder, a hub id
    offline or a damaged folder is one UserError line (`hint`: what else the user may pass instead)."""
    source = str(source)
    path = Path(source).expanduser()
    # "org/name" is a hub id unless such a folder exists; anything else with a slash count != 1 is a path
    local = path.is_absolute() or source.startswith((".", "~")) or path.exists() or source.count("/") != 1
    instead = f"; {hint}" if hint else ""
    if torch_dtype is not None:
        options["torch_dtype"] = torch_dtype
    if local:
        if not path.is_dir():
            raise UserError(f"{what} not found at {path}: pass an existing local diffusers folder (or a hub id online){instead}")
        if subfolder and (path / subfolder).is_dir():  # else the folder is the component's own folder
            options["subfolder"] = subfolder
    elif subfolder:
        options["subfolder"] = subfolder
    try:
        with warnings.catch_warnings():  # diffusers passes a deprecated hub argument: not the user's concern
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            return cls.from_pretrained(str(path) if local else source, **options)
    except Exception as err:  # huggingface_hub / diffusers raise many types for "not there"
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if not local:
            reason = "the hub is switched off (HF_HUB_OFFLINE)" if hub_offline() else f"the hub could not be reached: {first_line}"
            raise UserError(f"{what} of hub id {source!r}: not available offline ({reason}); download them on a machine "
                            f"with network and pass the local path{instead}") from None
        raise UserError(f"cannot load the {what} ({cls.__name__}) from local folder {path} ({first_line}); check the folder{instead}") from None


def load_transformer(source: str | os.PathLike, arch: str, subfolder: str | None = "transformer",
                     torch_dtype: torch.dtype | None = None, **kwargs):
    """The diffusers transformer of architecture `arch` (sd3, flux, qwen_image, pixart, dit) from a local
    pipeline root (with `transformer/`), the model folder itself, or a hub id."""
    return load_component(architecture(arch).diffusers_class(), source, subfolder, "teacher weights", torch_dtype, **kwargs)


def load_teacher(source: str | os.PathLike, arch: str, torch_dtype: torch.dtype | None = None, prediction: str | None = None,
                 alphas_cumprod: Tensor | None = None, guidance: float | None = 3.5, subfolder: str | None = "transformer",
                 **kwargs) -> DiffusersDenoiser:
    """Load a diffusers transformer (frozen, eval) and wrap it as an x0 denoiser (`DiffusersDenoiser`)."""
    model = load_transformer(source, arch, subfolder=subfolder, torch_dtype=torch_dtype, **kwargs)
    model.requires_grad_(False)
    return DiffusersDenoiser(model.eval(), prediction=prediction, alphas_cumprod=alphas_cumprod, guidance=guidance)


def load_vae(source: str, arch: Architecture, latent_channels: int, dtype: torch.dtype | None = None) -> nn.Module:
    """The VAE of a T2I pipeline (`vae/` of a pipeline root, a VAE folder, a hub id) or "tiny" (random), frozen."""
    if source == "tiny":
        return build_tiny_vae(arch, latent_channels)
    return load_component(arch.vae_class(), source, "vae", "VAE", dtype).eval().requires_grad_(False)


def pipeline_text_encoder(source: str, arch: Architecture, dtype: torch.dtype, device,
                          max_sequence_length: int | None = None) -> PromptEncoder:
    """`encode(prompts) -> TextCondition` with a pipeline's own text encoders, loaded without its transformer and
    VAE from a pipeline root (local folder with model_index.json, or a hub id)."""
    import diffusers

    path = Path(source).expanduser()
    if path.exists() and not (path / "model_index.json").is_file():
        raise UserError(f"{path} is not a pipeline root (no model_index.json), so it has no text encoders: pass the "
                        "pipeline folder, or a precomputed prompt-embedding cache")
    pipe = load_component(diffusers.DiffusionPipeline, source, None, "text encoders", dtype,
                          hint="or pass a precomputed prompt-embedding cache", transformer=None, vae=None)
    pipe.to(device)
    encode = pipeline_prompt_encoder(pipe, max_sequence_length, device)
    if not arch.padded_prompts:  # the cache and CFG need one length for all prompts
        encode = fixed_length(encode, max_sequence_length or 512)
    return encode


# ------------------------------------------------------------------------------------------ the prompt cache of a run
class _LazyEncoder:
    """Builds the text encoder (`make()`) only when the prompt cache has to be (re)built."""

    def __init__(self, make: Callable[[], PromptEncoder]):
        self.make, self.encode = make, None

    def __call__(self, prompts: list[str]):
        if self.encode is None:
            self.encode = self.make()
        return self.encode(prompts)


def prompt_cache_path(cfg: T2IConfig) -> Path:
    if cfg.prompts is None and cfg.embeddings_cache is None:
        raise UserError("a diffusers teacher needs prompts: set t2i.prompts (a file, one prompt per line) "
                        "and/or t2i.embeddings_cache (a precomputed cache)")
    return Path(cfg.embeddings_cache or f"{cfg.prompts}.{cfg.model_class}.safetensors")


def prepare_prompt_cache(teacher: str | None, cfg: T2IConfig, device="cpu", encoder: PromptEncoder | None = None) -> PromptCache:
    """The prompt-embedding cache of a run (`PromptCache`): loaded when it holds exactly the prompts of t2i.prompts
    (or t2i.prompts is unset), else encoded with `encoder` or the pipeline's text encoders (t2i.text_encoder,
    default the teacher's pipeline root) and written. Run it once before a multi-GPU launch so that the ranks do
    not all load the text encoders (docs/t2i.md)."""
    path = prompt_cache_path(cfg)
    if cfg.prompts is None:
        return load_prompt_cache(path)
    arch = text_to_image_architecture(cfg.model_class)

    def text_encoder() -> PromptEncoder:
        source = cfg.text_encoder or teacher
        if source is None:
            raise UserError(f"the prompt cache {path} must be built: set t2i.text_encoder (a pipeline folder with the text encoders)")
        return pipeline_text_encoder(source, arch, resolve_dtype(cfg.dtype), device, cfg.max_sequence_length)

    return build_prompt_cache(cfg.prompts, path, encoder or _LazyEncoder(text_encoder))
