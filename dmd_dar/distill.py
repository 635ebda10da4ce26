"""DMD/DMD2 distillation of a one- or K-step student (DAR or residual routing) from a DiT teacher.

Entry point: `scripts/distill.py --config configs/<name>.yaml [key=value ...]`. One run distills one arm
(the student's routing as configured) or, with `arms: [dar, residual]`, both arms from the same teacher
with the same seeds and data order, and ends with one comparative spectral report.

Per student update (two time scales): `fake.updates_per_student_step` fake-score updates on fresh detached
student samples, then one student update with the distribution-matching loss (+ optional GAN and
regression terms). Every random draw is a function of (seed, step, stream), drawn for the global batch and
sliced per process, so resume and multi-process runs reproduce the single-process run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import torch
from torch import nn
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from dmd_dar.checkpoint import load_model_files, read_json, save_model, write_json
from dmd_dar.config import save_config
from dmd_dar.diffusion import interpolate, shift_time
from dmd_dar.dmd import distribution_matching_loss, gan_discriminator_loss, gan_generator_loss, generate
from dmd_dar.errors import UserError
from dmd_dar.families import Family, make_family
from dmd_dar.grid import save_image_grid
from dmd_dar.routing import RoutingConfig
from dmd_dar.t2i import T2IConfig
from dmd_dar.training import (
    mixed_precision_value,
    EMA, CSVLogger, OptimConfig, all_finite, batch_indices, global_grad_norm, latest_checkpoint,
    load_run_checkpoint, local_slice, make_optimizer, save_run_checkpoint, step_generator,
)


# ------------------------------------------------------------------------------------------- config
@dataclass
class StudentConfig:
    routing: RoutingConfig = field(default_factory=lambda: RoutingConfig(mode="dar", query="static_t"))
    timesteps: List[float] = field(default_factory=lambda: [1.0])  # K-step: e.g. [1.0, 0.75, 0.5, 0.25]
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-6, beta1=0.0, beta2=0.999, grad_clip=10.0))
    ema_decay: float = 0.0  # 0 = no EMA
    lora_rank: int = 0  # > 0: LoRA (peft) on attention/MLP projections; the router stays fully trainable
    gradient_checkpointing: bool = False
    init: Optional[str] = None  # start from these weights (a DiT folder, e.g. an earlier student), not the teacher's


@dataclass
class FakeConfig:
    routing: RoutingConfig = field(default_factory=RoutingConfig)  # residual by default
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-6, beta1=0.0, beta2=0.999, grad_clip=10.0))
    updates_per_student_step: int = 5
    lora_rank: int = 0


@dataclass
class DMConfig:
    guidance_scale: float = 2.0  # CFG of the real score (the teacher)
    t_min: float = 0.02
    t_max: float = 0.98
    shift: float = 1.0  # > 1 moves the DM-loss t towards noise (SD3-style shift)


@dataclass
class GanConfig:
    enabled: bool = False
    weight: float = 3e-3  # generator weight (DMD2 stage 2)
    discriminator_weight: float = 1.0
    dataset: str = "mnist"  # real images for the discriminator


@dataclass
class RegressionConfig:
    enabled: bool = False
    pairs: Optional[str] = None  # .npz from scripts/make_regression_pairs.py (noise, ids, samples)
    weight: float = 0.25
    net: str = "vgg"  # LPIPS backbone
    pretrained_backbone: bool = True  # False only for offline tests (random backbone)


@dataclass
class EvalConfig:
    grid_images: int = 40
    teacher_sampler: str = "heun"
    teacher_steps: int = 25
    report_samples: int = 1000  # 0: no spectral report at the end
    reference: str = "mnist"  # real held-out images for the report ("" = teacher samples as reference)
    hf_every: int = 50
    hf_batch: int = 64


@dataclass
class DistillConfig:
    seed: int = 0
    out_dir: str = "runs/distill"
    family: str = "dit"  # "dit" (our DiT) or "diffusers" (text-to-image transformers, see the t2i section)
    teacher: str = "bundled"  # dit: a DiT folder or "bundled" (dmd_dar/assets/teacher); diffusers: hub id or path
    arms: List[str] = field(default_factory=list)  # [] = one arm as student.routing says; or [dar, residual]
    steps: int = 1000  # student updates
    batch_size: int = 32  # global
    mixed_precision: str = "no"
    log_every: int = 10
    sample_every: int = 200
    checkpoint_every: int = 200
    keep_last: int = 2
    resume: bool = True
    max_bad_steps: int = 5  # consecutive non-finite steps before stopping (the last good checkpoint stays)
    student: StudentConfig = field(default_factory=StudentConfig)
    fake: FakeConfig = field(default_factory=FakeConfig)
    dm: DMConfig = field(default_factory=DMConfig)
    gan: GanConfig = field(default_factory=GanConfig)
    regression: RegressionConfig = field(default_factory=RegressionConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    t2i: T2IConfig = field(default_factory=T2IConfig)

    def __post_init__(self):
        self.mixed_precision = mixed_precision_value(self.mixed_precision)


class TrainingDiverged(UserError):
    pass


# ------------------------------------------------------------------------------------------- networks
class FakeScore:
    """The fake score as the ScoreModel protocol of dmd.py, plus DMD2's discriminator head on its hidden
    features. `model` and `head` may be DDP-wrapped: every call goes through their forward, so gradients
    synchronise across processes."""

    def __init__(self, family: Family, model: nn.Module, head: nn.Module | None = None):
        self.family, self.model, self.head = family, model, head

    def __call__(self, x_t, t, cond):
        return self.family.denoiser(self.model)(x_t, t, cond)

    def denoising_loss(self, x0, noise, t, cond):
        return self.family.denoising_loss(self.model, x0, noise, t, cond)

    def gan_logits(self, x_t, t, cond):
        return self.head(self.family.hidden_features(self.model, x_t, t, cond)).squeeze(-1)


def make_gan_head(dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))


# ------------------------------------------------------------------------------------------- draws
@dataclass
class Draw:
    """Everything random in one batch of generator samples, drawn for the global batch (then sliced)."""

    noise: torch.Tensor
    ids: torch.Tensor  # condition ids (class labels or prompt indices)
    train_step: int  # backward simulation: the student step that carries the gradient
    renoise: torch.Tensor  # [K-1, B, ...] noises between student steps
    t: torch.Tensor  # DM / fake-loss time
    t_noise: torch.Tensor

    def local(self, sl: slice, device) -> "Draw":
        return Draw(self.noise[sl].to(device), self.ids[sl], self.train_step, self.renoise[:, sl].to(device),
                    self.t[sl].to(device), self.t_noise[sl].to(device))


def draw(cfg: DistillConfig, shape, num_conditions: int, g: torch.Generator) -> Draw:
    n, K = cfg.batch_size, len(cfg.student.timesteps)
    noise = torch.randn((n, *shape), generator=g)
    ids = torch.randint(0, num_conditions, (n,), generator=g)
    train_step = int(torch.randint(0, K, (1,), generator=g))
    renoise = torch.randn((K - 1, n, *shape), generator=g)
    u = torch.rand(n, generator=g)
    t = shift_time(cfg.dm.t_min + (cfg.dm.t_max - cfg.dm.t_min) * u, cfg.dm.shift)
    return Draw(noise, ids, train_step, renoise, t, torch.randn((n, *shape), generator=g))


# ------------------------------------------------------------------------------------------- one arm
def distill_arm(cfg: DistillConfig, family: Family, routing: RoutingConfig, run_dir: Path, accelerator, fixed: dict) -> Path:
    """Distill one student; returns its exported model folder (run_dir/student)."""
    device = accelerator.device
    sl = local_slice(cfg.batch_size, accelerator.process_index, accelerator.num_processes)
    shape, timesteps = family.sample_shape, cfg.student.timesteps

    torch.manual_seed(cfg.seed)  # model init (and GAN head) are the only draws from the global RNG
    student = family.trainable(routing, cfg.student.lora_rank)
    if cfg.student.init:
        family.load_weights(student, Path(cfg.student.init))
    student.gradient_checkpointing = cfg.student.gradient_checkpointing
    fake_model = family.trainable(cfg.fake.routing, cfg.fake.lora_rank)
    head = make_gan_head(family.feature_dim) if cfg.gan.enabled else None
    student_params = [p for p in student.parameters() if p.requires_grad]
    fake_params = [p for p in fake_model.parameters() if p.requires_grad] + (list(head.parameters()) if head else [])
    student_opt = make_optimizer(student_params, cfg.student.optim)
    fake_opt = make_optimizer(fake_params, cfg.fake.optim)
    if cfg.student.ema_decay > 0 and accelerator.distributed_type == DistributedType.FSDP:
        raise UserError("student.ema_decay > 0 is not supported under FSDP (the EMA copy would not be sharded); set 0")
    ema = EMA(student, cfg.student.ema_decay) if cfg.student.ema_decay > 0 else None

    start_step, bad_steps, skipped = 0, 0, 0
    ckpt = latest_checkpoint(run_dir) if cfg.resume else None
    if ckpt is not None:
        meta, state = load_run_checkpoint(ckpt)
        for name, module in (("student", student), ("fake", fake_model), ("gan_head", head), ("student_ema", ema and ema.model)):
            if module is not None:
                module.load_state_dict(load_model_files(ckpt / name).state_dict)
        student_opt.load_state_dict(state["student_opt"])
        fake_opt.load_state_dict(state["fake_opt"])
        start_step, skipped = int(meta["step"]), int(meta.get("skipped_steps", 0))
        if ema is not None:
            ema.num_updates = start_step - skipped
        accelerator.print(f"resuming {run_dir} from step {start_step}")

    real_images = None
    if cfg.gan.enabled:
        if cfg.family != "dit":
            raise UserError("gan.enabled is supported for DiT teachers only (the discriminator needs real images)")
        from dmd_dar.data import load_dataset

        real_images = load_dataset(cfg.gan.dataset, split="train").images
    regression = None
    if cfg.regression.enabled:
        from dmd_dar.regression import RegressionLoss

        regression = RegressionLoss.from_config(cfg.regression, family, device, batch_size=cfg.batch_size, seed=cfg.seed)

    student, fake_model, student_opt, fake_opt = accelerator.prepare(student, fake_model, student_opt, fake_opt)
    if head is not None:
        head = accelerator.prepare(head)
    raw_student, raw_fake = accelerator.unwrap_model(student), accelerator.unwrap_model(fake_model)
    raw_head = accelerator.unwrap_model(head) if head is not None else None
    if ema is not None:
        ema.model.to(device)
    fake = FakeScore(family, fake_model, head)
    real_score = family.real_score(family.teacher(), cfg.dm.guidance_scale)
    student_x0 = family.denoiser(student)

    run_dir.mkdir(parents=True, exist_ok=True)
    logger = CSVLogger(run_dir / "log.csv", resume_step=start_step) if accelerator.is_main_process else None

    def save_checkpoint(step: int) -> None:
        # get_state_dict gathers full weights on every process (needed under FSDP); the main process writes
        parts = {"student": student, "fake": fake_model, "gan_head": head}
        states = {name: accelerator.get_state_dict(m) for name, m in parts.items() if m is not None}
        if ema is not None:
            states["student_ema"] = ema.model.state_dict()
        if accelerator.is_main_process:
            models = {name: (lambda folder, sd=sd: save_model(folder, {"class": name}, sd)) for name, sd in states.items()}
            save_run_checkpoint(run_dir, step, models,
                                trainer_state={"student_opt": student_opt.state_dict(), "fake_opt": fake_opt.state_dict()},
                                meta={"skipped_steps": skipped, "routing": routing.to_dict()}, keep_last=cfg.keep_last)
        accelerator.wait_for_everyone()

    def finite_everywhere(*values) -> bool:
        flag = torch.tensor([1.0 if all_finite(*values) else 0.0], device=device)
        return bool(accelerator.gather(flag).min() > 0)

    def update(loss, params, opt, clip) -> tuple[bool, float]:
        """One optimiser step, skipped (on every process) when the loss or the gradient is not finite."""
        opt.zero_grad(set_to_none=True)
        if not finite_everywhere(loss.detach()):
            return False, float("nan")
        accelerator.backward(loss)
        if clip > 0:
            accelerator.clip_grad_norm_(params, clip)
        norm = global_grad_norm(params)
        if not finite_everywhere(torch.tensor(norm)):
            opt.zero_grad(set_to_none=True)
            return False, norm
        opt.step()
        return True, norm

    t0 = time.time()
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc=f"distill[{run_dir.name}]",
               disable=not accelerator.is_main_process)
    for step in bar:
        logs: dict[str, float] = {}
        ok = True
        # ---- fake score (and discriminator) updates on detached student samples
        for j in range(cfg.fake.updates_per_student_step):
            d = draw(cfg, shape, family.num_conditions, step_generator(cfg.seed, step, stream=1 + j)).local(sl, device)
            cond = family.conditions(d.ids)
            with torch.no_grad(), accelerator.autocast():
                x = generate(student_x0, d.noise, cond, timesteps, train_step=d.train_step, renoise=d.renoise)
            with accelerator.autocast():
                fake_loss = fake.denoising_loss(x.detach(), d.t_noise, d.t, cond)
                if head is not None:
                    idx = batch_indices(step * cfg.fake.updates_per_student_step + j, cfg.batch_size, len(real_images), cfg.seed)[sl]
                    real_t = interpolate(real_images[idx].to(device), d.t_noise, d.t)
                    d_loss = gan_discriminator_loss(fake.gan_logits(real_t, d.t, cond),
                                                    fake.gan_logits(interpolate(x, d.t_noise, d.t), d.t, cond))
                    logs["disc_loss"] = d_loss.item()
                    fake_loss = fake_loss + cfg.gan.discriminator_weight * d_loss
            good, fake_norm = update(fake_loss, fake_params, fake_opt, cfg.fake.optim.grad_clip)
            ok &= good
            logs.update(fake_loss=fake_loss.item(), fake_grad_norm=fake_norm)
        # ---- student update: distribution matching (+ GAN, + regression)
        d = draw(cfg, shape, family.num_conditions, step_generator(cfg.seed, step, stream=0)).local(sl, device)
        cond = family.conditions(d.ids)
        with accelerator.autocast():
            x = generate(student_x0, d.noise, cond, timesteps, train_step=d.train_step, renoise=d.renoise)
            with torch.no_grad():
                x_t = interpolate(x.detach(), d.t_noise, d.t)
                real_x0, fake_x0 = real_score(x_t, d.t, cond), family.denoiser(raw_fake)(x_t, d.t, cond)
            loss = distribution_matching_loss(x, real_x0, fake_x0)
            logs["dm_loss"] = loss.item()
            if raw_head is not None:
                g_loss = gan_generator_loss(FakeScore(family, raw_fake, raw_head).gan_logits(interpolate(x, d.t_noise, d.t), d.t, cond))
                logs["gan_loss"] = g_loss.item()
                loss = loss + cfg.gan.weight * g_loss
            if regression is not None:
                r_loss = regression(student_x0, step, sl)
                logs["regression_loss"] = r_loss.item()
                loss = loss + cfg.regression.weight * r_loss
        good, student_norm = update(loss, student_params, student_opt, cfg.student.optim.grad_clip)
        ok &= good
        logs["student_grad_norm"] = student_norm
        if not ok:
            bad_steps, skipped = bad_steps + 1, skipped + 1
            accelerator.print(f"step {step + 1}: non-finite loss or gradient, update skipped ({bad_steps} in a row)")
            if bad_steps >= cfg.max_bad_steps:
                raise TrainingDiverged(
                    f"{bad_steps} non-finite steps in a row at step {step + 1}; stopped. Last good checkpoint: "
                    f"{latest_checkpoint(run_dir) or 'none'}. Lower student.optim.lr / fake.optim.lr or check the teacher")
            continue
        bad_steps = 0
        if ema is not None:
            ema.update(raw_student)
        done = step + 1
        if accelerator.is_main_process and (done % cfg.eval.hf_every == 0 or done == cfg.steps):
            logs.update(student_detail_metrics(family, raw_student, fixed, timesteps))
        if done % cfg.log_every == 0 or done == cfg.steps:
            logs.update(skipped_steps=skipped, elapsed_s=round(time.time() - t0, 2))
            accelerator.log({f"{run_dir.name}/{k}": v for k, v in logs.items()}, step=done)
            if logger:
                logger.log(done, logs)
            bar.set_postfix(dm=f"{logs['dm_loss']:.4g}", fake=f"{logs['fake_loss']:.4g}")
        if accelerator.is_main_process and (done % cfg.sample_every == 0 or done == cfg.steps):
            imgs = student_images(family, raw_student, fixed["noise"], fixed["ids"], timesteps)
            save_image_grid(imgs, run_dir / "samples" / f"step_{done:08d}.png", nrow=10, scale=2)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(done)

    final = run_dir / "student"
    export_state = ema.model.state_dict() if ema is not None else accelerator.get_state_dict(student)
    if accelerator.is_main_process:
        if accelerator.distributed_type == DistributedType.FSDP:  # raw_student holds shards: rebuild it whole
            raw_student = family.trainable(routing, cfg.student.lora_rank)
            raw_student.load_state_dict(export_state)
        family.export(ema.model if ema is not None else raw_student, final)
        write_json(run_dir / "summary.json", {"steps": cfg.steps, "skipped_steps": skipped,
                                              "train_seconds": round(time.time() - t0, 1), "routing": routing.to_dict()})
    accelerator.wait_for_everyone()
    return final


# ------------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def student_images(family: Family, student: nn.Module, noise: torch.Tensor, ids: torch.Tensor, timesteps, batch: int | None = None) -> torch.Tensor:
    """Student samples in len(timesteps) steps (renoising noise seeded, so repeatable), as images in [-1, 1]."""
    batch = batch or getattr(family, "sample_batch_size", 256)  # large T2I models sample a few at a time
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    g = torch.Generator().manual_seed(12345)
    out = []
    for i in range(0, len(noise), batch):
        n = noise[i : i + batch].to(device)
        renoise = torch.randn((len(timesteps) - 1, *n.shape), generator=g).to(device)
        x = generate(family.denoiser(student), n, family.conditions(ids[i : i + batch]), timesteps, renoise=renoise)
        out.append(family.to_images(x).float().cpu())
    student.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def teacher_images(family: Family, cfg: DistillConfig, noise: torch.Tensor, ids: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    device = family.device
    batch = batch or getattr(family, "sample_batch_size", 250)
    return torch.cat([family.to_images(family.teacher_sample(
        family.teacher(), noise[i : i + batch].to(device), ids[i : i + batch], cfg.eval.teacher_sampler,
        cfg.eval.teacher_steps, cfg.dm.guidance_scale)).float().cpu() for i in range(0, len(noise), batch)])


def student_detail_metrics(family: Family, student: nn.Module, fixed: dict, timesteps) -> dict[str, float]:
    """The student's high-frequency share on the fixed noise batch, and that share over the teacher's."""
    from dmd_dar.spectral import high_frequency_ratio

    ratio = high_frequency_ratio(student_images(family, student, fixed["hf_noise"], fixed["hf_ids"], timesteps))
    return {"student_hf_ratio": ratio, "student_hf_ratio_vs_teacher": ratio / max(fixed["teacher_hf_ratio"], 1e-12)}


# ------------------------------------------------------------------------------------------- the job
def arm_routings(cfg: DistillConfig) -> dict[str, RoutingConfig]:
    if not cfg.arms:
        return {cfg.student.routing.mode: cfg.student.routing}
    out = {}
    for arm in cfg.arms:
        if arm not in ("dar", "residual"):
            raise UserError(f"arms entry {arm!r} is not 'dar' or 'residual'")
        if arm in out:
            raise UserError(f"arms lists {arm!r} twice")
        out[arm] = cfg.student.routing.replace(mode=arm)
    return out


def check_config(cfg: DistillConfig) -> None:
    ts = cfg.student.timesteps
    if not ts or ts[0] != 1.0 or any(b >= a for a, b in zip(ts, ts[1:])) or ts[-1] <= 0:
        raise UserError(f"student.timesteps={ts} must start at 1.0 and decrease strictly, staying above 0")
    if not 0 <= cfg.dm.t_min < cfg.dm.t_max <= 1:
        raise UserError(f"dm.t_min={cfg.dm.t_min}, dm.t_max={cfg.dm.t_max}: need 0 <= t_min < t_max <= 1")
    if cfg.fake.updates_per_student_step < 1:
        raise UserError("fake.updates_per_student_step must be >= 1 (the fake score must follow the student)")


def run_distillation(cfg: DistillConfig) -> dict[str, Any]:
    """The main job: distill each arm, then grids, samples and the spectral report. Returns the summary."""
    from accelerate import Accelerator

    check_config(cfg)
    routings = arm_routings(cfg)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, log_with="tensorboard", project_dir=cfg.out_dir)
    family = make_family(cfg.family, cfg.teacher, accelerator.device, cfg.t2i)
    for name, routing in routings.items():
        if not routing.function_preserving:
            accelerator.print(f"note: arm {name} uses chunk_size={routing.chunk_size} with summary='last': the student "
                              "does not start as the teacher's function (summary='sum' does)")
    out = Path(cfg.out_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        accelerator.init_trackers("tb")

    t0 = time.time()
    g = step_generator(cfg.seed, 0, stream=1000)
    n_grid, n_hf = cfg.eval.grid_images, cfg.eval.hf_batch
    ids = lambda n: torch.arange(n) % family.num_conditions  # noqa: E731  (every class/prompt in turn)
    fixed = {"noise": torch.randn((n_grid, *family.sample_shape), generator=g), "ids": ids(n_grid),
             "hf_noise": torch.randn((n_hf, *family.sample_shape), generator=g), "hf_ids": ids(n_hf)}
    from dmd_dar.spectral import high_frequency_ratio

    teacher_grid = teacher_images(family, cfg, fixed["noise"], fixed["ids"])
    fixed["teacher_hf_ratio"] = high_frequency_ratio(teacher_images(family, cfg, fixed["hf_noise"], fixed["hf_ids"]))
    if accelerator.is_main_process:
        save_image_grid(teacher_grid, out / "teacher_grid.png", nrow=10, scale=2)

    students = {name: distill_arm(cfg, family, routing, out / name, accelerator, fixed) for name, routing in routings.items()}
    summary: dict[str, Any] = {"teacher": cfg.teacher, "arms": {}}
    if accelerator.is_main_process:
        grids = {"teacher": teacher_grid}
        for name, folder in students.items():
            grids[name] = student_images(family, family.load_student(folder), fixed["noise"], fixed["ids"], cfg.student.timesteps)
            save_image_grid(grids[name], out / name / "student_grid.png", nrow=10, scale=2)
            summary["arms"][name] = {"student": str(folder), **read_json(out / name / "summary.json")}
        save_comparison(grids, out / "comparison.png", per_row=10)
        if cfg.eval.report_samples > 0:
            summary["report"] = write_detail_report(cfg, family, students, out)
        summary["seconds"] = round(time.time() - t0, 1)
        write_json(out / "summary.json", summary)
    accelerator.end_training()
    return summary


def save_comparison(grids: dict[str, torch.Tensor], path: Path, per_row: int) -> None:
    """The teacher's grid above each student's, same noises and labels (rows named in comparison.json)."""
    rows = torch.cat([g[: per_row * (len(g) // per_row)] for g in grids.values()])
    save_image_grid(rows, path, nrow=per_row, scale=3)
    write_json(path.with_suffix(".json"), {"rows_per_set": {n: len(g) // per_row for n, g in grids.items()},
                                           "order": list(grids)})


def write_detail_report(cfg: DistillConfig, family: Family, students: dict[str, Path], out: Path) -> dict[str, Any]:
    """Sample `eval.report_samples` images from the teacher (multi-step) and each student with the same noises
    and conditions, save them as .npz, and write the spectral report against real held-out data."""
    from dmd_dar.image_io import save_images
    from dmd_dar.spectral_report import write_report

    n, K = cfg.eval.report_samples, len(cfg.student.timesteps)
    g = step_generator(cfg.seed, 0, stream=2000)
    noise, ids = torch.randn((n, *family.sample_shape), generator=g), torch.arange(n) % family.num_conditions
    sets = {f"teacher_{cfg.eval.teacher_steps}step": teacher_images(family, cfg, noise, ids)}
    for name, folder in students.items():
        sets[f"student_{name}_{K}step"] = student_images(family, family.load_student(folder), noise, ids, cfg.student.timesteps)
    for name, imgs in sets.items():
        save_images(imgs, out / "samples" / f"{name}.npz")
    if cfg.eval.reference:
        from dmd_dar.data import load_dataset

        reference, ref_name = load_dataset(cfg.eval.reference, split="heldout").images[:n], f"real_{cfg.eval.reference}"
    else:
        ref_name = next(iter(sets))
        reference = sets.pop(ref_name)
    write_report(reference, sets, out / "report", reference_name=ref_name,
                 title=f"Spectral detail: teacher ({cfg.eval.teacher_steps}-step) vs {K}-step students")
    return {"dir": str(out / "report"), "samples": n, "reference": ref_name}
