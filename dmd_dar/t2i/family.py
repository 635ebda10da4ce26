"""Text-to-image distillation: diffusers transformers as a DMD model family (see dmd_dar.dmd.family.Family).

`DiffusersFamily(teacher, cfg, device)` gives the trainer what it needs from a diffusers text-to-image transformer
(SD3, Flux, Qwen-Image, PixArt):

- teacher: the stock transformer (frozen, eval) from a hub id / local folder, or a tiny random model of
  `cfg.model_class` (`teacher: tiny` or `t2i.tiny: true`; offline, seeded) for tests, or a model already loaded
  (e.g. an exported student, to sample it: dmd_dar.sampling);
- student / fake score: deep copies of the teacher converted with `convert_to_dar` (the fake's routing is
  residual by default, i.e. the stock function bit for bit), with LoRA (peft) when a rank is given; the routers
  are always fully trainable;
- x0 interface: `dmd_dar.t2i.adapters.DiffusersDenoiser` (flow / VP eps / VP v, per architecture);
- denoising loss: the teacher's own objective in its own parameterisation (velocity MSE for flow models, eps or
  v MSE for VP models);
- real score: CFG (`dmd_dar.diffusion.cfg_denoiser`) against the empty prompt's condition, or, for
  guidance-distilled Flux models (`guidance_embeds`), the guidance embedding instead of CFG;
- conditions: prompt ids -> rows of the prompt-embedding cache (`dmd_dar.t2i.text.PromptCache`);
- samples are latents (C, H/f, W/f); `to_images` decodes them with the VAE when one is configured, else shows a
  fixed latent visualisation (`latent_preview`).

See docs/t2i.md for the recipes (configs/dmd_*.yaml) and what runs where.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from dmd_dar.diffusion import Denoiser, cfg_denoiser, flow_t_to_vp, interpolate, sample
from dmd_dar.errors import UserError
from dmd_dar.models.architectures import FLOW, VP_EPS, architecture_of
from dmd_dar.models.diffusers_dar import (
    BACKBONE_WEIGHTS,
    LEGACY_BACKBONE_WEIGHTS,
    ROUTER_WEIGHTS,
    convert_to_dar,
    load_dar_pretrained,
    save_dar_pretrained,
)
from dmd_dar.models.lora import apply_lora, lora_targets, merge_lora
from dmd_dar.routing import RoutingConfig
from dmd_dar.t2i.adapters import DiffusersDenoiser
from dmd_dar.t2i.config import T2IConfig, text_to_image_architecture
from dmd_dar.t2i.latents import decode_latents, latent_channels, vae_downsample_factor
from dmd_dar.t2i.loading import load_transformer, load_vae, prepare_prompt_cache, resolve_dtype
from dmd_dar.t2i.text import PromptCache
from dmd_dar.t2i.tiny import build_tiny_transformer, tiny_prompt_encoder


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / FSDP(1) / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


class DiffusersFamily:
    """A diffusers text-to-image transformer as a DMD model family (see dmd_dar.dmd.family.Family).

    teacher: a hub id / local folder, "tiny", or a loaded transformer (stock or DAR) of t2i.model_class.
    prompts: the conditions to draw from (default: the run's prompt cache, `prepare_prompt_cache`).
    """

    def __init__(self, teacher: str | nn.Module, cfg: T2IConfig | None, device, prompts: PromptCache | None = None):
        cfg = cfg or T2IConfig()
        self.cfg, self.device = cfg, torch.device(device)
        self.dtype = resolve_dtype(cfg.dtype)
        self.arch = text_to_image_architecture(cfg.model_class)
        self.tiny = cfg.tiny or (isinstance(teacher, str) and teacher == "tiny")
        source = teacher if isinstance(teacher, str) else None
        model = self._load_teacher(source) if source is not None else teacher
        if architecture_of(model) is not self.arch:
            raise UserError(f"{source or 'the model'} holds a {architecture_of(model).class_name}, not t2i.model_class={cfg.model_class}")
        self._teacher = model.to(self.device).eval().requires_grad_(False)

        self.vae = self._load_vae(latent_channels(model))
        self.vae_factor = vae_downsample_factor(self.vae) if self.vae is not None else cfg.vae_scale_factor
        self.sample_shape = self._latent_shape(latent_channels(model))
        self.sample_batch_size = cfg.sample_batch_size
        self.feature_dim = int(getattr(model, "inner_dim", 0) or 0)

        if prompts is None:
            prompts = prepare_prompt_cache(source, cfg, self.device, tiny_prompt_encoder(self._teacher) if self.tiny else None)
        if prompts.null is None:
            raise UserError("the prompt cache has no empty-prompt condition (needed for CFG); delete it to rebuild")
        self.prompts, self.num_conditions = prompts, len(prompts)
        self.null = prompts.null.to(self.device, dtype=self.dtype)
        self.has_guidance_embed = self.arch.guidance_embedding and bool(model.config.get("guidance_embeds", False))

    # -------------------------------------------------------------------- building the pieces
    def _load_teacher(self, source: str) -> nn.Module:
        cfg = self.cfg
        if not self.tiny:
            return load_transformer(source, self.arch.name, subfolder=cfg.subfolder, torch_dtype=self.dtype)
        model = build_tiny_transformer(cfg.model_class, dict(cfg.tiny_config))
        return model.to(self.dtype) if self.dtype != torch.float32 else model

    def _load_vae(self, channels: int) -> nn.Module | None:
        if not self.cfg.vae:
            return None
        vae = load_vae(self.cfg.vae, self.arch, channels, None if self.tiny else self.dtype)
        return vae.to(self.device).eval().requires_grad_(False)

    def _latent_shape(self, channels: int) -> tuple[int, int, int]:
        resolution, factor = self.cfg.resolution, self.vae_factor
        if resolution % factor:
            raise UserError(f"t2i.resolution={resolution} is not a multiple of the VAE scale factor {factor}")
        side = resolution // factor
        if self.arch.packed_latents and side % 2:
            raise UserError(f"t2i.resolution={resolution}: {self.arch.class_name} needs an even latent size "
                            f"(a multiple of {2 * factor} pixels)")
        return channels, side, side

    # -------------------------------------------------------------------- Family protocol
    def teacher(self) -> nn.Module:
        return self._teacher

    def trainable(self, routing: RoutingConfig, lora_rank: int) -> nn.Module:
        route_text = self.cfg.route_text and self.arch.text_stream
        model = convert_to_dar(copy.deepcopy(self._teacher), routing, route_text=route_text).train()
        if lora_rank > 0:
            apply_lora(model, rank=lora_rank, targets=lora_targets(model, include_mlp=self.cfg.lora_mlp))
            for p in model.parameters():  # trained parameters in fp32, whatever the frozen base's dtype
                if p.requires_grad and p.dtype != torch.float32:
                    p.data = p.data.float()
        else:
            model.requires_grad_(True)
        return model.to(self.device)

    def denoiser(self, model: nn.Module, guidance: float | None = None) -> DiffusersDenoiser:
        """x0 adapter; a DDP/FSDP-wrapped model is called through its wrapper (gradients synchronise)."""
        raw = unwrap(model)
        d = DiffusersDenoiser(raw, prediction=self.cfg.prediction, guidance=self.cfg.guidance_embed if guidance is None else guidance,
                              vae_scale_factor=self.vae_factor)
        if raw is not model:
            d._modules["transformer"] = model  # only calls go through the wrapper; config is read from `raw` above
            if hasattr(raw, "use_additional_conditions"):
                model.use_additional_conditions = raw.use_additional_conditions  # PixArt reads it on the called module
        return d

    def with_cfg(self, model: nn.Module, scale: float) -> Denoiser:
        """Classifier-free guidance against the empty prompt (scale 1: the plain denoiser)."""
        return cfg_denoiser(self.denoiser(model), scale, self.null)

    def denoising_loss(self, model: nn.Module, x0, noise, t, cond) -> Tensor:
        """The teacher's objective in its own parameterisation: velocity MSE (flow), eps MSE (VP eps) or
        v MSE (VP v), at x_t = (1 - t) x0 + t noise (VP models see the same-SNR VP input)."""
        d = self.denoiser(model)
        prediction = d.model_output(interpolate(x0, noise, t), t, cond).float()
        x0, noise = x0.float(), noise.float()
        if d.prediction == FLOW:
            target = noise - x0
        elif d.prediction == VP_EPS:
            target = noise
        else:
            ab = flow_t_to_vp(t.float()).view(-1, *([1] * (x0.ndim - 1)))
            target = ab.sqrt() * noise - (1 - ab).sqrt() * x0
        return F.mse_loss(prediction, target)

    def real_score(self, teacher: nn.Module, guidance_scale: float) -> Denoiser:
        """The teacher with guidance: Flux guidance embedding where the model has one, else CFG against the
        empty prompt."""
        if self.has_guidance_embed:
            return self.denoiser(teacher, guidance=guidance_scale)
        return self.with_cfg(teacher, guidance_scale)

    def conditions(self, ids: Tensor):
        return self.prompts[ids.cpu().long()].to(self.device, dtype=self.dtype)

    def hidden_features(self, model, x_t, t, cond) -> Tensor:
        raise UserError("gan.enabled is not supported for diffusers (text-to-image) teachers; set gan.enabled=false")

    def load_weights(self, model: nn.Module, folder: Path) -> None:
        """Start `model` (a fresh `trainable`, no LoRA) from a DAR export folder (e.g. an earlier student)."""
        folder = Path(folder)
        if any("lora_" in name for name, _ in model.named_parameters()):
            raise UserError("student.init with LoRA is not supported: merge the LoRA of the initial weights first")
        backbone = folder / BACKBONE_WEIGHTS
        if not backbone.is_file() and (folder / LEGACY_BACKBONE_WEIGHTS).is_file():
            backbone = folder / LEGACY_BACKBONE_WEIGHTS  # an export of format 1 (before DAR students hid from stock loaders)
        files = [backbone, folder / ROUTER_WEIGHTS]
        if not all(f.is_file() for f in files):
            raise UserError(f"{folder} is not a DAR export (needs {BACKBONE_WEIGHTS} and {ROUTER_WEIGHTS}; write it with save_dar_pretrained)")
        state = {k: v for f in files for k, v in load_file(str(f)).items()}
        own = model.state_dict()
        bad = sorted(set(own) ^ set(state)) + [k for k in own if k in state and own[k].shape != state[k].shape]
        if bad:
            raise UserError(f"weights in {folder} do not fit this student (routing or model size differ): {bad[:4]}")
        model.load_state_dict(state)

    def export(self, model: nn.Module, folder: Path) -> None:
        """LoRA merged into a copy, then `save_dar_pretrained` (loads back with `load_dar_pretrained`). The copy
        needs room for one more student on its device."""
        save_dar_pretrained(merge_lora(copy.deepcopy(unwrap(model))), folder)

    def load_student(self, folder: Path) -> nn.Module:
        return load_dar_pretrained(folder, torch_dtype=self.dtype, device=self.device).eval()

    def to_images(self, x: Tensor) -> Tensor:
        return decode_latents(self.vae, x)

    @torch.no_grad()
    def teacher_sample(self, teacher, noise, ids, sampler: str, steps: int, guidance_scale: float) -> Tensor:
        return sample(self.real_score(teacher, guidance_scale), noise, self.conditions(ids), sampler=sampler, steps=steps,
                      shift=self.cfg.sampling_shift)
