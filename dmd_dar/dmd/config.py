"""The typed schema of a distillation run (`configs/default.yaml` and the recipes), validated when built."""
from __future__ import annotations

from dataclasses import dataclass, field

from dmd_dar.config import check_time_limit, require_positive
from dmd_dar.diffusion import SAMPLERS, check_timesteps
from dmd_dar.errors import ConfigError
from dmd_dar.routing import RoutingConfig
from dmd_dar.t2i import T2IConfig
from dmd_dar.training import OptimConfig, mixed_precision_value

BACKBONES = ("dit", "diffusers")
# Metrics the monitor can select the exported student by, and whether higher is better.
QUALITY_METRICS = {"fd": False, "fid": False, "kid": False, "accuracy": True, "precision": True, "recall": True}
SELECTABLE = {**QUALITY_METRICS, "hf_ratio_vs_teacher": True}


@dataclass
class StudentConfig:
    routing: RoutingConfig = field(default_factory=lambda: RoutingConfig(mode="dar", query="static_t"))
    timesteps: list[float] = field(default_factory=lambda: [1.0])  # K-step: e.g. [1.0, 0.75, 0.5, 0.25]
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-6, beta1=0.0, beta2=0.999, grad_clip=10.0))
    ema_decay: float = 0.0  # 0 = no EMA
    router_lr_scale: float = 1.0  # the router's own parameters (queries, key norms, t map) learn at lr x this
    lora_rank: int = 0  # > 0: LoRA (peft) on attention/MLP projections; the router stays fully trainable
    gradient_checkpointing: bool = False
    init: str | None = None  # start from these weights (a DiT folder, e.g. an earlier student), not the teacher's

    def __post_init__(self):
        try:
            check_timesteps(self.timesteps, start=1.0)
        except ValueError as err:
            raise ConfigError(f"student.{err}") from None
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"student.ema_decay={self.ema_decay} must be in [0, 1)")
        if not self.router_lr_scale > 0:
            raise ConfigError(f"student.router_lr_scale={self.router_lr_scale} must be > 0")


@dataclass
class FakeConfig:
    routing: RoutingConfig = field(default_factory=RoutingConfig)  # residual by default
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-6, beta1=0.0, beta2=0.999, grad_clip=10.0))
    updates_per_student_step: int = 5
    lora_rank: int = 0

    def __post_init__(self):
        if self.updates_per_student_step < 1:
            raise ConfigError("fake.updates_per_student_step must be >= 1 (the fake score must follow the student)")


@dataclass
class DMConfig:
    guidance_scale: float = 2.0  # CFG of the real score (the teacher)
    t_min: float = 0.02
    t_max: float = 0.98
    shift: float = 1.0  # > 1 moves the DM-loss t towards noise within [t_min, t_max] (SD3-style shift)

    def __post_init__(self):
        if not 0 <= self.t_min < self.t_max <= 1:
            raise ConfigError(f"dm.t_min={self.t_min}, dm.t_max={self.t_max}: need 0 <= t_min < t_max <= 1")
        if not self.shift > 0:
            raise ConfigError(f"dm.shift={self.shift} must be > 0")


# pooled: one logit per image, from the mean of the fake score's last hidden tokens; tokens: one logit per token
# (patch), the loss averaged over them, so the generator gets a signal where a patch looks wrong (e.g. speckle)
GAN_HEADS = ("pooled", "tokens")


@dataclass
class GanConfig:
    enabled: bool = False
    weight: float = 3e-3  # generator weight (DMD2 stage 2)
    discriminator_weight: float = 1.0  # DMD2's scripts use 1e-2 (cls_loss_weight / guidance_cls_loss_weight)
    dataset: str = "mnist"  # real images for the discriminator (the head reads the fake score's features)
    # DMD2's second stage in one run: the GAN terms (discriminator and generator) join after this many DM-only
    # student updates; 0 = from the first update
    start_step: int = 0
    head: str = "pooled"  # GAN_HEADS
    # the times at which the discriminator compares noised real and generated samples, uniform in [t_min, t_max];
    # t_max null: the DM loss's own t (DMD2). Detail is visible only near the data: a head on the frozen teacher's
    # features tells the main job's one-step student from real digits 66% of the time at t in [0.02, 0.98], 84% at
    # [0, 0.3] (eval/experiments/gan_probe.py, docs/distillation.md)
    t_min: float = 0.0
    t_max: float | None = None
    # the head's learning rate = fake.optim.lr x this, in its own optimiser group (the fake score's backbone keeps
    # fake.optim.lr): a fresh head on a slowly moving backbone
    head_lr_scale: float = 1.0

    def __post_init__(self):
        if self.t_max is not None and not 0 <= self.t_min < self.t_max <= 1:
            raise ConfigError(f"gan.t_min={self.t_min}, gan.t_max={self.t_max}: need 0 <= t_min < t_max <= 1 "
                              "(or gan.t_max=null: the DM loss's t)")
        if not self.head_lr_scale > 0:
            raise ConfigError(f"gan.head_lr_scale={self.head_lr_scale} must be > 0")
        if self.head not in GAN_HEADS:
            raise ConfigError(f"gan.head={self.head!r} is unknown; use one of {', '.join(GAN_HEADS)}")
        if self.start_step < 0:
            raise ConfigError(f"gan.start_step={self.start_step} must be >= 0 (0 = the GAN term from the first step)")


REGRESSION_DISTANCES = ("lpips", "mse")


@dataclass
class RegressionConfig:
    enabled: bool = False
    pairs: str | None = None  # .npz from scripts/make_regression_pairs.py (noise, ids, samples)
    weight: float = 0.25
    # lpips: DMD v1's distance (its backbone needs ImageNet weights, docs/regression.md); mse: mean squared pixel
    # difference, which needs no weights (offline machines)
    distance: str = "lpips"
    net: str = "vgg"  # LPIPS backbone (distance lpips only)
    pretrained_backbone: bool = True  # False only for offline tests (random backbone)

    def __post_init__(self):
        if self.distance not in REGRESSION_DISTANCES:
            raise ConfigError(f"regression.distance={self.distance!r} is unknown; use one of {', '.join(REGRESSION_DISTANCES)}")


@dataclass
class EvalConfig:
    grid_images: int = 40
    teacher_sampler: str = "heun"
    teacher_steps: int = 25
    report_samples: int = 1000  # 0: no spectral report at the end
    reference: str = "mnist"  # real held-out images for the report ("" = teacher samples as reference)
    # the training monitor (dmd_dar/dmd/monitor.py): every `every` steps, on a fixed batch of `batch` noises
    every: int = 50
    batch: int = 64
    quality: bool = True  # classifier FD / accuracy / precision / recall on the batch (KID where no classifier applies)
    select: str = ""  # metric that picks the exported student ("" = the last one), e.g. fd, kid, accuracy, recall
    # folder of the teacher's evaluation samples, keyed by a hash of the teacher's weights, sampler, guidance and
    # noises ("" = sample them every run); runs of one seed (the arms of an experiment) then sample the teacher once
    teacher_cache: str = ""

    def __post_init__(self):
        if self.teacher_sampler not in SAMPLERS:
            raise ConfigError(f"eval.teacher_sampler={self.teacher_sampler!r} is not one of {', '.join(SAMPLERS)}")
        if self.select and self.select not in SELECTABLE:
            raise ConfigError(f"eval.select={self.select!r} is not one of {', '.join(SELECTABLE)} (or '' for the last student)")
        if self.select in QUALITY_METRICS and not self.quality:
            raise ConfigError(f"eval.select={self.select} needs eval.quality=true")
        require_positive(self, "grid_images", "teacher_steps", "every", "batch", prefix="eval.")
        if self.report_samples < 0:
            raise ConfigError(f"eval.report_samples={self.report_samples} must be >= 0")


@dataclass
class DistillConfig:
    seed: int = 0
    out_dir: str = "runs/distill"
    backbone: str = "dit"  # "dit" (our DiT) or "diffusers" (text-to-image transformers, see the t2i section)
    teacher: str = "bundled"  # dit: a DiT folder or "bundled" (dmd_dar/assets/teacher); diffusers: hub id or path
    # dit, latent teachers (imported SiT / REPA): the VAE that decodes samples for grids, reports and metrics; "" = the
    # one the teacher folder records, else a hub id, a local folder or "tiny" (random, tests); "none" = latent preview
    vae: str = ""
    arms: list[str] = field(default_factory=list)  # [] = one arm as student.routing says; or [dar, residual]
    steps: int = 1000  # student updates
    batch_size: int = 32  # global
    mixed_precision: str = "no"
    log_every: int = 10
    sample_every: int = 200
    checkpoint_every: int = 200
    keep_last: int = 2
    resume: bool = True
    max_bad_steps: int = 5  # consecutive non-finite steps before stopping (the last good checkpoint stays)
    # wall-clock budget of the job, from its start: training stops (with a checkpoint) after the first step past it,
    # then the student is exported and reported as usual; the same command resumes to `steps`. 0 = no limit
    time_limit_min: float = 0.0
    student: StudentConfig = field(default_factory=StudentConfig)
    fake: FakeConfig = field(default_factory=FakeConfig)
    dm: DMConfig = field(default_factory=DMConfig)
    gan: GanConfig = field(default_factory=GanConfig)
    regression: RegressionConfig = field(default_factory=RegressionConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    t2i: T2IConfig = field(default_factory=T2IConfig)

    def __post_init__(self):
        self.mixed_precision = mixed_precision_value(self.mixed_precision)
        if self.backbone not in BACKBONES:
            raise ConfigError(f"backbone={self.backbone!r} is not one of {', '.join(BACKBONES)}")
        require_positive(self, "steps", "batch_size", "log_every", "sample_every", "checkpoint_every", "max_bad_steps")
        if self.keep_last < 0:
            raise ConfigError(f"keep_last={self.keep_last} must be >= 0 (0 keeps every checkpoint)")
        check_time_limit(self.time_limit_min)
        if self.vae and self.backbone != "dit":
            raise ConfigError("vae is for DiT teachers; a diffusers teacher's VAE is t2i.vae")
        if self.gan.enabled and self.backbone != "dit":
            raise ConfigError("gan.enabled is supported for DiT teachers only (the discriminator needs real images)")
        if self.gan.enabled and self.gan.start_step >= self.steps:
            raise ConfigError(f"gan.start_step={self.gan.start_step} is not below steps={self.steps}: the GAN term would never "
                              "run; lower it or raise steps")
        for arm in self.arms:
            if arm not in ("dar", "residual"):
                raise ConfigError(f"arms entry {arm!r} is not 'dar' or 'residual'")
        if len(set(self.arms)) != len(self.arms):
            raise ConfigError(f"arms={self.arms} lists an arm twice")

    def arm_routings(self) -> dict[str, RoutingConfig]:
        """The student routing of each arm: one arm as student.routing says, or each of `arms`."""
        if not self.arms:
            return {self.student.routing.mode: self.student.routing}
        return {arm: self.student.routing.replace(mode=arm) for arm in self.arms}
