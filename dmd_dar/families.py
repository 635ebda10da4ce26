"""What the DMD trainer needs from a model family, and the family of our own class-conditional DiT.

The trainer (dmd_dar/distill.py) never touches a model's parameterisation, conditioning or file format
directly: it asks the family. `DiTFamily` serves our DiT teachers (class labels, pixel space);
`dmd_dar.t2i.DiffusersFamily` serves diffusers text-to-image transformers (prompt embeddings, latents).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from dmd_dar.checkpoint import load_model_files
from dmd_dar.diffusion import Denoiser, VelocityDenoiser, cfg_denoiser, flow_matching_loss, sample
from dmd_dar.errors import UserError
from dmd_dar.lora import apply_lora, merge_lora
from dmd_dar.models import DiT
from dmd_dar.routing import RoutingConfig

BUNDLED_TEACHER = Path(__file__).parent / "assets" / "teacher"


class Family(Protocol):
    sample_shape: tuple[int, ...]  # one generated sample (pixels or latents), without the batch
    num_conditions: int  # classes or prompts; conditions are drawn as ids in [0, num_conditions)
    feature_dim: int  # width of `hidden_features` (the GAN head's input)
    device: torch.device  # where the teacher lives and conditions are made

    def teacher(self) -> nn.Module: ...  # frozen, eval mode, on the device

    def trainable(self, routing: RoutingConfig, lora_rank: int) -> nn.Module: ...  # a fresh teacher copy

    def denoiser(self, model: nn.Module) -> Denoiser: ...  # x0 interface (model may be DDP-wrapped)

    def denoising_loss(self, model: nn.Module, x0, noise, t, cond) -> torch.Tensor: ...

    def real_score(self, teacher: nn.Module, guidance_scale: float) -> Denoiser: ...  # with CFG

    def conditions(self, ids: torch.Tensor) -> Any: ...  # ids -> the model's conditioning, on the device

    def hidden_features(self, model: nn.Module, x_t, t, cond) -> torch.Tensor: ...  # [B, feature_dim]

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
    """Our class-conditional velocity DiT in pixel space; condition ids are class labels."""

    def __init__(self, teacher_path: str, device: torch.device):
        self.folder = resolve_dit_teacher(teacher_path)
        self.device = device
        self._teacher = DiT.from_pretrained(self.folder).to(device).eval().requires_grad_(False)
        t = self._teacher
        self.sample_shape = (t.in_channels, t.input_size, t.input_size)
        self.num_conditions = t.num_classes
        self.feature_dim = t.config["hidden_size"]

    def teacher(self) -> DiT:
        return self._teacher

    def trainable(self, routing: RoutingConfig, lora_rank: int) -> DiT:
        model = DiT.from_pretrained(self.folder, routing=routing)  # router params: zero init
        return apply_lora(model, rank=lora_rank) if lora_rank > 0 else model

    def denoiser(self, model: nn.Module) -> Denoiser:
        return VelocityDenoiser(model)

    def denoising_loss(self, model: nn.Module, x0, noise, t, cond) -> torch.Tensor:
        return flow_matching_loss(model, x0, noise, t, cond)

    def real_score(self, teacher: nn.Module, guidance_scale: float) -> Denoiser:
        return cfg_denoiser(VelocityDenoiser(teacher), guidance_scale, self._teacher.null_class)

    def conditions(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.to(self.device)

    def hidden_features(self, model: nn.Module, x_t, t, cond) -> torch.Tensor:
        return model(x_t, t, cond, return_hidden=True).hidden.float().mean(1)

    def load_weights(self, model: nn.Module, folder: Path) -> None:
        if any("lora_" in name for name, _ in model.named_parameters()):
            raise UserError("student.init with LoRA is not supported: merge the LoRA of the initial weights first")
        model.load_backbone_state(load_model_files(folder).state_dict, source=str(folder))

    def export(self, model: nn.Module, folder: Path) -> None:
        merge_lora(copy.deepcopy(model)).save_pretrained(folder)

    def load_student(self, folder: Path) -> DiT:
        return DiT.from_pretrained(folder).to(self.device).eval()

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-1, 1)

    @torch.no_grad()
    def teacher_sample(self, teacher, noise, ids, sampler: str, steps: int, guidance_scale: float) -> torch.Tensor:
        return sample(self.real_score(teacher, guidance_scale), noise, self.conditions(ids), sampler=sampler, steps=steps)


def make_family(kind: str, teacher: str, device: torch.device, t2i_config: Any = None) -> Family:
    if kind == "dit":
        return DiTFamily(teacher, device)
    if kind == "diffusers":
        from dmd_dar.t2i import DiffusersFamily

        return DiffusersFamily(teacher, t2i_config, device)
    raise UserError(f"family={kind!r} is not 'dit' or 'diffusers'")
