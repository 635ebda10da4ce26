"""Sampling any checkpoint folder: DiT teachers and students, exported diffusers students, stock diffusers models.

`load_sampler_model(folder)` recognises the folder; `sample_checkpoint(loaded, ...)` draws images either with a
multi-step sampler (euler / heun / sde of `dmd_dar.diffusion.sample`, optional CFG) or, for distilled students,
in K steps (`dmd_dar.dmd.generate`, `timesteps` such as [1.0] or [1.0, 0.5]); `write_samples` writes the PNG grid
and the `.npz` (arr_0, uint8 NHWC) into a folder atomically. `scripts/sample.py` is the command line.

Determinism: image i's starting noise (and its K-step renoising noise) comes from a generator seeded with
seed + i, so an image does not depend on n or the batch size. The "sde" sampler's noise is drawn per batch
(seeded with seed + index of the batch's first image): repeatable for the same batch size.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from dmd_dar.errors import UserError

GRID_FILE, SAMPLES_FILE, META_FILE = "grid.png", "samples.npz", "sample.json"


@dataclass
class LoadedModel:
    """A model ready to sample. kind: "dit" (our class-conditional DiT) or "diffusers" (a text-to-image
    transformer: an exported DAR student or a stock model)."""

    kind: str
    model: nn.Module
    folder: Path
    device: torch.device
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def class_name(self) -> str:
        if self.kind == "dit":
            return "DiT"
        from dmd_dar.models.diffusers_dar import stock_class

        return stock_class(self.model).__name__


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_sampler_model(folder: str | Path, device: str | torch.device | None = None, dtype: str = "float32") -> LoadedModel:
    """Load `folder`: "bundled" (the bundled DiT teacher), a DiT folder (model.safetensors + config.json, teacher or
    student), a DAR export of a diffusers student (routing.json, from save_dar_pretrained), or a stock diffusers
    transformer folder / pipeline root (config.json with a supported `_class_name`)."""
    from dmd_dar.checkpoint import read_json
    from dmd_dar.families import BUNDLED_TEACHER

    device = torch.device(device) if device is not None else default_device()
    path = BUNDLED_TEACHER if str(folder) == "bundled" else Path(folder).expanduser()
    if not path.is_dir():
        hint = " (the bundled teacher is not installed: train one with scripts/train_teacher.py)" if str(folder) == "bundled" else ""
        raise UserError(f"model folder {path} not found{hint}: pass a DiT folder, an exported diffusers student or 'bundled'")
    if (path / "routing.json").is_file():
        from dmd_dar.models.diffusers_dar import load_dar_pretrained
        from dmd_dar.t2i import resolve_dtype

        model = load_dar_pretrained(path, torch_dtype=resolve_dtype(dtype), device=device)
        return LoadedModel("diffusers", model.eval().requires_grad_(False), path, device, {"dar": True})
    if (path / "model.safetensors").is_file():
        from dmd_dar.models import DiT

        model = DiT.from_pretrained(path)
        return LoadedModel("dit", model.to(device).eval().requires_grad_(False), path, device, {"routing": model.routing.mode})
    config = path / "transformer" / "config.json" if (path / "transformer" / "config.json").is_file() else path / "config.json"
    if config.is_file():
        from dmd_dar.t2i import TEXT_CLASSES, _kind_of, resolve_dtype
        from dmd_dar.teachers import load_transformer

        name = read_json(config).get("_class_name")
        if name in TEXT_CLASSES:
            model = load_transformer(path, _kind_of(name), torch_dtype=resolve_dtype(dtype))
            return LoadedModel("diffusers", model.to(device).eval().requires_grad_(False), path, device, {"dar": False})
        raise UserError(f"{config} describes a {name!r}; sampling supports DiT folders and {', '.join(TEXT_CLASSES)}")
    raise UserError(f"{path} holds no model: expected model.safetensors (DiT), routing.json (exported diffusers student) "
                    "or a diffusers config.json")


# ------------------------------------------------------------------------------------------ conditions
def parse_labels(text: str | None, num_classes: int) -> list[int]:
    """"0,1,2" -> [0, 1, 2]; "all" (or None) -> every class."""
    if text is None or text.strip() == "all":
        return list(range(num_classes))
    try:
        labels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--labels {text!r} is not a comma-separated list of integers or 'all'") from None
    bad = [y for y in labels if not 0 <= y < num_classes]
    if not labels or bad:
        raise UserError(f"--labels {text!r}: class labels must be in 0..{num_classes - 1}" + (f" (got {bad})" if bad else ""))
    return labels


def parse_timesteps(timesteps: str | Sequence[float] | None, student_steps: int | None) -> list[float] | None:
    """The few-step schedule: explicit ("1.0,0.5") or K uniform steps from 1 ([1, 1 - 1/K, ..., 1/K]); None = multi-step."""
    if timesteps is not None and student_steps is not None:
        raise UserError("give --timesteps or --student-steps, not both")
    if student_steps is not None:
        if student_steps < 1:
            raise UserError(f"--student-steps {student_steps} must be >= 1")
        return [1.0 - k / student_steps for k in range(student_steps)]
    if timesteps is None:
        return None
    try:
        ts = [float(x) for x in timesteps.split(",")] if isinstance(timesteps, str) else [float(x) for x in timesteps]
    except ValueError:
        raise UserError(f"--timesteps {timesteps!r} is not a comma-separated list of numbers") from None
    if not ts or any(not 0.0 < t <= 1.0 for t in ts) or any(b >= a for a, b in zip(ts, ts[1:])):
        raise UserError(f"--timesteps {timesteps!r} must decrease strictly within (0, 1], e.g. 1.0,0.5")
    return ts


def text_conditions(prompts: list[str] | None, embeddings: str | None, text_encoder: str | None, loaded: LoadedModel,
                    max_sequence_length: int | None = None, dtype: str = "float32"):
    """(prompts, TextCondition for them, null TextCondition or None). Prompts are looked up in the embedding cache
    (`dmd_dar.text`) by their text; prompts missing from it are encoded with the pipeline's text encoders
    (`text_encoder`: a local pipeline folder or hub id), which must then be available."""
    from dmd_dar.t2i import pipeline_text_encoder, resolve_dtype
    from dmd_dar.text import load_prompt_cache

    cache = load_prompt_cache(embeddings) if embeddings else None
    if prompts is None:
        if cache is None:
            raise UserError("a text-to-image model needs --prompt, --prompts FILE or --embeddings CACHE")
        prompts = list(cache.prompts)
    known = {p: i for i, p in enumerate(cache.prompts)} if cache is not None else {}
    missing = [p for p in dict.fromkeys(prompts) if p not in known]
    encoded = null = None
    if cache is not None:
        null = cache.null
    if missing or null is None:
        if text_encoder is None:
            what = f"{len(missing)} prompt(s) (e.g. {missing[0]!r}) are not in the embedding cache" if missing else "the cache has no empty-prompt condition"
            raise UserError(f"{what}: pass --text-encoder PIPELINE_FOLDER (text encoders available locally) or an "
                            "--embeddings cache that holds them")
        encode = pipeline_text_encoder(text_encoder, loaded.class_name, resolve_dtype(dtype), loaded.device, max_sequence_length)
        with torch.no_grad():
            if missing:
                encoded = encode(missing).to("cpu")
            if null is None:
                null = encode([""]).to("cpu")
    rows = []
    for p in prompts:
        if p in known:
            rows.append(cache.condition[known[p] : known[p] + 1])
        else:
            i = missing.index(p)
            rows.append(encoded[i : i + 1])
    cond = rows[0]
    for row in rows[1:]:
        cond = _stack(cond, row)
    return prompts, cond, null


def _stack(a, b):
    """Two TextConditions along the batch (`TextCondition.cat` would broadcast a batch-1 side: CFG's rule)."""
    from dmd_dar.teachers import TextCondition

    if a.prompt_embeds.shape[1:] != b.prompt_embeds.shape[1:]:
        raise UserError("prompt embeddings of different lengths: encode all prompts with the same max_sequence_length")
    cat = lambda x, y: None if x is None else torch.cat([x, y])  # noqa: E731
    return TextCondition(torch.cat([a.prompt_embeds, b.prompt_embeds]), cat(a.pooled_prompt_embeds, b.pooled_prompt_embeds),
                         cat(a.attention_mask, b.attention_mask))


# ------------------------------------------------------------------------------------------ sampling
@dataclass
class Samples:
    images: Tensor  # float NCHW in [-1, 1], on the CPU
    meta: dict[str, Any]


def _draws(shape: tuple[int, ...], indices: range, seed: int, renoise_steps: int) -> tuple[Tensor, Tensor]:
    """Per-image noise and renoising noise, each image from its own generator (seed + i)."""
    noise, renoise = [], []
    for i in indices:
        g = torch.Generator().manual_seed(seed + i)
        noise.append(torch.randn(shape, generator=g))
        renoise.append(torch.randn((renoise_steps, *shape), generator=g))
    return torch.stack(noise), torch.stack(renoise, dim=1)


@torch.no_grad()
def run_sampling(denoiser: Callable, shape: tuple[int, ...], n: int, cond_of: Callable[[range], Any], to_images: Callable[[Tensor], Tensor],
                 device: torch.device, seed: int = 0, sampler: str = "heun", steps: int = 25, timesteps: Sequence[float] | None = None,
                 shift: float = 1.0, batch_size: int = 64) -> Tensor:
    """n images from `denoiser` (x0 interface): K-step `generate` when `timesteps` is given, else `sample`."""
    from dmd_dar.diffusion import sample
    from dmd_dar.dmd import generate

    if n < 1:
        raise UserError(f"--n {n} must be >= 1")
    if steps < 1:
        raise UserError(f"--steps {steps} must be >= 1")
    out = []
    for start in range(0, n, batch_size):
        idx = range(start, min(n, start + batch_size))
        noise, renoise = _draws(shape, idx, seed, len(timesteps) - 1 if timesteps else 0)
        noise, cond = noise.to(device), cond_of(idx)
        if timesteps:
            x = generate(denoiser, noise, cond, list(timesteps), renoise=renoise.to(device))
        else:
            g = torch.Generator(device).manual_seed(seed + start) if sampler == "sde" else None
            x = sample(denoiser, noise, cond, sampler=sampler, steps=steps, shift=shift, generator=g)
        out.append(to_images(x).float().cpu().clamp(-1, 1))
    return torch.cat(out)


def sample_checkpoint(loaded: LoadedModel, n: int | None = None, labels: str | None = None, prompts: list[str] | None = None,
                      embeddings: str | None = None, text_encoder: str | None = None, vae: str | None = None,
                      resolution: int = 1024, vae_scale_factor: int = 8, seed: int = 0, sampler: str = "heun", steps: int = 25,
                      cfg_scale: float = 1.0, timesteps: Sequence[float] | None = None, shift: float = 1.0,
                      guidance: float = 3.5, batch_size: int = 64, dtype: str = "float32",
                      max_sequence_length: int | None = None) -> Samples:
    """Sample `loaded` (see the module docstring). DiT: `labels` ("0,1,2" / "all"), n images cycling through them.
    Text models: `prompts` (or every prompt of `embeddings`), n images cycling through them, latents of
    resolution / scale factor, decoded with `vae` ("tiny" = a random test VAE) or shown as the latent preview."""
    from dmd_dar.diffusion import cfg_denoiser

    mode = {"timesteps": list(timesteps)} if timesteps else {"sampler": sampler, "steps": steps, "shift": shift}
    meta: dict[str, Any] = {"model": str(loaded.folder), "class": loaded.class_name, "seed": seed, "cfg_scale": cfg_scale, **mode}
    if loaded.kind == "dit":
        from dmd_dar.diffusion import VelocityDenoiser

        model = loaded.model
        classes = parse_labels(labels, model.num_classes)
        n = n or len(classes)
        ids = torch.tensor([classes[i % len(classes)] for i in range(n)])
        denoiser = VelocityDenoiser(model)
        if cfg_scale != 1.0:
            denoiser = cfg_denoiser(denoiser, cfg_scale, model.null_class)
        shape = (model.in_channels, model.input_size, model.input_size)
        to_images = (lambda x: x.clamp(-1, 1)) if model.in_channels in (1, 3) else _preview
        images = run_sampling(denoiser, shape, n, lambda idx: ids[idx.start : idx.stop].to(loaded.device), to_images,
                              loaded.device, seed, sampler, steps, timesteps, shift, batch_size)
        meta["labels"] = ids.tolist()
        return Samples(images, meta)

    if labels is not None:
        raise UserError("--labels is for class-conditional DiT models; a text-to-image model takes --prompt / --prompts")
    from dmd_dar.t2i import decode_latents, latent_channels, load_vae, resolve_dtype
    from dmd_dar.teachers import DiffusersDenoiser

    model, name = loaded.model, loaded.class_name
    prompts, cond, null = text_conditions(prompts, embeddings, text_encoder, loaded, max_sequence_length, dtype)
    n = n or len(prompts)
    channels = latent_channels(model)
    vae_model = None
    if vae:
        vae_model = load_vae(vae, name, channels, None if vae == "tiny" else resolve_dtype(dtype)).to(loaded.device)
        from dmd_dar.t2i import vae_scale_factor as factor_of

        vae_scale_factor = factor_of(vae_model)
    if resolution % vae_scale_factor:
        raise UserError(f"--resolution {resolution} is not a multiple of the VAE scale factor {vae_scale_factor}")
    side = resolution // vae_scale_factor
    denoiser = DiffusersDenoiser(model, guidance=guidance, vae_scale_factor=vae_scale_factor)
    if cfg_scale != 1.0:
        denoiser = cfg_denoiser(denoiser, cfg_scale, null.to(loaded.device, dtype=resolve_dtype(dtype)))
    order = torch.tensor([i % len(prompts) for i in range(n)])
    model_dtype = next(model.parameters()).dtype

    def cond_of(idx: range):
        return cond[order[idx.start : idx.stop]].to(loaded.device, dtype=model_dtype)

    images = run_sampling(denoiser, (channels, side, side), n, cond_of, lambda x: decode_latents(vae_model, x), loaded.device,
                          seed, sampler, steps, timesteps, shift, batch_size)
    meta.update(prompts=[prompts[i] for i in order.tolist()], resolution=resolution, vae=vae, guidance=guidance)
    return Samples(images, meta)


def _preview(x: Tensor) -> Tensor:
    from dmd_dar.t2i import latent_preview

    return latent_preview(x)


# ------------------------------------------------------------------------------------------ output
def write_samples(samples: Samples, out_dir: str | Path, nrow: int | None = None) -> Path:
    """`out_dir`/grid.png, samples.npz (arr_0 uint8 NHWC) and sample.json, written as one folder atomically.
    An existing folder is replaced only when it holds nothing but these files."""
    from dmd_dar.checkpoint import atomic_dir, write_json
    from dmd_dar.grid import save_image_grid
    from dmd_dar.image_io import save_images

    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--out {out} exists and is not a folder; choose another path")
        foreign = [p.name for p in out.iterdir() if p.name not in (GRID_FILE, SAMPLES_FILE, META_FILE)]
        if foreign:
            raise UserError(f"--out {out} holds other files ({', '.join(sorted(foreign)[:3])}); choose an empty or new folder")
    images = samples.images
    n = len(images)
    with atomic_dir(out) as tmp:
        save_images(images, tmp / SAMPLES_FILE)
        save_image_grid(images, tmp / GRID_FILE, nrow=nrow or min(n, 8), scale=max(1, 64 // images.shape[-1]))
        write_json(tmp / META_FILE, {**samples.meta, "n": n, "shape": list(images.shape[1:])})
        tmp.chmod(0o755)  # mkdtemp makes it private
    return out
