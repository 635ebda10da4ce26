"""What the DMD trainer needs from a model family, and the family of our own class-conditional DiT.

The trainer (dmd_dar/dmd/trainer.py) and the sampler (dmd_dar/sampling.py) never touch a model's
parameterisation, conditioning or file format directly: they ask the family. `DiTFamily` serves our DiT
teachers and students (class labels); `dmd_dar.t2i.DiffusersFamily` serves diffusers text-to-image
transformers (prompt embeddings, latents).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from dmd_dar.checkpoint import BUNDLED_TEACHER, load_model_files
from dmd_dar.diffusion import Denoiser, VelocityDenoiser, cfg_denoiser, flow_matching_loss, sample
from dmd_dar.errors import UserError
from dmd_dar.models import DiT
from dmd_dar.models.lora import apply_lora, merge_lora
from dmd_dar.routing import RoutingConfig
from dmd_dar.t2i.latents import latent_preview


class Family(Protocol):
    sample_shape: tuple[int, ...]  # one generated sample (pixels or latents), without the batch
    num_conditions: int  # classes or prompts; conditions are drawn as ids in [0, num_conditions)
    feature_dim: int  # width of `hidden_features` (the GAN head's input)
    device: torch.device  # where the teacher lives and conditions are made

    def teacher(self) -> nn.Module: ...  # frozen, eval mode, on the device

    def trainable(self, routing: RoutingConfig, lora_rank: int) -> nn.Module: ...  # a fresh teacher copy

    def denoiser(self, model: nn.Module) -> Denoiser: ...  # x0 interface (model may be DDP-wrapped)

    def denoising_loss(self, model: nn.Module, x0, noise, t, cond) -> torch.Tensor: ...

    def with_cfg(self, model: nn.Module, scale: float) -> Denoiser: ...  # CFG against the null condition (1: none)

    def real_score(self, teacher: nn.Module, guidance_scale: float) -> Denoiser: ...  # the teacher with guidance

    def conditions(self, ids: torch.Tensor) -> Any: ...  # ids -> the model's conditioning, on the device

    def hidden_features(self, model: nn.Module, x_t, t, cond) -> torch.Tensor: ...  # [B, tokens, feature_dim]

    def load_weights(self, model: nn.Module, folder: Path) -> None: ...  # e.g. student.init; UserError on mismatch

    def export(self, model: nn.Module, folder: Path) -> None: ...  # LoRA merged; loads with load_student

    def load_student(self, folder: Path) -> nn.Module: ...

    def to_images(self, x: torch.Tensor) -> torch.Tensor: ...  # samples -> float NCHW [-1, 1]

    def teacher_sample(self, teacher: nn.Module, noise, ids, sampler: str, steps: int, guidance_scale: float) -> torch.Tensor: ...


def resolve_dit_teacher(path: str) -> Path:
    folder = BUNDLED_TEACHER if path == "bundled" else Path(path)
    if not (folder / "model.safetensors").is_file():
        raise UserError(f"teacher {path!r}: no model.safetensors in {folder}; pass teacher=<DiT folder> "
                        "(e.g. runs/teacher_mnist/teacher from scripts/train_teacher.py)")
    return folder


class DiTFamily:
    """Our class-conditional velocity DiT (pixels, or latents for imported latent checkpoints); condition ids
    are class labels. `teacher`: "bundled", a DiT folder, or a loaded DiT (e.g. a student to sample).

    Latent models: the VAE recorded in the model's config (`vae`, written by scripts/import_checkpoint.py), or the
    `vae` given here (a hub id, a local folder or "tiny"; it is then recorded in the copies this family makes, so
    students carry it; "none": show the latent preview), decodes samples into images (`to_images`). It is loaded on
    first use (`decoder()`; the trainer and the sampler call it before any work)."""

    def __init__(self, teacher: str | Path | DiT, device: torch.device, vae: str | None = None):
        self.device = device
        model = teacher if isinstance(teacher, DiT) else DiT.from_pretrained(resolve_dit_teacher(str(teacher)))
        if vae and vae != "none" and model.in_channels in (1, 3) and model.vae is None:
            raise UserError(f"vae={vae!r} was given, but the teacher is a pixel-space model ({model.in_channels} channels); "
                            "leave vae unset")
        if vae:
            model.vae = None if vae == "none" else vae
            model.config.pop("vae", None)
            if model.vae is not None:
                model.config["vae"] = model.vae
        self._vae = None
        bad = [name for name, p in model.state_dict().items() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
        if bad:
            raise UserError(f"teacher {teacher if not isinstance(teacher, DiT) else 'model'} has non-finite weights "
                            f"({', '.join(bad[:3])}): its training diverged; use another checkpoint")
        self._teacher = model.to(device).eval().requires_grad_(False)
        self.sample_shape = (model.in_channels, model.input_size, model.input_size)
        self.num_conditions = max(model.num_classes, 1)  # unconditional (num_classes 0): id 0 is the null class
        self.feature_dim = model.config["hidden_size"]

    def teacher(self) -> DiT:
        return self._teacher

    def trainable(self, routing: RoutingConfig, lora_rank: int) -> DiT:
        """A copy of the teacher with `routing` (its router parameters start at zero), on the CPU."""
        model = DiT(**{**self._teacher.config, "routing": RoutingConfig.from_dict(routing).to_dict()})
        model.load_backbone_state(self._teacher.state_dict(), source="the teacher")
        return apply_lora(model, rank=lora_rank) if lora_rank > 0 else model

    def denoiser(self, model: nn.Module) -> Denoiser:
        return VelocityDenoiser(model)

    def denoising_loss(self, model: nn.Module, x0, noise, t, cond) -> torch.Tensor:
        return flow_matching_loss(model, x0, noise, t, cond)

    def with_cfg(self, model: nn.Module, scale: float) -> Denoiser:
        return cfg_denoiser(VelocityDenoiser(model), scale, self._teacher.null_class)

    def real_score(self, teacher: nn.Module, guidance_scale: float) -> Denoiser:
        return self.with_cfg(teacher, guidance_scale)

    def conditions(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.to(self.device)

    def hidden_features(self, model: nn.Module, x_t, t, cond) -> torch.Tensor:
        return model(x_t, t, cond, return_hidden=True).hidden.float()

    def load_weights(self, model: nn.Module, folder: Path) -> None:
        if any("lora_" in name for name, _ in model.named_parameters()):
            raise UserError("student.init with LoRA is not supported: merge the LoRA of the initial weights first")
        model.load_backbone_state(load_model_files(folder).state_dict, source=str(folder))

    def export(self, model: nn.Module, folder: Path) -> None:
        merge_lora(copy.deepcopy(model)).save_pretrained(folder)

    def load_student(self, folder: Path) -> DiT:
        return DiT.from_pretrained(folder).to(self.device).eval()

    def decoder(self) -> nn.Module | None:
        """The VAE that decodes the model's latents (None for pixel models, or latents without a VAE)."""
        if self._vae is None and self._teacher.vae is not None:
            from dmd_dar.t2i.vae import load_sd_vae  # imports diffusers: only for latent models

            self._vae = load_sd_vae(self._teacher.vae, self.device)
        return self._vae

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        """Samples -> images in [-1, 1]: pixels clamped, latents decoded by the VAE (latent preview without one).
        Gradients flow through the decoder (the regression term); callers that only look use no_grad."""
        if self._teacher.vae is not None:
            from dmd_dar.t2i.vae import decode_latents_to_images

            return decode_latents_to_images(self.decoder(), x)
        return x.clamp(-1, 1) if x.shape[1] in (1, 3) else latent_preview(x)

    @torch.no_grad()
    def teacher_sample(self, teacher, noise, ids, sampler: str, steps: int, guidance_scale: float) -> torch.Tensor:
        return sample(self.real_score(teacher, guidance_scale), noise, self.conditions(ids), sampler=sampler, steps=steps)


def make_family(backbone: str, teacher: str, device: torch.device, t2i_config: Any = None, vae: str | None = None) -> Family:
    """The family of `backbone` (the config field `backbone`): "dit" (our DiT; `vae` overrides the VAE its folder
    records) or "diffusers" (text-to-image; its VAE is t2i.vae)."""
    if backbone == "dit":
        return DiTFamily(teacher, device, vae=vae)
    if backbone == "diffusers":
        from dmd_dar.t2i.family import DiffusersFamily  # imports diffusers: only for diffusers runs

        return DiffusersFamily(teacher, t2i_config, device)
    raise UserError(f"backbone={backbone!r} is not 'dit' or 'diffusers'")
