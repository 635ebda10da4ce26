"""Sampling any checkpoint folder through its model family: DiT teachers and students, exported diffusers
students, stock diffusers models.

`load_sampler_model(folder)` recognises and loads the folder; `sample_checkpoint(loaded, ...)` puts the loaded
model into its family (`dmd_dar.dmd.family.DiTFamily`, `dmd_dar.t2i.DiffusersFamily`) and draws images through
the family: its denoiser with classifier-free guidance (`with_cfg`), its conditions, its sample shape and its
`to_images`. Images come from a multi-step sampler (euler / heun / sde of `dmd_dar.diffusion.sample`) or, for
distilled students, from K steps (`dmd_dar.diffusion.few_step_sample`, `timesteps` such as [1.0] or [1.0, 0.5]).
`write_samples` writes the PNG grid and the `.npz` (arr_0, uint8 NHWC) into a folder atomically.
`sample_sharded` is the evaluation-scale path (50,000 ImageNet samples): the images are made shard by shard
(`DIR/shards/part-*.npz`, each written atomically, so an interrupted run resumes where it stopped), the shards are
shared by several processes (rank k makes shards k, k + world, ...), and the last step merges them into one
ADM-format `DIR/samples.npz` (arr_0 uint8 NHWC, arr_1 the labels) without holding all images in memory.
`scripts/sample.py` is the command line: errors here name the parameter (`SamplingArgumentError`), the script
names its flag.

Determinism: image i's starting noise (and its K-step renoising noise) comes from a generator seeded with
seed + i, so an image does not depend on n or the batch size. The "sde" sampler's noise is drawn per batch
(seeded with seed + index of the batch's first image): repeatable for the same batch size.
"""
from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dmd_dar.checkpoint import atomic_dir, atomic_write, check_replaceable, read_json, write_json
from dmd_dar.diffusion import Denoiser, check_timesteps, few_step_sample, sample
from dmd_dar.dmd.family import BUNDLED_TEACHER, DiTFamily, Family
from dmd_dar.errors import UserError
from dmd_dar.grid import save_image_grid
from dmd_dar.image_io import SAMPLES_FILE, save_images
from dmd_dar.models import DiT
from dmd_dar.models.architectures import TEXT_TO_IMAGE_CLASS_NAMES, architecture_of, architecture_of_class
from dmd_dar.t2i import (
    PromptCache,
    T2IConfig,
    TextCondition,
    load_prompt_cache,
    load_transformer,
    pipeline_text_encoder,
    resolve_dtype,
)
from dmd_dar.training import resolve_device

GRID_FILE, META_FILE = "grid.png", "sample.json"  # beside image_io.SAMPLES_FILE, which readers look for
SAMPLE_FILES = (GRID_FILE, SAMPLES_FILE, META_FILE)


class SamplingArgumentError(UserError):
    """A bad argument of the sampling functions: `argument` is the parameter's name and `value` its value (None
    when what is wrong is its absence), so that a command line can name its own flag instead."""

    def __init__(self, argument: str, value: Any, problem: str):
        self.argument, self.value, self.problem = argument, value, problem
        super().__init__(f"{argument}={value!r} {problem}" if value is not None else f"{argument}: {problem}")


@dataclass
class LoadedModel:
    """A model ready to sample. backbone: "dit" (our class-conditional DiT) or "diffusers" (a text-to-image
    transformer: an exported DAR student or a stock model); dtype: the name of its weights' dtype."""

    backbone: str
    model: nn.Module
    folder: Path
    device: torch.device
    dtype: str = "float32"
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def class_name(self) -> str:
        return "DiT" if self.backbone == "dit" else architecture_of(self.model).class_name


def load_sampler_model(folder: str | Path, device: str | torch.device | None = None, dtype: str = "float32") -> LoadedModel:
    """Load `folder`: "bundled" (the bundled DiT teacher), a DiT folder (model.safetensors + config.json, teacher or
    student), a DAR export of a diffusers student (routing.json, from save_dar_pretrained), or a stock diffusers
    transformer folder / pipeline root (config.json with a supported `_class_name`)."""
    device = resolve_device(device)
    path = BUNDLED_TEACHER if str(folder) == "bundled" else Path(folder).expanduser()
    if not path.is_dir():
        hint = " (the bundled teacher is not installed: train one with scripts/train_teacher.py)" if str(folder) == "bundled" else ""
        raise UserError(f"model folder {path} not found{hint}: pass a DiT folder, an exported diffusers student or 'bundled'")
    if (path / "routing.json").is_file():
        from dmd_dar.models.diffusers_dar import load_dar_pretrained  # imports diffusers: only for diffusers folders

        model = load_dar_pretrained(path, torch_dtype=resolve_dtype(dtype), device=device)
        return LoadedModel("diffusers", model.eval().requires_grad_(False), path, device, dtype, {"dar": True})
    if (path / "model.safetensors").is_file():
        model = DiT.from_pretrained(path)
        return LoadedModel("dit", model.to(device).eval().requires_grad_(False), path, device, "float32",
                           {"routing": model.routing.mode})
    config = path / "transformer" / "config.json" if (path / "transformer" / "config.json").is_file() else path / "config.json"
    if config.is_file():
        name = read_json(config).get("_class_name")
        if name not in TEXT_TO_IMAGE_CLASS_NAMES:
            raise UserError(f"{config} describes a {name!r}; sampling supports DiT folders and {', '.join(TEXT_TO_IMAGE_CLASS_NAMES)}")
        model = load_transformer(path, architecture_of_class(name).name, torch_dtype=resolve_dtype(dtype))
        return LoadedModel("diffusers", model.to(device).eval().requires_grad_(False), path, device, dtype, {"dar": False})
    raise UserError(f"{path} holds no model: expected model.safetensors (DiT), routing.json (exported diffusers student) "
                    "or a diffusers config.json")


# ------------------------------------------------------------------------------------------ arguments
def parse_labels(text: str | None, num_classes: int) -> list[int]:
    """"0,1,2" -> [0, 1, 2]; "all" (or None) -> every class."""
    if text is None or text.strip() == "all":
        return list(range(num_classes))
    try:
        labels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SamplingArgumentError("labels", text, "is not a comma-separated list of class labels or 'all'") from None
    bad = [y for y in labels if not 0 <= y < num_classes]
    if not labels or bad:
        raise SamplingArgumentError("labels", text, f"must be class labels in 0..{num_classes - 1}" + (f" (got {bad})" if bad else ""))
    return labels


def parse_timesteps(timesteps: str | Sequence[float] | None, student_steps: int | None) -> list[float] | None:
    """The few-step schedule: explicit ("1.0,0.5") or K uniform steps from 1 ([1, 1 - 1/K, ..., 1/K]); None = multi-step."""
    if timesteps is not None and student_steps is not None:
        raise SamplingArgumentError("student_steps", student_steps, "and timesteps are both given; give one of them")
    if student_steps is not None:
        if student_steps < 1:
            raise SamplingArgumentError("student_steps", student_steps, "must be >= 1")
        return [1.0 - k / student_steps for k in range(student_steps)]
    if timesteps is None:
        return None
    try:
        return check_timesteps([float(x) for x in timesteps.split(",")] if isinstance(timesteps, str) else timesteps)
    except ValueError:
        raise SamplingArgumentError("timesteps", timesteps, "must be numbers decreasing strictly within (0, 1], e.g. 1.0,0.5") from None


def prompt_conditions(prompts: list[str] | None, embeddings: str | None, text_encoder: str | None, loaded: LoadedModel,
                      max_sequence_length: int | None = None) -> PromptCache:
    """The prompts to sample (default: every prompt of the `embeddings` cache) and their conditions, with the null
    condition for CFG. Prompts are looked up in the embedding cache by their text; prompts missing from it (and a
    missing null) are encoded with the pipeline's text encoders (`text_encoder`: a local pipeline folder or hub
    id), which must then be available."""
    cache = load_prompt_cache(embeddings) if embeddings else None
    if prompts is None:
        if cache is None:
            raise SamplingArgumentError("prompts", None, "a text-to-image model needs prompts, or an embeddings cache to take them from")
        prompts = list(cache.prompts)
    row = {p: i for i, p in enumerate(cache.prompts)} if cache is not None else {}  # prompt -> row of the table below
    missing = [p for p in dict.fromkeys(prompts) if p not in row]
    null, encoded = (cache.null if cache is not None else None), None
    if missing or null is None:
        if text_encoder is None:
            what = f"{len(missing)} prompt(s) (e.g. {missing[0]!r}) are not in the embedding cache" if missing else "the embedding cache has no empty-prompt condition"
            raise SamplingArgumentError("text_encoder", None, f"{what}: give a pipeline folder whose text encoders are on local "
                                        "disk, or an embeddings cache that holds them")
        encode = pipeline_text_encoder(text_encoder, architecture_of(loaded.model), resolve_dtype(loaded.dtype), loaded.device,
                                       max_sequence_length)
        with torch.no_grad():
            encoded = encode(missing).to("cpu") if missing else None
            null = null if null is not None else encode([""]).to("cpu")
    parts = [c for c in (cache.condition if cache is not None else None, encoded) if c is not None]
    if any(c.prompt_embeds.shape[1:] != null.prompt_embeds.shape[1:] for c in parts):
        raise SamplingArgumentError("max_sequence_length", max_sequence_length, "gives prompt embeddings of another length than "
                                    "the embedding cache's: use the length the cache was built with")
    offset = len(cache.condition) if cache is not None else 0
    row.update({p: offset + i for i, p in enumerate(missing)})
    table = TextCondition.concat(parts)
    return PromptCache(list(prompts), table[torch.tensor([row[p] for p in prompts])], null)


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
def run_sampling(family: Family, denoiser: Denoiser, ids: Tensor, seed: int = 0, sampler: str = "heun", steps: int = 25,
                 timesteps: Sequence[float] | None = None, shift: float = 1.0, batch_size: int = 64, first: int = 0) -> Tensor:
    """One image per condition id in `ids` from `denoiser` (x0 interface, on the family's samples): K-step
    `few_step_sample` when `timesteps` is given, else `sample`; decoded with `family.to_images`. `ids` are images
    first, first + 1, ... of a larger set (a shard): image i is drawn from seed + i."""
    for argument, value in (("steps", steps), ("batch_size", batch_size)):
        if value < 1:
            raise SamplingArgumentError(argument, value, "must be >= 1")
    out = []
    for start in range(0, len(ids), batch_size):
        idx = range(start, min(len(ids), start + batch_size))
        noise, renoise = _draws(family.sample_shape, range(first + idx.start, first + idx.stop), seed,
                                len(timesteps) - 1 if timesteps else 0)
        noise, cond = noise.to(family.device), family.conditions(ids[idx.start : idx.stop])
        if timesteps:
            x = few_step_sample(denoiser, noise, cond, list(timesteps), renoise=renoise.to(family.device))
        else:
            g = torch.Generator(family.device).manual_seed(seed + first + start) if sampler == "sde" else None
            x = sample(denoiser, noise, cond, sampler=sampler, steps=steps, shift=shift, generator=g)
        out.append(family.to_images(x).float().cpu().clamp(-1, 1))
    return torch.cat(out)


@dataclass
class Plan:
    """What to sample: the family, the guided denoiser, one condition id per image, and the sampler settings."""

    family: Family
    denoiser: Denoiser
    ids: Tensor
    meta: dict[str, Any]
    seed: int = 0
    sampler: str = "heun"
    steps: int = 25
    timesteps: list[float] | None = None
    shift: float = 1.0
    batch_size: int = 64

    def run(self, start: int = 0, stop: int | None = None) -> Tensor:
        """Images start..stop-1 of the plan (float NCHW in [-1, 1], on the CPU)."""
        stop = len(self.ids) if stop is None else stop
        return run_sampling(self.family, self.denoiser, self.ids[start:stop], self.seed, self.sampler, self.steps,
                            self.timesteps, self.shift, self.batch_size, first=start)


def sample_checkpoint(loaded: LoadedModel, n: int | None = None, labels: str | None = None, prompts: list[str] | None = None,
                      embeddings: str | None = None, text_encoder: str | None = None, vae: str | None = None,
                      resolution: int = 1024, vae_scale_factor: int = 8, seed: int = 0, sampler: str = "heun", steps: int = 25,
                      cfg_scale: float = 1.0, timesteps: Sequence[float] | None = None, shift: float = 1.0,
                      guidance: float = 3.5, batch_size: int = 64, max_sequence_length: int | None = None) -> Samples:
    """Sample `loaded` (see the module docstring). DiT: `labels` ("0,1,2" / "all"), n images cycling through them;
    latent DiTs are decoded with the VAE their folder records, or `vae`. Text models: `prompts` (or every prompt of
    `embeddings`), n images cycling through them, latents of resolution / scale factor, decoded with `vae` ("tiny" =
    a random test VAE) or shown as the latent preview; `guidance` feeds the guidance embedding of guidance-distilled
    Flux models."""
    plan = plan_sampling(loaded, n, labels, prompts, embeddings, text_encoder, vae, resolution, vae_scale_factor, seed, sampler,
                         steps, cfg_scale, timesteps, shift, guidance, batch_size, max_sequence_length)
    return Samples(plan.run(), plan.meta)


def plan_sampling(loaded: LoadedModel, n: int | None = None, labels: str | None = None, prompts: list[str] | None = None,
                  embeddings: str | None = None, text_encoder: str | None = None, vae: str | None = None,
                  resolution: int = 1024, vae_scale_factor: int = 8, seed: int = 0, sampler: str = "heun", steps: int = 25,
                  cfg_scale: float = 1.0, timesteps: Sequence[float] | None = None, shift: float = 1.0,
                  guidance: float = 3.5, batch_size: int = 64, max_sequence_length: int | None = None) -> Plan:
    """The `Plan` of `sample_checkpoint` (same arguments), before any image is made."""
    if n is not None and n < 1:
        raise SamplingArgumentError("n", n, "must be >= 1")
    mode = {"timesteps": list(timesteps)} if timesteps else {"sampler": sampler, "steps": steps, "shift": shift}
    meta: dict[str, Any] = {"model": str(loaded.folder), "class": loaded.class_name, "seed": seed, "cfg_scale": cfg_scale, **mode}
    if loaded.backbone == "dit":
        if prompts is not None or embeddings is not None:
            raise SamplingArgumentError("prompts", None, f"{loaded.folder} is a class-conditional DiT: it takes class labels, not prompts")
        family: Family = DiTFamily(loaded.model, loaded.device, vae=vae)
        family.decoder()  # a latent model's VAE: loaded (or one line) before any work
        classes = parse_labels(labels, family.num_conditions)
        ids = [classes[i % len(classes)] for i in range(len(classes) if n is None else n)]
        meta["labels"] = ids
        if loaded.model.vae is not None:
            meta["vae"] = loaded.model.vae
    else:
        if labels is not None:
            raise SamplingArgumentError("labels", labels, "are for class-conditional DiT models; a text-to-image model takes prompts")
        from dmd_dar.t2i.family import DiffusersFamily  # imports diffusers: only for diffusers folders

        cache = prompt_conditions(prompts, embeddings, text_encoder, loaded, max_sequence_length)
        t2i = T2IConfig(model_class=loaded.class_name, dtype=loaded.dtype, resolution=resolution, vae=vae,
                        vae_scale_factor=vae_scale_factor, guidance_embed=guidance)
        family = DiffusersFamily(loaded.model, t2i, loaded.device, prompts=cache)
        ids = [i % len(cache) for i in range(len(cache) if n is None else n)]
        meta.update(prompts=[cache.prompts[i] for i in ids], resolution=resolution, vae=vae, guidance=guidance)
    for argument, value in (("steps", steps), ("batch_size", batch_size)):
        if value < 1:
            raise SamplingArgumentError(argument, value, "must be >= 1")
    return Plan(family, family.with_cfg(loaded.model, cfg_scale), torch.tensor(ids, dtype=torch.long), meta, seed, sampler, steps,
                list(timesteps) if timesteps else None, shift, batch_size)


# ------------------------------------------------------------------------------------------ output
def check_output_folder(out_dir: str | Path, sharded: bool = False) -> None:
    """Fail before any work when `out_dir` exists and holds anything but a previous sampling output (and, for
    `sample_sharded`, its shards folder)."""
    check_replaceable(out_dir, (*SAMPLE_FILES, SHARDS_DIR) if sharded else SAMPLE_FILES, "a previous sampling output")


def write_samples(samples: Samples, out_dir: str | Path, nrow: int | None = None) -> Path:
    """`out_dir`/grid.png, samples.npz (arr_0 uint8 NHWC) and sample.json, written as one folder atomically.
    An existing folder is replaced only when it holds nothing but these files."""
    out = Path(out_dir)
    images = samples.images
    n = len(images)
    with atomic_dir(out, SAMPLE_FILES, "a previous sampling output") as tmp:
        save_images(images, tmp / SAMPLES_FILE)
        save_image_grid(images, tmp / GRID_FILE, nrow=nrow or min(n, 8), scale=max(1, 64 // images.shape[-1]))
        write_json(tmp / META_FILE, {**samples.meta, "n": n, "shape": list(images.shape[1:])})
    return out


# ------------------------------------------------------------------------------------------ sharded (evaluation scale)
SHARDS_DIR, PLAN_FILE = "shards", "plan.json"
GRID_IMAGES = 64  # the grid of a sharded run shows its first images


def _shard(k: int) -> str:
    return f"part-{k:05d}.npz"


def sample_sharded(plan: Plan, out_dir: str | Path, shard_size: int = 1000, rank: int = 0, world: int = 1,
                   barrier=None, log=print) -> Path | None:
    """Make this process's shards of `plan` into `out_dir/shards/` (skipping those already there), then, after
    `barrier()` (every process: e.g. torch.distributed.barrier), let rank 0 merge them into `out_dir/samples.npz`
    (arr_0 uint8 NHWC, arr_1 labels), grid.png and sample.json, and remove the shards. Returns out_dir on rank 0.
    A shards folder of another plan (model, seed, sampler, labels, n, shard size) is refused, not mixed in."""
    from dmd_dar.image_io import to_uint8_nhwc

    if shard_size < 1:
        raise SamplingArgumentError("shard_size", shard_size, "must be >= 1")
    out = Path(out_dir)
    check_output_folder(out, sharded=True)
    shards = out / SHARDS_DIR
    n = len(plan.ids)
    n_shards = (n + shard_size - 1) // shard_size
    signature = {**plan.meta, "n": n, "shard_size": shard_size, "batch_size": plan.batch_size}
    plan_file = shards / PLAN_FILE
    if plan_file.is_file() and read_json(plan_file) != signature:  # every process checks: none waits for a failed one
        raise UserError(f"{shards} holds the shards of another sampling run (other model, settings, labels or n); "
                        "use another output folder, or delete that shards folder")
    if rank == 0:
        shards.mkdir(parents=True, exist_ok=True)
        write_json(plan_file, signature)
    if barrier is not None:
        barrier()
    todo = [k for k in range(rank, n_shards, world) if not (shards / _shard(k)).is_file()]
    log(f"[{rank}/{world}] {n} images in {n_shards} shards; {len(todo)} to make here")
    for k in todo:
        start, stop = k * shard_size, min(n, (k + 1) * shard_size)
        images = to_uint8_nhwc(plan.run(start, stop))
        labels = plan.ids[start:stop].numpy()
        atomic_write(shards / _shard(k), lambda tmp, a=images, y=labels, s=start: np.savez(tmp, arr_0=a, arr_1=y, start=s))
        log(f"[{rank}/{world}] shard {k + 1}/{n_shards}: images {start}..{stop - 1}")
    if barrier is not None:
        barrier()
    if rank != 0:
        return None
    return merge_shards(out, n_shards, signature)


def merge_shards(out: Path, n_shards: int, meta: dict[str, Any]) -> Path:
    """shards/part-*.npz -> samples.npz (streamed through a memory-mapped array), grid.png, sample.json."""
    from dmd_dar.image_io import from_uint8_nhwc

    shards = out / SHARDS_DIR
    missing = [_shard(k) for k in range(n_shards) if not (shards / _shard(k)).is_file()]
    if missing:
        raise UserError(f"{shards}: {len(missing)} shard(s) missing ({', '.join(missing[:3])}); run the same command again "
                        "to make them (the others are kept)")
    with np.load(shards / _shard(0)) as first:
        shape, dtype = first["arr_0"].shape[1:], first["arr_0"].dtype
    n = meta["n"]
    staging = shards / "merged.npy"
    images = np.lib.format.open_memmap(staging, mode="w+", dtype=dtype, shape=(n, *shape))
    labels = np.empty(n, dtype=np.int64)
    for k in range(n_shards):
        with np.load(shards / _shard(k)) as part:
            start = int(part["start"])
            images[start : start + len(part["arr_0"])] = part["arr_0"]
            labels[start : start + len(part["arr_1"])] = part["arr_1"]
    images.flush()
    save_image_grid(from_uint8_nhwc(np.ascontiguousarray(images[:GRID_IMAGES])), out / GRID_FILE, nrow=8,
                    scale=max(1, 64 // shape[0]))
    write_json(out / META_FILE, {**{k: v for k, v in meta.items() if k not in ("shard_size", "batch_size")}, "n": n,
                                 "shape": [shape[2], shape[0], shape[1]]})
    atomic_write(out / SAMPLES_FILE, lambda tmp: np.savez(tmp, arr_0=images, arr_1=labels))  # streamed in chunks
    del images
    shutil.rmtree(shards)
    return out
