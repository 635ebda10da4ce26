"""The x0 adapter: diffusers transformers behind the one interface `x0 = denoiser(x_t, t, cond)`.

Our convention (dmd_dar.diffusion): t in [0, 1], t = 1 noise, x_t = (1 - t) x0 + t eps, tensors NCHW latents.

| model | `timestep` the model wants | prediction | x0 |
|---|---|---|---|
| SD3Transformer2DModel | 1000 t (embeds it as given) | v = eps - x0 | x_t - t v |
| FluxTransformer2DModel | t (multiplies by 1000 itself) | v | x_t - t v |
| QwenImageTransformer2DModel | t (its Timesteps(scale=1000)) | v | x_t - t v |
| PixArtTransformer2DModel, DiTTransformer2DModel | fractional DDPM index k | VP eps or v | VP formulas |

VP teachers: x_t is rescaled to the VP input with the same SNR (x_vp = x_t / sqrt((1-t)^2 + t^2)), t maps to
alpha_bar = (1-t)^2 / ((1-t)^2 + t^2) and to the fractional index k with alphas_cumprod[k] = alpha_bar (log-SNR
interpolation), which the sinusoidal timestep embedding accepts. t outside the range the schedule covers is
clamped to its ends (k in [0, N-1]). Learned-variance outputs (2 C channels) keep the first C.

Flux (guidance-distilled) gets its guidance through the model's guidance embedding (`guidance=`), not CFG.
All other text models use `dmd_dar.diffusion.cfg_denoiser` with a null `TextCondition` (see `TextCondition.cat`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dmd_dar.diffusion import (
    flow_t_to_vp,
    flow_to_vp_input,
    vp_timestep_from_alpha_bar,
    x0_from_velocity,
    x0_from_vp_eps,
    x0_from_vp_v,
)
from dmd_dar.errors import UserError
from dmd_dar.models.architectures import FLOW, PREDICTIONS, VP_EPS, architecture_of
from dmd_dar.t2i.latents import flux_image_ids, pack_latents, unpack_latents
from dmd_dar.t2i.text import as_text_condition


def ddpm_linear_alphas_cumprod(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """alphas_cumprod of diffusers' DDPMScheduler(beta_schedule="linear"), the schedule of DiT and PixArt."""
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


class DiffusersDenoiser(nn.Module):
    """`x0 = denoiser(x_t, t, cond)` around a diffusers transformer (stock or converted to DAR).

    prediction: "flow" (velocity), "vp_eps" or "vp_v"; default: the architecture's (flow for SD3/Flux/Qwen-Image,
    vp_eps for PixArt/DiT; pass the scheduler's prediction_type for v-prediction checkpoints).
    alphas_cumprod: the VP schedule (VP models only; default: diffusers' DDPM linear betas 1e-4..0.02 over 1000
    steps, the schedule of DiT and PixArt).
    guidance: Flux guidance-embedding scale (guidance-distilled checkpoints), passed to the model.
    vae_scale_factor: pixel size per latent (PixArt's resolution/aspect-ratio conditioning).
    cond: `TextCondition` (or its `to_dict()`) for text models, class labels LongTensor [B] for DiT.

    The trainer holds this module: `.transformer` is the network (its parameters, LoRA, router), and
    the conversion maths run in fp32 whatever the model's dtype.
    """

    def __init__(self, transformer: nn.Module, prediction: str | None = None, alphas_cumprod: Tensor | None = None,
                 guidance: float | None = 3.5, vae_scale_factor: int = 8):
        super().__init__()
        self.arch = architecture_of(transformer)
        self.prediction = prediction or self.arch.prediction
        if self.prediction not in PREDICTIONS:
            raise UserError(f"prediction={self.prediction!r} is not one of {', '.join(PREDICTIONS)}")
        if self.prediction not in self.arch.predictions:
            raise UserError(f"{self.arch.class_name} is a {'flow-matching' if self.arch.is_flow else 'VP'} model; "
                            f"prediction={self.prediction!r} does not fit it")
        self.transformer = transformer
        if not self.arch.is_flow:
            if alphas_cumprod is None:
                alphas_cumprod = ddpm_linear_alphas_cumprod()
            self.register_buffer("alphas_cumprod", alphas_cumprod.detach().to(torch.float64).cpu(), persistent=False)
        has_guidance = self.arch.guidance_embedding and bool(transformer.config.get("guidance_embeds", False))
        self.guidance = guidance if has_guidance else None
        self.vae_scale_factor = vae_scale_factor

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def vp_alpha_bar(self, t: Tensor) -> Tensor:
        """SNR-matched alpha_bar for flow time t, clamped to the range of the model's schedule."""
        ac = self.alphas_cumprod
        return flow_t_to_vp(t.double()).clamp(float(ac.min()), float(ac.max()))

    def vp_timestep(self, t: Tensor) -> Tensor:
        """Fractional DDPM index k of flow time t (alphas_cumprod[k] = SNR-matched alpha_bar)."""
        return vp_timestep_from_alpha_bar(self.vp_alpha_bar(t), self.alphas_cumprod.to(t.device))

    def model_output(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        """The raw prediction in NCHW (velocity, VP eps or VP v), before any conversion."""
        b, channels, h, w = x_t.shape
        t = (t.expand(b) if t.ndim == 0 else t).float()
        if self.arch.is_flow:
            x, timestep = x_t, t
        else:  # VP models see the same-SNR VP input at the fractional DDPM index
            x, timestep = flow_to_vp_input(x_t.float(), t), self.vp_timestep(t)
        x = x.to(self.dtype)
        if self.arch.packed_latents:
            x = pack_latents(x)
        out = _CALL_MODEL[self.arch.name](self, x, timestep, cond, (h, w))
        if self.arch.packed_latents:
            return unpack_latents(out, h, w)
        return out if self.arch.is_flow else _first_channels(out, channels)

    def forward(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        out = self.model_output(x_t, t, cond).float()
        x, tf = x_t.float(), t.float()
        if self.prediction == FLOW:
            return x0_from_velocity(x, tf, out)
        ab = self.vp_alpha_bar(tf).float()
        x_vp = flow_to_vp_input(x, tf)
        return x0_from_vp_eps(x_vp, ab, out) if self.prediction == VP_EPS else x0_from_vp_v(x_vp, ab, out)


# ------------------------------------------------------------------------------------------ one call per architecture
# (adapter, x in the model's layout and dtype, timestep float32 [B] in the model's own units, cond, latent (h, w))
def _call_dit(adapter: DiffusersDenoiser, x: Tensor, timestep: Tensor, cond: Any, size: tuple[int, int]) -> Tensor:
    labels = cond if isinstance(cond, Tensor) else torch.as_tensor(cond, device=x.device)
    return adapter.transformer(x, timestep=timestep.to(x.dtype), class_labels=labels.long(), return_dict=False)[0]


def _call_pixart(adapter: DiffusersDenoiser, x: Tensor, timestep: Tensor, cond: Any, size: tuple[int, int]) -> Tensor:
    m, text, dtype, b = adapter.transformer, as_text_condition(cond).to(x.device), x.dtype, x.shape[0]
    added = {"resolution": None, "aspect_ratio": None}
    if m.use_additional_conditions:  # the pixel size of the image the latents decode to
        hp, wp = size[0] * adapter.vae_scale_factor, size[1] * adapter.vae_scale_factor
        added = {"resolution": torch.tensor([[hp, wp]], dtype=dtype, device=x.device).repeat(b, 1),
                 "aspect_ratio": torch.tensor([[hp / wp]], dtype=dtype, device=x.device).repeat(b, 1)}
    return m(x, encoder_hidden_states=text.prompt_embeds.to(dtype), encoder_attention_mask=text.attention_mask,
             timestep=timestep.to(dtype), added_cond_kwargs=added, return_dict=False)[0]


def _call_sd3(adapter: DiffusersDenoiser, x: Tensor, timestep: Tensor, cond: Any, size: tuple[int, int]) -> Tensor:
    text, dtype = as_text_condition(cond).to(x.device), x.dtype
    return adapter.transformer(x, encoder_hidden_states=text.prompt_embeds.to(dtype),
                               pooled_projections=text.pooled_prompt_embeds.to(dtype),
                               timestep=(1000.0 * timestep).to(dtype), return_dict=False)[0]


def _call_flux(adapter: DiffusersDenoiser, x: Tensor, timestep: Tensor, cond: Any, size: tuple[int, int]) -> Tensor:
    text, dtype, b = as_text_condition(cond).to(x.device), x.dtype, x.shape[0]
    embeds = text.prompt_embeds.to(dtype)
    guidance = None if adapter.guidance is None else torch.full((b,), float(adapter.guidance), device=x.device, dtype=torch.float32)
    return adapter.transformer(x, encoder_hidden_states=embeds, pooled_projections=text.pooled_prompt_embeds.to(dtype),
                               timestep=timestep.to(dtype), img_ids=flux_image_ids(*size, x.device, dtype),
                               txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device, dtype=dtype), guidance=guidance,
                               return_dict=False)[0]


def _call_qwen_image(adapter: DiffusersDenoiser, x: Tensor, timestep: Tensor, cond: Any, size: tuple[int, int]) -> Tensor:
    text, dtype, b = as_text_condition(cond).to(x.device), x.dtype, x.shape[0]
    return adapter.transformer(x, encoder_hidden_states=text.prompt_embeds.to(dtype),
                               encoder_hidden_states_mask=text.attention_mask, timestep=timestep.to(dtype),
                               img_shapes=[[(1, size[0] // 2, size[1] // 2)]] * b, return_dict=False)[0]


_CALL_MODEL = {"dit": _call_dit, "pixart": _call_pixart, "sd3": _call_sd3, "flux": _call_flux, "qwen_image": _call_qwen_image}


def _first_channels(out: Tensor, channels: int) -> Tensor:
    """DiT / PixArt predict [eps, learned variance] in 2C channels: keep eps."""
    return out[:, :channels] if out.shape[1] == 2 * channels else out
