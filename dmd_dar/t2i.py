"""Text-to-image distillation: diffusers transformers as a DMD model family (see dmd_dar.families).

`DiffusersFamily(teacher, cfg, device)` gives the trainer (dmd_dar/distill.py) what it needs from a diffusers
text-to-image transformer (SD3, Flux, Qwen-Image, PixArt):

- teacher: the stock transformer (frozen, eval) from a hub id / local folder, or a tiny random model of
  `cfg.model_class` (`teacher: tiny` or `t2i.tiny: true`; offline, seeded) for tests;
- student / fake score: deep copies of the teacher converted with `convert_to_dar` (the fake's routing is
  residual by default, i.e. the stock function bit for bit), with LoRA (peft) when a rank is given; the routers
  are always fully trainable;
- x0 interface: `dmd_dar.teachers.DiffusersDenoiser` (flow / VP eps / VP v, per class);
- denoising loss: the teacher's own objective in its own parameterisation (velocity MSE for flow models, eps or
  v MSE for VP models);
- real score: CFG (`dmd_dar.diffusion.cfg_denoiser`) against the empty prompt's condition, or, for
  guidance-distilled Flux models (`guidance_embeds`), the guidance embedding instead of CFG;
- conditions: prompt ids -> rows of the prompt-embedding cache (`dmd_dar.text`);
- samples are latents (C, H/f, W/f); `to_images` decodes them with the VAE when one is configured, else shows a
  fixed latent visualisation (`latent_preview`).

See docs/t2i.md for the recipes (configs/dmd_*.yaml) and what runs where.
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmd_dar.errors import UserError

LATENT_PREVIEW_RANGE = 3.0  # latent visualisation: x / 3 clamped to [-1, 1] (latents are roughly unit variance)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TEXT_CLASSES = ("SD3Transformer2DModel", "FluxTransformer2DModel", "QwenImageTransformer2DModel", "PixArtTransformer2DModel")


@dataclass
class T2IConfig:
    """Settings of a diffusers teacher (used when `family: diffusers`)."""

    model_class: str = "SD3Transformer2DModel"  # one of TEXT_CLASSES
    subfolder: Optional[str] = "transformer"  # of a pipeline root; a model folder itself works too
    dtype: str = "float32"  # weights of teacher, student and fake: float32 | bfloat16 | float16
    prediction: Optional[str] = None  # flow | vp_eps | vp_v; None = the class default (PixArt: vp_eps)
    tiny: bool = False  # a tiny random model of model_class (offline tests); also `teacher: tiny`
    tiny_config: Dict[str, Any] = field(default_factory=dict)  # overrides of the tiny model's config
    prompts: Optional[str] = None  # prompts file, one per line (None: the prompts stored in embeddings_cache)
    embeddings_cache: Optional[str] = None  # safetensors prompt cache (dmd_dar.text); default <prompts>.<class>.safetensors
    text_encoder: Optional[str] = None  # pipeline root holding the text encoders (default: the teacher)
    max_sequence_length: Optional[int] = None  # text tokens (None: the pipeline's default)
    resolution: int = 1024  # pixels; latents are resolution / vae scale factor
    vae: Optional[str] = None  # hub id / path (pipeline root or vae folder), "tiny", or None (latent preview)
    vae_scale_factor: int = 8  # pixels per latent when no VAE is loaded
    guidance_embed: float = 3.5  # guidance-distilled Flux: the guidance the student and fake score are fed
    sampling_shift: float = 1.0  # SD3-style time shift of the teacher's reference sampler
    route_text: bool = False  # also route the text stream of MM-DiTs (SD3, Flux, Qwen-Image)
    sample_batch_size: int = 4  # images per call when the trainer samples grids / report sets (memory)
    lora_mlp: bool = False  # LoRA on the feed-forward linears too (default: attention projections only)


# ------------------------------------------------------------------------------------------ tiny random models
def tiny_transformer_config(model_class: str, overrides: dict | None = None) -> dict:
    """Config dict of a tiny transformer of `model_class` with 4 latent channels (2 blocks, width 16)."""
    configs = {
        "SD3Transformer2DModel": dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                      attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                      caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=16),
        "FluxTransformer2DModel": dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                       num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                                       guidance_embeds=True, axes_dims_rope=(2, 2, 4)),
        "QwenImageTransformer2DModel": dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8,
                                            num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4)),
        "PixArtTransformer2DModel": dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                         num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=12),
    }
    if model_class not in configs:
        raise UserError(f"t2i.model_class={model_class!r} is not a text-to-image class; use one of {', '.join(TEXT_CLASSES)}")
    return {**configs[model_class], **(overrides or {})}


def build_tiny_transformer(model_class: str, overrides: dict | None = None, seed: int = 0) -> nn.Module:
    """A tiny random transformer (offline). Every parameter gets N(0, 0.05) noise on top of diffusers' init, so
    the zero-initialised gates and output layers do not make it the zero function."""
    import diffusers

    cls = getattr(diffusers, model_class)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**tiny_transformer_config(model_class, overrides))
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def build_tiny_vae(latent_channels: int, model_class: str = "", seed: int = 0) -> nn.Module:
    """A tiny random VAE with a scale factor of 8: AutoencoderKL, or AutoencoderKLQwenImage for Qwen-Image."""
    import diffusers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model_class == "QwenImageTransformer2DModel":
            return diffusers.AutoencoderKLQwenImage(base_dim=4, z_dim=latent_channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                                    latents_mean=[0.1] * latent_channels, latents_std=[2.0] * latent_channels).eval()
        return diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                       up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                                       layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4,
                                       sample_size=64, shift_factor=0.1).eval()


def tiny_prompt_encoder(model: nn.Module, seq_len: int = 6):
    """`encode(prompts) -> TextCondition` with random embeddings of the right widths for a (tiny) model,
    a fixed function of each prompt's text (seeded by its SHA-256). For tests: no text encoder needed."""
    from dmd_dar.teachers import TextCondition

    cfg, name = model.config, _class_name(model)
    width = cfg.get("caption_channels") or cfg.get("joint_attention_dim")
    pooled = cfg.get("pooled_projection_dim") if name in ("SD3Transformer2DModel", "FluxTransformer2DModel") else None
    masked = name in ("PixArtTransformer2DModel", "QwenImageTransformer2DModel")

    def encode(prompts: list[str]) -> TextCondition:
        rows = []
        for p in prompts:
            g = torch.Generator().manual_seed(int(hashlib.sha256(p.encode()).hexdigest()[:12], 16))
            rows.append((torch.randn(seq_len, width, generator=g), torch.randn(pooled, generator=g) if pooled else None,
                         int(torch.randint(2, seq_len + 1, (1,), generator=g))))
        mask = torch.stack([(torch.arange(seq_len) < n).long() for _, _, n in rows]) if masked else None
        return TextCondition(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]) if pooled else None, mask)

    return encode


def fixed_length(encode, length: int | None):
    """Pad (zeros, mask 0) every encoded batch to `length` tokens. Qwen-Image's encoder returns each batch at
    its own longest prompt (and drops an all-ones mask); the cache and CFG need one length for all prompts.
    Only for models that read the mask (Qwen-Image): padding is invisible to them."""
    from dmd_dar.teachers import TextCondition

    def encode_fixed(prompts: list[str]) -> TextCondition:
        cond = encode(prompts)
        n = cond.prompt_embeds.shape[1]
        if length is None or n == length:
            return cond
        if n > length:
            mask = cond.attention_mask[:, :length] if cond.attention_mask is not None else None
            return TextCondition(cond.prompt_embeds[:, :length], cond.pooled_prompt_embeds, mask)
        mask = cond.attention_mask
        if mask is None:
            mask = torch.ones(cond.prompt_embeds.shape[:2], dtype=torch.long, device=cond.prompt_embeds.device)
        embeds = F.pad(cond.prompt_embeds, (0, 0, 0, length - n))
        return TextCondition(embeds, cond.pooled_prompt_embeds, F.pad(mask, (0, length - n)))

    return encode_fixed


def pipeline_text_encoder(source: str, model_class: str, dtype: torch.dtype, device, max_sequence_length: int | None = None):
    """`encode(prompts) -> TextCondition` with a pipeline's own text encoders, loaded without its transformer and
    VAE from a pipeline root (local folder with model_index.json, or a hub id). Unavailable: one UserError line."""
    import diffusers

    from dmd_dar.text import pipeline_prompt_encoder

    path = Path(source).expanduser()
    if path.exists() and not (path / "model_index.json").is_file():
        raise UserError(f"{path} is not a pipeline root (no model_index.json), so it has no text encoders: pass the "
                        "pipeline folder, or a precomputed prompt-embedding cache")
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(path) if path.exists() else source, transformer=None,
                                                           vae=None, torch_dtype=dtype)
    except Exception as err:  # missing folder, offline hub, damaged files
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot load the text encoders from {source!r} ({first}); offline, pass a local pipeline "
                        "folder or a precomputed prompt-embedding cache") from None
    pipe.to(device)
    encode = pipeline_prompt_encoder(pipe, max_sequence_length, device)
    if model_class == "QwenImageTransformer2DModel":  # the others pad to a fixed length themselves
        encode = fixed_length(encode, max_sequence_length or 512)
    return encode


def _class_name(model) -> str:
    from dmd_dar.models.diffusers_dar import stock_class

    return stock_class(model).__name__


# ------------------------------------------------------------------------------------------ loading helpers
def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"t2i.dtype={name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _kind_of(model_class: str) -> str:
    from dmd_dar.teachers import _CLASS_BY_KIND

    for kind, cls in _CLASS_BY_KIND.items():
        if cls == model_class:
            return kind
    raise UserError(f"t2i.model_class={model_class!r} is not supported; use one of {', '.join(TEXT_CLASSES)}")


def _load_component(cls, source: str, subfolder: str, dtype: torch.dtype | None, what: str):
    """`cls.from_pretrained` from a pipeline root (with `subfolder/`), the component folder itself, or a hub id;
    anything unavailable (missing path, offline) is one UserError line."""
    path = Path(source).expanduser()
    local = path.is_absolute() or source.startswith((".", "~")) or path.exists() or source.count("/") != 1
    options: dict[str, Any] = {"torch_dtype": dtype} if dtype is not None else {}
    if local:
        if not path.is_dir():
            raise UserError(f"{what} not found at {path}: pass an existing local diffusers folder (or a hub id online)")
        if (path / subfolder).is_dir():
            options["subfolder"] = subfolder
    else:
        options["subfolder"] = subfolder
    try:
        return cls.from_pretrained(str(path) if local else source, **options)
    except Exception as err:  # huggingface_hub / diffusers raise many types for "not there"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot load the {what} ({cls.__name__}) from {source!r}: {first}; "
                        "offline, download it elsewhere and pass the local folder") from None


def load_vae(source: str, model_class: str, latent_channels: int, dtype: torch.dtype | None = None) -> nn.Module:
    """The VAE of a T2I pipeline (`vae/` of a pipeline root, a VAE folder, a hub id) or "tiny" (random)."""
    if source == "tiny":
        return build_tiny_vae(latent_channels, model_class)
    import diffusers

    cls = diffusers.AutoencoderKLQwenImage if model_class == "QwenImageTransformer2DModel" else diffusers.AutoencoderKL
    return _load_component(cls, source, "vae", dtype, "VAE").eval().requires_grad_(False)


def vae_scale_factor(vae: nn.Module) -> int:
    cfg = vae.config
    if "temperal_downsample" in cfg:  # Qwen-Image's video VAE
        return 2 ** len(cfg["temperal_downsample"])
    return 2 ** (len(cfg["block_out_channels"]) - 1)


def latent_preview(latents: Tensor) -> Tensor:
    """The documented image of latents when no VAE is available: the first 3 channels (or channel 0 alone when
    there are fewer than 3), divided by 3 and clamped to [-1, 1]. A fixed map, the same for every sample, so
    teacher and student previews compare (per-image normalisation would hide contrast differences)."""
    x = latents.float()
    x = x[:, :3] if x.shape[1] >= 3 else x[:, :1]
    return (x / LATENT_PREVIEW_RANGE).clamp(-1, 1)


@torch.no_grad()
def decode_latents(vae: nn.Module | None, latents: Tensor, batch: int = 4) -> Tensor:
    """Latents (the transformer's space) -> images float NCHW in [-1, 1]: undo the pipeline's latent scaling,
    VAE-decode in chunks; without a VAE, `latent_preview`."""
    if vae is None:
        return latent_preview(latents)
    cfg = vae.config
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    out = []
    for chunk in latents.split(batch):
        z = chunk.to(device=device, dtype=torch.float32)
        if cfg.get("latents_mean") is not None and "temperal_downsample" in cfg:  # Qwen-Image VAE: one video frame
            mean = torch.tensor(cfg["latents_mean"], device=device).view(1, -1, 1, 1)
            std = torch.tensor(cfg["latents_std"], device=device).view(1, -1, 1, 1)
            image = vae.decode((z * std + mean).unsqueeze(2).to(dtype), return_dict=False)[0][:, :, 0]
        else:
            z = z / cfg.get("scaling_factor", 1.0) + (cfg.get("shift_factor") or 0.0)
            image = vae.decode(z.to(dtype), return_dict=False)[0]
        out.append(image.float().clamp(-1, 1))
    return torch.cat(out)


def latent_channels(model: nn.Module) -> int:
    """Channels of the (unpacked) latents the transformer denoises."""
    name, cfg = _class_name(model), model.config
    if name in ("FluxTransformer2DModel", "QwenImageTransformer2DModel"):  # 2x2 packed tokens
        return int(cfg["in_channels"]) // 4
    return int(cfg["in_channels"])


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / FSDP(1) / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


# ------------------------------------------------------------------------------------------ the family
class DiffusersFamily:
    """A diffusers text-to-image transformer as a DMD model family (see dmd_dar.families.Family)."""

    def __init__(self, teacher: str, cfg: T2IConfig | None, device):
        from dmd_dar.teachers import _FAMILIES, load_transformer

        cfg = cfg or T2IConfig()
        self.cfg, self.device = cfg, torch.device(device)
        self.dtype = resolve_dtype(cfg.dtype)
        if cfg.model_class not in TEXT_CLASSES:
            raise UserError(f"t2i.model_class={cfg.model_class!r} is not a text-to-image class; use one of {', '.join(TEXT_CLASSES)}"
                            + (" (class-conditional DiT: family: dit)" if cfg.model_class in _FAMILIES else ""))
        self.tiny = cfg.tiny or teacher == "tiny"
        if self.tiny:
            model = build_tiny_transformer(cfg.model_class, dict(cfg.tiny_config))
        else:
            model = load_transformer(teacher, _kind_of(cfg.model_class), subfolder=cfg.subfolder, torch_dtype=self.dtype)
            if _class_name(model) != cfg.model_class:
                raise UserError(f"{teacher} holds a {_class_name(model)}, not t2i.model_class={cfg.model_class}")
        if self.tiny and self.dtype != torch.float32:
            model = model.to(self.dtype)
        self._teacher = model.to(self.device).eval().requires_grad_(False)
        self.teacher_source = teacher

        channels = latent_channels(model)
        self.vae = None
        if cfg.vae:
            vae = load_vae(cfg.vae, cfg.model_class, channels, None if self.tiny else self.dtype)
            self.vae = vae.to(self.device).eval().requires_grad_(False)
        factor = vae_scale_factor(self.vae) if self.vae is not None else cfg.vae_scale_factor
        if cfg.resolution % factor:
            raise UserError(f"t2i.resolution={cfg.resolution} is not a multiple of the VAE scale factor {factor}")
        side = cfg.resolution // factor
        if cfg.model_class in ("FluxTransformer2DModel", "QwenImageTransformer2DModel") and side % 2:
            raise UserError(f"t2i.resolution={cfg.resolution}: {cfg.model_class} needs an even latent size (a multiple of {2 * factor} pixels)")
        self.vae_factor = factor
        self.sample_batch_size = cfg.sample_batch_size
        self.sample_shape = (channels, side, side)
        self.feature_dim = int(getattr(model, "inner_dim", 0) or 0)

        encoder = tiny_prompt_encoder(self._teacher) if self.tiny else None
        self.cache_path = prompt_cache_path(cfg)
        self.prompts = prepare_prompt_cache(teacher, cfg, self.device, encoder)
        self.num_conditions = len(self.prompts)
        if self.prompts.null is None:
            raise UserError(f"the prompt cache {self.cache_path} has no empty-prompt condition (needed for CFG); delete it to rebuild")
        self.null = self.prompts.null.to(self.device, dtype=self.dtype)
        self.has_guidance_embed = bool(model.config.get("guidance_embeds", False)) and cfg.model_class == "FluxTransformer2DModel"

    # -------------------------------------------------------------------- Family protocol
    def teacher(self) -> nn.Module:
        return self._teacher

    def trainable(self, routing, lora_rank: int) -> nn.Module:
        from dmd_dar.lora import apply_lora
        from dmd_dar.models.diffusers_dar import convert_to_dar
        from dmd_dar.teachers import lora_targets

        route_text = self.cfg.route_text and self.cfg.model_class != "PixArtTransformer2DModel"
        model = convert_to_dar(copy.deepcopy(self._teacher), routing, route_text=route_text).train()
        if lora_rank > 0:
            apply_lora(model, rank=lora_rank, targets=lora_targets(model, include_mlp=self.cfg.lora_mlp))
            for p in model.parameters():  # trained parameters in fp32, whatever the frozen base's dtype
                if p.requires_grad and p.dtype != torch.float32:
                    p.data = p.data.float()
        else:
            model.requires_grad_(True)
        return model.to(self.device)

    def denoiser(self, model: nn.Module, guidance: float | None = None):
        """x0 adapter; a DDP/FSDP-wrapped model is called through its wrapper (gradients synchronise)."""
        from dmd_dar.teachers import DiffusersDenoiser

        raw = unwrap(model)
        d = DiffusersDenoiser(raw, kind=self.cfg.prediction, guidance=self.cfg.guidance_embed if guidance is None else guidance,
                              vae_scale_factor=self.vae_factor)
        if raw is not model:
            d._modules["transformer"] = model  # only calls go through the wrapper; config is read from `raw` above
            if hasattr(raw, "use_additional_conditions"):
                model.use_additional_conditions = raw.use_additional_conditions  # PixArt reads it on the called module
        return d

    def denoising_loss(self, model: nn.Module, x0, noise, t, cond) -> Tensor:
        """The teacher's objective in its own parameterisation: velocity MSE (flow), eps MSE (VP eps) or
        v MSE (VP v), at x_t = (1 - t) x0 + t noise (VP models see the same-SNR VP input)."""
        from dmd_dar.diffusion import flow_t_to_vp, interpolate
        from dmd_dar.teachers import FLOW, VP_EPS

        d = self.denoiser(model)
        prediction = d.model_output(interpolate(x0, noise, t), t, cond).float()
        x0, noise = x0.float(), noise.float()
        if d.kind == FLOW:
            target = noise - x0
        elif d.kind == VP_EPS:
            target = noise
        else:
            ab = flow_t_to_vp(t.float()).view(-1, *([1] * (x0.ndim - 1)))
            target = ab.sqrt() * noise - (1 - ab).sqrt() * x0
        return F.mse_loss(prediction, target)

    def real_score(self, teacher: nn.Module, guidance_scale: float):
        """The teacher with guidance: Flux guidance embedding where the model has one, else CFG against the
        empty prompt."""
        from dmd_dar.diffusion import cfg_denoiser

        if self.has_guidance_embed:
            return self.denoiser(teacher, guidance=guidance_scale)
        return cfg_denoiser(self.denoiser(teacher), guidance_scale, self.null)

    def conditions(self, ids: Tensor):
        return self.prompts[ids.cpu().long()].to(self.device, dtype=self.dtype)

    def hidden_features(self, model, x_t, t, cond) -> Tensor:
        raise UserError("gan.enabled is not supported for diffusers (text-to-image) teachers; set gan.enabled=false")

    def load_weights(self, model: nn.Module, folder: Path) -> None:
        """Start `model` (a fresh `trainable`, no LoRA) from a DAR export folder (e.g. an earlier student)."""
        from safetensors.torch import load_file

        from dmd_dar.models.diffusers_dar import BACKBONE_WEIGHTS, ROUTER_WEIGHTS

        folder = Path(folder)
        if any("lora_" in name for name, _ in model.named_parameters()):
            raise UserError("student.init with LoRA is not supported: merge the LoRA of the initial weights first")
        files = [folder / BACKBONE_WEIGHTS, folder / ROUTER_WEIGHTS]
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
        from dmd_dar.lora import merge_lora
        from dmd_dar.models.diffusers_dar import save_dar_pretrained

        save_dar_pretrained(merge_lora(copy.deepcopy(unwrap(model))), folder)

    def load_student(self, folder: Path) -> nn.Module:
        from dmd_dar.models.diffusers_dar import load_dar_pretrained

        return load_dar_pretrained(folder, torch_dtype=self.dtype, device=self.device).eval()

    def to_images(self, x: Tensor) -> Tensor:
        return decode_latents(self.vae, x)

    @torch.no_grad()
    def teacher_sample(self, teacher, noise, ids, sampler: str, steps: int, guidance_scale: float) -> Tensor:
        from dmd_dar.diffusion import sample

        return sample(self.real_score(teacher, guidance_scale), noise, self.conditions(ids), sampler=sampler, steps=steps,
                      shift=self.cfg.sampling_shift)


class _LazyEncoder:
    """Builds the text encoder (`make()`) only when the prompt cache has to be (re)built."""

    def __init__(self, make):
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


def prepare_prompt_cache(teacher: str, cfg: T2IConfig, device="cpu", encoder=None):
    """The prompt-embedding cache of a run (`dmd_dar.text.PromptCache`): loaded when it holds exactly the prompts of
    t2i.prompts (or t2i.prompts is unset), else encoded with `encoder` or the pipeline's text encoders
    (t2i.text_encoder, default the teacher's pipeline root) and written. Run it once before a multi-GPU launch so
    that the ranks do not all load the text encoders (docs/t2i.md)."""
    from dmd_dar.text import build_prompt_cache, load_prompt_cache

    path = prompt_cache_path(cfg)
    if cfg.prompts is None:
        return load_prompt_cache(path)
    encode = encoder or _LazyEncoder(lambda: pipeline_text_encoder(cfg.text_encoder or teacher, cfg.model_class,
                                                                    resolve_dtype(cfg.dtype), device, cfg.max_sequence_length))
    return build_prompt_cache(cfg.prompts, path, encode)
