"""Teacher adapters: diffusers transformers behind the one x0 interface `x0 = denoiser(x_t, t, cond)`.

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

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
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

FLOW = "flow"
VP_EPS = "vp_eps"
VP_V = "vp_v"
KINDS = (FLOW, VP_EPS, VP_V)

# class name -> (family, default prediction kind)
_FAMILIES = {
    "SD3Transformer2DModel": ("sd3", FLOW),
    "FluxTransformer2DModel": ("flux", FLOW),
    "QwenImageTransformer2DModel": ("qwen", FLOW),
    "PixArtTransformer2DModel": ("pixart", VP_EPS),
    "DiTTransformer2DModel": ("dit", VP_EPS),
}
_ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


# ------------------------------------------------------------------------------------------ conditions
@dataclass
class TextCondition:
    """Text conditioning of a T2I teacher, batch first.

    prompt_embeds: [B, T, D] token embeddings (T5 / CLIP / Qwen2.5-VL hidden states).
    pooled_prompt_embeds: [B, P] pooled embedding (SD3, Flux), else None.
    attention_mask: [B, T] 1 = token, 0 = padding (PixArt, Qwen-Image), else None.
    """

    prompt_embeds: Tensor
    pooled_prompt_embeds: Tensor | None = None
    attention_mask: Tensor | None = None

    def __post_init__(self):
        if self.prompt_embeds.ndim != 3:
            raise ValueError(f"prompt_embeds must be [B, T, D], got shape {list(self.prompt_embeds.shape)}")
        b = self.prompt_embeds.shape[0]
        for name in ("pooled_prompt_embeds", "attention_mask"):
            value = getattr(self, name)
            if value is not None and value.shape[0] != b:
                raise ValueError(f"{name} has batch {value.shape[0]}, prompt_embeds has {b}")

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    def __len__(self) -> int:
        return self.batch_size

    def _map(self, fn) -> "TextCondition":
        return TextCondition(**{f.name: (None if getattr(self, f.name) is None else fn(f.name, getattr(self, f.name)))
                                for f in dataclasses.fields(self)})

    def to(self, device=None, dtype: torch.dtype | None = None) -> "TextCondition":
        """Move to a device; `dtype` applies to the embeddings only (the mask keeps its dtype)."""
        return self._map(lambda name, v: v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point() and name != "attention_mask") else None))

    def __getitem__(self, index) -> "TextCondition":
        return self._map(lambda name, v: v[index])

    def expand(self, batch_size: int) -> "TextCondition":
        """A batch-1 condition (e.g. the empty prompt) repeated to `batch_size`."""
        if self.batch_size == batch_size:
            return self
        if self.batch_size != 1:
            raise ValueError(f"cannot expand a batch of {self.batch_size} conditions to {batch_size}")
        return self._map(lambda name, v: v.expand(batch_size, *v.shape[1:]))

    def cat(self, other: "TextCondition") -> "TextCondition":
        """[self; other] along the batch (CFG batch doubling: conditional first, null second). A batch-1 `other`
        is expanded; sequence lengths must agree (encode both with the same max length); a mask present on
        one side only is completed with ones."""
        other = other.expand(self.batch_size) if other.batch_size == 1 else other
        if other.prompt_embeds.shape[1:] != self.prompt_embeds.shape[1:]:
            raise ValueError(f"null prompt_embeds {list(other.prompt_embeds.shape)} do not match {list(self.prompt_embeds.shape)}: "
                             "encode the null prompt with the same max_sequence_length")
        if (self.pooled_prompt_embeds is None) != (other.pooled_prompt_embeds is None):
            raise ValueError("pooled_prompt_embeds is set on one condition only")
        masks = [self.attention_mask, other.attention_mask]
        if any(m is not None for m in masks):
            masks = [m if m is not None else torch.ones(c.prompt_embeds.shape[:2], dtype=torch.long, device=c.prompt_embeds.device)
                     for m, c in zip(masks, (self, other))]
            mask = torch.cat([masks[0], masks[1].to(masks[0].dtype)])
        else:
            mask = None
        pooled = None if self.pooled_prompt_embeds is None else torch.cat([self.pooled_prompt_embeds, other.pooled_prompt_embeds])
        return TextCondition(torch.cat([self.prompt_embeds, other.prompt_embeds]), pooled, mask)

    def to_dict(self) -> dict[str, Tensor | None]:
        """A plain dict (what `dmd_dar.diffusion.concat_cond` batches); `from_dict` / the adapters accept it back."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TextCondition":
        return cls(**data)


def as_text_condition(cond: Any) -> TextCondition:
    if isinstance(cond, TextCondition):
        return cond
    if isinstance(cond, dict):
        return TextCondition.from_dict(cond)
    if isinstance(cond, Tensor):
        return TextCondition(prompt_embeds=cond)
    raise TypeError(f"a text teacher needs a TextCondition (or its to_dict()), got {type(cond).__name__}")


# ------------------------------------------------------------------------------------------ latent packing
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


# ------------------------------------------------------------------------------------------ the adapter
class DiffusersDenoiser(nn.Module):
    """`x0 = denoiser(x_t, t, cond)` around a diffusers transformer (stock or converted to DAR).

    kind: "flow" (velocity), "vp_eps" or "vp_v"; default from the class (flow for SD3/Flux/Qwen-Image, vp_eps for
    PixArt/DiT; pass the scheduler's prediction_type for v-prediction checkpoints).
    alphas_cumprod: the VP schedule (VP kinds only; default: diffusers' DDPM linear betas 1e-4..0.02 over 1000
    steps, the schedule of DiT and PixArt).
    guidance: Flux guidance-embedding scale (guidance-distilled checkpoints), passed to the model.
    vae_scale_factor: pixel size per latent (PixArt's resolution/aspect-ratio conditioning).
    cond: `TextCondition` (or its `to_dict()`) for text models, class labels LongTensor [B] for DiT.

    The trainer holds this module: `.transformer` is the network (its parameters, LoRA, router), and
    the conversion maths run in fp32 whatever the model's dtype.
    """

    def __init__(self, transformer: nn.Module, kind: str | None = None, alphas_cumprod: Tensor | None = None,
                 guidance: float | None = 3.5, vae_scale_factor: int = 8):
        super().__init__()
        name = _stock_name(transformer)
        if name not in _FAMILIES:
            raise UserError(f"no teacher adapter for {name}; supported: {', '.join(_FAMILIES)}")
        self.family, default_kind = _FAMILIES[name]
        self.kind = kind or default_kind
        if self.kind not in KINDS:
            raise UserError(f"teacher kind={self.kind!r} is not one of {', '.join(KINDS)}")
        if (self.kind == FLOW) != (self.family in ("sd3", "flux", "qwen")):
            raise UserError(f"{name} is a {'flow-matching' if default_kind == FLOW else 'VP'} model; kind={self.kind!r} does not fit it")
        self.transformer = transformer
        if self.kind != FLOW:
            if alphas_cumprod is None:
                alphas_cumprod = ddpm_linear_alphas_cumprod()
            self.register_buffer("alphas_cumprod", alphas_cumprod.detach().to(torch.float64).cpu(), persistent=False)
        has_guidance = self.family == "flux" and bool(transformer.config.get("guidance_embeds", False))
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
        dtype = self.dtype
        b, _, h, w = x_t.shape
        t = t.expand(b) if t.ndim == 0 else t
        m = self.transformer
        if self.family == "dit":
            labels = cond if isinstance(cond, Tensor) else torch.as_tensor(cond, device=x_t.device)
            x_vp = flow_to_vp_input(x_t.float(), t.float())
            out = m(x_vp.to(dtype), timestep=self.vp_timestep(t.float()).to(dtype), class_labels=labels.long(), return_dict=False)[0]
            return _first_channels(out, x_t.shape[1])
        text = as_text_condition(cond).to(x_t.device)
        embeds = text.prompt_embeds.to(dtype)
        if self.family == "pixart":
            x_vp = flow_to_vp_input(x_t.float(), t.float())
            added = {"resolution": None, "aspect_ratio": None}
            if m.use_additional_conditions:
                hp, wp = h * self.vae_scale_factor, w * self.vae_scale_factor
                added = {"resolution": torch.tensor([[hp, wp]], dtype=dtype, device=x_t.device).repeat(b, 1),
                         "aspect_ratio": torch.tensor([[hp / wp]], dtype=dtype, device=x_t.device).repeat(b, 1)}
            out = m(x_vp.to(dtype), encoder_hidden_states=embeds, encoder_attention_mask=text.attention_mask,
                    timestep=self.vp_timestep(t.float()).to(dtype), added_cond_kwargs=added, return_dict=False)[0]
            return _first_channels(out, x_t.shape[1])
        if self.family == "sd3":
            return m(x_t.to(dtype), encoder_hidden_states=embeds, pooled_projections=text.pooled_prompt_embeds.to(dtype),
                     timestep=(1000.0 * t.float()).to(dtype), return_dict=False)[0]
        if self.family == "flux":
            guidance = None if self.guidance is None else torch.full((b,), float(self.guidance), device=x_t.device, dtype=torch.float32)
            txt_ids = torch.zeros(embeds.shape[1], 3, device=x_t.device, dtype=dtype)
            out = m(pack_latents(x_t.to(dtype)), encoder_hidden_states=embeds, pooled_projections=text.pooled_prompt_embeds.to(dtype),
                    timestep=t.to(dtype), img_ids=flux_image_ids(h, w, x_t.device, dtype), txt_ids=txt_ids, guidance=guidance,
                    return_dict=False)[0]
            return unpack_latents(out, h, w)
        # qwen
        out = m(pack_latents(x_t.to(dtype)), encoder_hidden_states=embeds, encoder_hidden_states_mask=text.attention_mask,
                timestep=t.to(dtype), img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        return unpack_latents(out, h, w)

    def forward(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        out = self.model_output(x_t, t, cond).float()
        x, tf = x_t.float(), t.float()
        if self.kind == FLOW:
            return x0_from_velocity(x, tf, out)
        ab = self.vp_alpha_bar(tf).float()
        x_vp = flow_to_vp_input(x, tf)
        return x0_from_vp_eps(x_vp, ab, out) if self.kind == VP_EPS else x0_from_vp_v(x_vp, ab, out)


def _first_channels(out: Tensor, channels: int) -> Tensor:
    """DiT / PixArt predict [eps, learned variance] in 2C channels: keep eps."""
    return out[:, :channels] if out.shape[1] == 2 * channels else out


def _stock_name(model) -> str:
    from dmd_dar.models.diffusers_dar import stock_class

    return stock_class(model).__name__


def ddpm_linear_alphas_cumprod(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """alphas_cumprod of diffusers' DDPMScheduler(beta_schedule="linear"), the schedule of DiT and PixArt."""
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def scheduler_alphas_cumprod(scheduler) -> Tensor:
    """The VP schedule of a diffusers scheduler (DDPM/DDIM/DPM-Solver...), as float64."""
    ac = getattr(scheduler, "alphas_cumprod", None)
    if ac is None:
        raise UserError(f"{type(scheduler).__name__} has no alphas_cumprod: it is not a VP scheduler")
    return torch.as_tensor(ac, dtype=torch.float64)


def scheduler_kind(scheduler) -> str:
    """'flow' for FlowMatch schedulers, else 'vp_eps' / 'vp_v' from the scheduler's prediction_type."""
    if "FlowMatch" in type(scheduler).__name__:
        return FLOW
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise UserError(f"prediction_type={prediction!r} of {type(scheduler).__name__} is not supported (use epsilon or v_prediction)")
    return VP_EPS if prediction == "epsilon" else VP_V


# ------------------------------------------------------------------------------------------ loading
_CLASS_BY_KIND = {
    "sd3": "SD3Transformer2DModel",
    "flux": "FluxTransformer2DModel",
    "qwen": "QwenImageTransformer2DModel",
    "qwen_image": "QwenImageTransformer2DModel",
    "pixart": "PixArtTransformer2DModel",
    "dit": "DiTTransformer2DModel",
}


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def load_transformer(hub_id_or_path: str | os.PathLike, kind: str, subfolder: str | None = "transformer",
                     torch_dtype: torch.dtype | None = None, **kwargs):
    """diffusers `from_pretrained` of the transformer of `kind` (sd3, flux, qwen_image, pixart, dit) from a local
    pipeline/model folder or a hub id. A local folder may be the pipeline root (with `transformer/`) or the model
    folder itself. Weights that are not available (offline, no network, missing path) raise one UserError line."""
    import diffusers

    if kind not in _CLASS_BY_KIND:
        raise UserError(f"teacher kind={kind!r} is unknown; use one of {', '.join(sorted(_CLASS_BY_KIND))}")
    cls = getattr(diffusers, _CLASS_BY_KIND[kind])
    source = str(hub_id_or_path)
    path = Path(source).expanduser()
    looks_local = path.is_absolute() or source.startswith((".", "~")) or path.exists() or source.count("/") != 1
    if looks_local:
        if not path.is_dir():
            raise UserError(f"teacher weights not found at {path}: pass an existing local diffusers folder (or a hub id online)")
        if subfolder and not (path / subfolder).is_dir():
            subfolder = None  # the folder is the model folder itself
    options = dict(kwargs)
    if torch_dtype is not None:
        options["torch_dtype"] = torch_dtype
    if subfolder:
        options["subfolder"] = subfolder
    try:
        return cls.from_pretrained(str(path) if looks_local else source, **options)
    except Exception as err:  # huggingface_hub / diffusers raise many types for "not there"
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if not looks_local:
            reason = "HF_HUB_OFFLINE is set" if _offline() else f"the hub could not be reached: {first_line}"
            raise UserError(f"weights for hub id {source!r} are not available offline ({reason}); "
                            "download them on a machine with network and pass the local path") from None
        raise UserError(f"cannot load a {cls.__name__} from local folder {path} ({first_line}); check the folder") from None


def load_teacher(hub_id_or_path: str | os.PathLike, kind: str, torch_dtype: torch.dtype | None = None,
                 prediction: str | None = None, alphas_cumprod: Tensor | None = None, guidance: float | None = 3.5,
                 subfolder: str | None = "transformer", **kwargs) -> DiffusersDenoiser:
    """Load a diffusers transformer and wrap it as an x0 denoiser (`DiffusersDenoiser`)."""
    model = load_transformer(hub_id_or_path, kind, subfolder=subfolder, torch_dtype=torch_dtype, **kwargs)
    model.requires_grad_(False)
    return DiffusersDenoiser(model.eval(), kind=prediction, alphas_cumprod=alphas_cumprod, guidance=guidance)


# ------------------------------------------------------------------------------------------ LoRA / trainable parameters
def lora_targets(model: nn.Module, include_mlp: bool = False) -> list[str]:
    """Full module names peft's LoraConfig(target_modules=...) should wrap: every attention projection (q, k, v,
    out; the added text projections of MM-DiTs), optionally the feed-forward linears. Router parameters are
    never targets (they are trained fully)."""
    from diffusers.models.attention_processor import Attention

    attention_types: tuple[type, ...] = (Attention,)
    try:
        from diffusers.models.transformers.transformer_flux import FluxAttention

        attention_types += (FluxAttention,)
    except ImportError:  # pragma: no cover
        pass
    names = []
    for parent_name, parent in model.named_modules():
        if isinstance(parent, attention_types):
            for suffix in _ATTENTION_PROJECTIONS:
                module = parent.get_submodule(suffix) if _has_submodule(parent, suffix) else None
                if isinstance(module, nn.Linear):
                    names.append(f"{parent_name}.{suffix}")
    if include_mlp:
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and (".ff." in f".{name}." or ".ff_context." in name or "_mlp." in name
                                                  or name.endswith((".proj_mlp", ".proj_out")) and "single_transformer_blocks" in name):
                names.append(name)
    if not names:
        raise UserError(f"found no attention projections in {type(model).__name__}; pass target_modules explicitly")
    return sorted(set(names))


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


# LoRA helpers live in dmd_dar.lora (they serve our own DiT too); re-exported here for convenience.
from dmd_dar.lora import apply_lora, merge_lora, trainable_parameters  # noqa: E402,F401
