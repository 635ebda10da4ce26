"""The distillation job: build the networks of each arm, run the DMD method in the shared loop, export the
student, then grids, samples and the spectral report.

Entry point: `scripts/distill.py --config configs/<name>.yaml [key=value ...]`. One run distills one arm (the
student's routing as configured) or, with `arms: [dar, residual]`, both arms from the same teacher with the
same seeds and data order, and ends with one comparative spectral report.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file
from torch import nn

from dmd_dar.checkpoint import atomic_write, check_output_dir, hub_offline, read_json, run_lock, save_model, write_json
from dmd_dar.config import save_config, to_dict
from dmd_dar.data import DATASET_NAMES, LATENTS_INDEX, load_dataset
from dmd_dar.diffusion import few_step_sample
from dmd_dar.dmd.config import DistillConfig
from dmd_dar.dmd.family import Family, make_family
from dmd_dar.dmd.method import DMD, FakeScore, Optimised, make_gan_head
from dmd_dar.dmd.monitor import Best, Monitor, plot_monitor
from dmd_dar.errors import UserError
from dmd_dar.grid import save_image_grid
from dmd_dar.models.lora import ROUTER_PREFIXES
from dmd_dar.routing import RoutingConfig
from dmd_dar.training import (
    EMA,
    Cadence,
    Resumed,
    deadline_after,
    latest_checkpoint,
    load_run_checkpoint,
    local_slice,
    make_optimizer,
    resume_run,
    run_loop,
    save_run_checkpoint,
    step_generator,
)


@dataclass
class EvalBatch:
    """The fixed noises and conditions every arm is shown on: the grids, and the HF-ratio probe during training."""

    grid_noise: torch.Tensor
    grid_ids: torch.Tensor
    probe_noise: torch.Tensor
    probe_ids: torch.Tensor
    teacher_probe_images: torch.Tensor


RealSet = tuple[torch.Tensor, torch.Tensor | None]  # the GAN term's real images and condition ids (gan_real_data)


# ------------------------------------------------------------------------------------------- one arm
def distill_arm(cfg: DistillConfig, family: Family, routing: RoutingConfig, run_dir: Path, accelerator, fixed: EvalBatch,
                monitor: Monitor, deadline: float | None = None,
                real: RealSet | None = None) -> Path:
    """Distill one student; returns its exported model folder (run_dir/student). `real`: the GAN term's real
    images and labels (`gan_real_data`)."""
    device = accelerator.device
    torch.manual_seed(cfg.seed)  # model init (and GAN head) are the only draws from the global RNG
    student = family.trainable(routing, cfg.student.lora_rank)
    if cfg.student.init:
        family.load_weights(student, Path(cfg.student.init))
    student.gradient_checkpointing = cfg.student.gradient_checkpointing
    fake_model = family.trainable(cfg.fake.routing, cfg.fake.lora_rank)
    head = make_gan_head(family.feature_dim) if cfg.gan.enabled else None
    trained = [(name, p) for name, p in student.named_parameters() if p.requires_grad]
    student_params = [p for _, p in trained]
    fake_groups = [{"params": [p for p in fake_model.parameters() if p.requires_grad]}]
    if head is not None:
        fake_groups.append({"params": list(head.parameters()), "lr": cfg.fake.optim.lr * cfg.gan.head_lr_scale})
    router = [p for name, p in trained if name.startswith(ROUTER_PREFIXES)]
    others = [p for name, p in trained if not name.startswith(ROUTER_PREFIXES)]
    groups = [{"params": others}, {"params": router, "lr": cfg.student.optim.lr * cfg.student.router_lr_scale}]
    student_opt = make_optimizer([g for g in groups if g["params"]], cfg.student.optim)
    fake_opt = make_optimizer(fake_groups, cfg.fake.optim)
    if cfg.student.ema_decay > 0 and accelerator.distributed_type == DistributedType.FSDP:
        raise UserError("student.ema_decay > 0 is not supported under FSDP (the EMA copy would not be sharded); set 0")
    ema = EMA(student, cfg.student.ema_decay) if cfg.student.ema_decay > 0 else None

    modules = {"student": student, "fake": fake_model, "gan_head": head, "student_ema": ema and ema.model}
    resumed = resume_run(run_dir, modules, {"student_opt": student_opt, "fake_opt": fake_opt}) if cfg.resume else Resumed()
    if resumed.step:
        accelerator.print(f"resuming {run_dir} from step {resumed.step}")
    if ema is not None:
        ema.num_updates = resumed.step - resumed.skipped_steps

    real_images, real_labels = real if real is not None else (None, None)
    regression = None
    if cfg.regression.enabled:
        from dmd_dar.dmd.regression import RegressionLoss  # LPIPS weights are loaded only when asked for

        regression = RegressionLoss.from_config(cfg.regression, family, device, batch_size=cfg.batch_size, seed=cfg.seed)

    # One model with its optimiser per prepare call: FSDP2 takes no more (accelerate 1.15: "Only one model is supported
    # when using FSDP2") and swaps the parameters for sharded ones, so the lists are taken again afterwards.
    student, student_opt = accelerator.prepare(student, student_opt)
    fake_model, fake_opt = accelerator.prepare(fake_model, fake_opt)
    if head is not None:
        if accelerator.distributed_type == DistributedType.FSDP:
            raise UserError("gan.enabled is not supported under FSDP (the head shares the fake score's optimiser); set gan.enabled=false")
        head = accelerator.prepare(head)
    student_params = [p for p in student.parameters() if p.requires_grad]
    fake_params = [p for p in fake_model.parameters() if p.requires_grad] + (list(head.parameters()) if head else [])
    raw_student = accelerator.unwrap_model(student)
    if ema is not None:
        ema.model.to(device)
    unwrapped_head = accelerator.unwrap_model(head) if head is not None else None
    method = DMD(cfg, family, accelerator, student,
                 fake=FakeScore(family, fake_model, head, cfg.gan.head),
                 fake_unwrapped=FakeScore(family, accelerator.unwrap_model(fake_model), unwrapped_head, cfg.gan.head),
                 student_opt=Optimised(student_params, student_opt, cfg.student.optim.grad_clip),
                 fake_opt=Optimised(fake_params, fake_opt, cfg.fake.optim.grad_clip),
                 local=local_slice(cfg.batch_size, accelerator.process_index, accelerator.num_processes),
                 real_images=real_images, real_labels=real_labels, regression=regression)

    def save_checkpoint(step: int, skipped: int) -> None:
        # get_state_dict gathers full weights on every process (needed under FSDP); the main process writes
        parts = {"student": student, "fake": fake_model, "gan_head": head}
        states = {name: accelerator.get_state_dict(m) for name, m in parts.items() if m is not None}
        if ema is not None:
            states["student_ema"] = ema.model.state_dict()
        if accelerator.is_main_process:
            models = {name: (lambda folder, sd=sd, name=name: save_model(folder, {"slot": name}, sd)) for name, sd in states.items()}
            save_run_checkpoint(run_dir, step, models,
                                trainer_state={"student_opt": student_opt.state_dict(), "fake_opt": fake_opt.state_dict()},
                                meta={"skipped_steps": skipped, "routing": routing.to_dict()}, keep_last=cfg.keep_last)
        accelerator.wait_for_everyone()

    best_file, best_dir = run_dir / "best.json", run_dir / "best"
    best = Best(**read_json(best_file)) if cfg.eval.select and best_file.is_file() and resumed.step else None

    def evaluate(done: int) -> dict[str, float]:
        """The monitor on the model that would be exported (the EMA when there is one); keeps the best state."""
        nonlocal best
        exported = ema.model if ema is not None else raw_student
        metrics = monitor.measure(student_images(family, exported, fixed.probe_noise, fixed.probe_ids, cfg.student.timesteps))
        if (line := monitor.describe(done, metrics)) is not None:
            accelerator.print(line)
        if monitor.improves(metrics, best):
            best = Best(done, metrics[cfg.eval.select])
            family.export(exported, best_dir)
            write_json(best_file, {"step": best.step, "value": best.value})
        return metrics

    def sample(done: int) -> None:
        imgs = student_images(family, raw_student, fixed.grid_noise, fixed.grid_ids, cfg.student.timesteps)
        save_image_grid(imgs, run_dir / "samples" / f"step_{done:08d}.png", nrow=10, scale=2)

    run_dir.mkdir(parents=True, exist_ok=True)
    cadence = Cadence(cfg.steps, cfg.log_every, cfg.sample_every, cfg.checkpoint_every, eval_every=cfg.eval.every)
    skipped, seconds, reached = run_loop(accelerator, f"distill[{run_dir.name}]", run_dir, cadence, method.train_step,
                                         save_checkpoint, resumed, cfg.max_bad_steps, ema=ema, model=raw_student,
                                         evaluate=evaluate, sample=sample, progress=("dm_loss", "fake_loss"),
                                         log_prefix=f"{run_dir.name}/", deadline=deadline)

    final = run_dir / "student"
    export_state = ema.model.state_dict() if ema is not None else accelerator.get_state_dict(student)
    if accelerator.is_main_process:
        if accelerator.distributed_type == DistributedType.FSDP:  # raw_student holds shards: rebuild it whole
            raw_student = family.trainable(routing, cfg.student.lora_rank)
            raw_student.load_state_dict(export_state)
        if best is not None:  # eval.select: the best unflagged state, not the last one
            family.export(family.load_student(best_dir), final)
        else:
            family.export(ema.model if ema is not None else raw_student, final)
        write_json(run_dir / "summary.json", {"steps": cfg.steps, "steps_done": reached, "skipped_steps": skipped,
                                              "train_seconds": round(seconds, 1), "routing": routing.to_dict(),
                                              "exported_step": best.step if best else reached,
                                              "selected_by": cfg.eval.select or "last"})
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
        x = few_step_sample(family.denoiser(student), n, family.conditions(ids[i : i + batch]), timesteps, renoise=renoise)
        out.append(family.to_images(x).float().cpu())
    student.train(was_training)
    return torch.cat(out)


def teacher_sample_key(family: Family, cfg: DistillConfig, noise: torch.Tensor, ids: torch.Tensor) -> str:
    """What the teacher's samples are a function of: its config and weights, the sampler, the guidance, the noises
    and condition ids, and what turns ids and latents into conditions and images (the prompts, the VAE)."""
    teacher = family.teacher()
    h = hashlib.sha256(json.dumps([type(family).__name__, cfg.eval.teacher_sampler, cfg.eval.teacher_steps,
                                   cfg.dm.guidance_scale, list(noise.shape), cfg.vae, to_dict(cfg.t2i),
                                   dict(getattr(teacher, "config", {}))], sort_keys=True, default=str).encode())
    for name, tensor in sorted(teacher.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    for t in (noise, ids):
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def cached_teacher_images(family: Family, cfg: DistillConfig, noise: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """`teacher_images`, read from (or written to) eval.teacher_cache when one is set."""
    if not cfg.eval.teacher_cache:
        return teacher_images(family, cfg, noise, ids)
    path = Path(cfg.eval.teacher_cache) / f"teacher_{teacher_sample_key(family, cfg, noise, ids)}.safetensors"
    if path.is_file():
        with contextlib.suppress(Exception):  # unreadable or of another shape: sample again and replace it
            images = load_file(path)["images"]
            if images.shape[0] == len(noise) and torch.isfinite(images).all():
                return images
    images = teacher_images(family, cfg, noise, ids)
    # atomic: the concurrent runs of one experiment may write the same file
    atomic_write(path, lambda tmp: save_file({"images": images.contiguous()}, tmp))
    return images


@torch.no_grad()
def teacher_images(family: Family, cfg: DistillConfig, noise: torch.Tensor, ids: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    device = family.device
    batch = batch or getattr(family, "sample_batch_size", 250)
    return torch.cat([family.to_images(family.teacher_sample(
        family.teacher(), noise[i : i + batch].to(device), ids[i : i + batch], cfg.eval.teacher_sampler,
        cfg.eval.teacher_steps, cfg.dm.guidance_scale)).float().cpu() for i in range(0, len(noise), batch)])


# ------------------------------------------------------------------------------------------- the job
def check_inputs(cfg: DistillConfig, routings: dict[str, RoutingConfig]) -> None:
    """Every input the run reads later, checked before anything is written: the output folder, the initial
    student weights, the datasets named for the report and the GAN term, and the checkpoints to resume."""
    check_output_dir(cfg.out_dir, "out_dir")
    if cfg.eval.teacher_cache:
        check_output_dir(cfg.eval.teacher_cache, "eval.teacher_cache")
    if cfg.student.init and not (Path(cfg.student.init) / "model.safetensors").is_file():
        raise UserError(f"student.init={cfg.student.init}: no model.safetensors there; pass a DiT folder (e.g. an earlier student)")
    for key, name in (("eval.reference", cfg.eval.reference), ("gan.dataset", cfg.gan.dataset if cfg.gan.enabled else "")):
        if name and name not in DATASET_NAMES and not Path(name).exists():
            raise UserError(f"{key}={name!r} is neither a dataset name ({', '.join(DATASET_NAMES)}) nor an existing folder or .npz")
    if cfg.regression.enabled:
        from dmd_dar.dmd.regression import MAKE_PAIRS_HINT, RegressionPairs

        if not cfg.regression.pairs:
            raise UserError(f"regression.enabled=true needs regression.pairs=<file.npz>; {MAKE_PAIRS_HINT}")
        try:
            RegressionPairs.load(cfg.regression.pairs)  # readable and consistent, before anything is written
        except UserError as err:
            raise UserError(f"regression.pairs={cfg.regression.pairs}: {err}") from None
    if cfg.backbone == "diffusers":
        check_hub_teacher(cfg.teacher)
    check_resumable(cfg, routings)


def check_hub_teacher(teacher: str) -> None:
    """A hub id with the hub switched off must be in the local cache: said in one line before diffusers is even imported
    (the loader says the same, later, for the cases this cheap look cannot see)."""
    if Path(teacher).expanduser().exists() or teacher.startswith(("/", ".", "~")) or teacher.count("/") != 1 or not hub_offline():
        return
    from huggingface_hub import try_to_load_from_cache

    if not any(isinstance(try_to_load_from_cache(teacher, name), str)
               for name in ("model_index.json", "transformer/config.json", "config.json")):
        raise UserError(f"teacher weights of hub id {teacher!r}: not available offline (the hub is switched off "
                        "(HF_HUB_OFFLINE) and they are not in the local cache); download them on a machine with network "
                        "and pass the local path")


def check_student_init(cfg: DistillConfig, family: Family, routings: dict[str, RoutingConfig]) -> None:
    """student.init must fit each arm's student: tried on a throw-away student before anything is written."""
    if cfg.student.init:
        for routing in routings.values():
            try:
                family.load_weights(family.trainable(routing, cfg.student.lora_rank), Path(cfg.student.init))
            except UserError as err:
                raise UserError(f"student.init={cfg.student.init}: {err}") from None


def gan_real_data(cfg: DistillConfig, family: Family) -> RealSet | None:
    """The GAN term's real training images and their condition ids (None: an unconditional teacher), checked against
    the teacher before anything is written. The discriminator compares each real image under its own label."""
    if not cfg.gan.enabled:
        return None
    real = load_dataset(cfg.gan.dataset, split="train")
    if tuple(real.images.shape[1:]) != tuple(family.sample_shape):
        raise UserError(f"gan.dataset={cfg.gan.dataset} holds {list(real.images.shape[1:])} samples but the teacher makes "
                        f"{list(family.sample_shape)}; a latent teacher needs latent shards (scripts/extract_latents.py)")
    if family.num_conditions == 1:
        return real.images, None
    if real.labels is None:
        raise UserError(f"gan.dataset={cfg.gan.dataset} has no labels but the teacher is class-conditional "
                        f"({family.num_conditions} classes): give a labelled set (an .npz with arr_1 labels, or class folders)")
    low, high = int(real.labels.min()), int(real.labels.max())
    if low < 0 or high >= family.num_conditions:
        raise UserError(f"gan.dataset={cfg.gan.dataset} has labels in [{low}, {high}] but "
                        f"the teacher knows classes 0-{family.num_conditions - 1}: give a set labelled for this teacher")
    return real.images, real.labels


def check_resumable(cfg: DistillConfig, routings: dict[str, RoutingConfig]) -> None:
    """Refuse, before anything is written, to resume an arm whose checkpoint has another routing."""
    if not cfg.resume:
        return
    for name, routing in routings.items():
        ckpt = latest_checkpoint(Path(cfg.out_dir) / name)
        if ckpt is None:
            continue
        saved = load_run_checkpoint(ckpt)[0].get("routing")
        if saved is not None and saved != routing.to_dict():
            raise UserError(f"{ckpt} was written by a run with student routing {saved}, not {routing.to_dict()}: "
                            "use another out_dir, or resume=false to start over there")


def is_latent_reference(cfg: DistillConfig) -> bool:
    return bool(cfg.eval.reference) and (Path(cfg.eval.reference) / LATENTS_INDEX).is_file()


@torch.no_grad()
def reference_images(cfg: DistillConfig, family: Family, n: int) -> torch.Tensor:
    """The first n held-out images of eval.reference; latent shards (scripts/extract_latents.py) decoded by the family."""
    images = load_dataset(cfg.eval.reference, split="heldout").images[:n]
    if not is_latent_reference(cfg):
        return images
    return torch.cat([family.to_images(z.float().to(family.device)).float().cpu() for z in images.split(64)])


def quality_reference(cfg: DistillConfig, teacher_images: torch.Tensor, family: Family | None = None):
    """What the monitor's quality is measured against: the real held-out set, or the teacher's probe samples."""
    from dmd_dar.metrics.quality import load_reference

    if family is not None and is_latent_reference(cfg):  # decoded: as many as the largest set it is compared with
        return load_reference(reference_images(cfg, family, max(cfg.eval.batch, cfg.eval.report_samples)))
    return load_reference(cfg.eval.reference if cfg.eval.reference else teacher_images)


def run_distillation(cfg: DistillConfig) -> dict[str, Any]:
    """The main job: distill each arm, then grids, samples and the spectral report. Returns the summary."""
    from accelerate import Accelerator

    start = time.monotonic()  # the job's wall-clock budget (time_limit_min) counts from here
    routings = cfg.arm_routings()
    check_inputs(cfg, routings)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, log_with="tensorboard", project_dir=cfg.out_dir)
    if accelerator.distributed_type == DistributedType.FSDP:  # before the teacher is loaded and anything is written
        raise UserError("FSDP distillation does not work yet (the routed forwards bypass the blocks' FSDP hooks, and the "
                        "monitor and checkpoints deadlock on sharded models; see docs/t2i.md, 'FSDP'): launch with DDP "
                        "(accelerate launch --multi_gpu) on GPUs that hold three copies of the model")
    family = make_family(cfg.backbone, cfg.teacher, accelerator.device, cfg.t2i, vae=cfg.vae or None)
    check_student_init(cfg, family, routings)
    real = gan_real_data(cfg, family)
    for name, routing in routings.items():
        if not routing.function_preserving:
            accelerator.print(f"note: arm {name} uses chunk_size={routing.chunk_size} with summary='last': the student "
                              "does not start as the teacher's function (summary='sum' does)")
    out = Path(cfg.out_dir)
    with run_lock(out) if accelerator.is_main_process else contextlib.nullcontext():
        return distill_all(cfg, accelerator, family, routings, out, deadline_after(cfg.time_limit_min, start), real)


def distill_all(cfg: DistillConfig, accelerator, family: Family, routings: dict[str, RoutingConfig], out: Path,
                deadline: float | None = None, real: RealSet | None = None) -> dict[str, Any]:
    """Everything `run_distillation` writes, under the run's lock."""
    if accelerator.is_main_process:
        save_config(cfg, out / "config.yaml")
        accelerator.init_trackers("tb")

    t0 = time.time()
    # One set of evaluation noises, sampled once by the (multi-step, expensive) teacher: the grid is its first
    # grid_images, the monitor's probe the next eval.batch, the end-of-run report the first report_samples.
    n_grid, n_probe, n_report = cfg.eval.grid_images, cfg.eval.batch, cfg.eval.report_samples
    g = step_generator(cfg.seed, 0, stream=2000)
    noise = torch.randn((max(n_grid + n_probe, n_report), *family.sample_shape), generator=g)
    ids = torch.arange(len(noise)) % family.num_conditions
    teacher_all = cached_teacher_images(family, cfg, noise, ids)
    grid, probe = slice(0, n_grid), slice(n_grid, n_grid + n_probe)
    teacher_grid = teacher_all[grid]
    fixed = EvalBatch(noise[grid], ids[grid], noise[probe], ids[probe], teacher_all[probe])
    monitor = Monitor(cfg.eval, fixed.teacher_probe_images, labels=fixed.probe_ids if cfg.backbone == "dit" else None,
                      reference=quality_reference(cfg, fixed.teacher_probe_images, family) if cfg.eval.quality else None)
    if accelerator.is_main_process:
        save_image_grid(teacher_grid, out / "teacher_grid.png", nrow=10, scale=2)

    students = {name: distill_arm(cfg, family, routing, out / name, accelerator, fixed, monitor, deadline, real)
                for name, routing in routings.items()}
    summary: dict[str, Any] = {"teacher": cfg.teacher, "arms": {}}
    if accelerator.is_main_process:
        grids = {"teacher": teacher_grid}
        for name, folder in students.items():
            grids[name] = student_images(family, family.load_student(folder), fixed.grid_noise, fixed.grid_ids, cfg.student.timesteps)
            save_image_grid(grids[name], out / name / "student_grid.png", nrow=10, scale=2)
            summary["arms"][name] = {"student": str(folder), **read_json(out / name / "summary.json")}
        save_comparison(grids, out / "comparison.png", per_row=10)
        plot_monitor({name: out / name / "log.csv" for name in students}, out / "monitor.png")
        if n_report > 0:
            summary["report"] = write_detail_report(cfg, family, students, out, noise[:n_report], ids[:n_report],
                                                    teacher_all[:n_report])
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


def write_detail_report(cfg: DistillConfig, family: Family, students: dict[str, Path], out: Path, noise: torch.Tensor,
                        ids: torch.Tensor, teacher: torch.Tensor) -> dict[str, Any]:
    """Sample each student on the noises and conditions of the teacher's (multi-step) images `teacher`, save
    every set as .npz, and write the spectral report against real held-out data."""
    from dmd_dar.image_io import save_images
    from dmd_dar.spectral.report import write_report

    n, K = len(noise), len(cfg.student.timesteps)
    sets = {f"teacher_{cfg.eval.teacher_steps}step": teacher}
    for name, folder in students.items():
        sets[f"student_{name}_{K}step"] = student_images(family, family.load_student(folder), noise, ids, cfg.student.timesteps)
    for name, imgs in sets.items():
        save_images(imgs, out / "samples" / f"{name}.npz")
    if cfg.eval.reference:
        reference, ref_name = reference_images(cfg, family, n), f"real_{cfg.eval.reference}"
    else:
        ref_name = next(iter(sets))
        reference = sets.pop(ref_name)
    write_report(reference, sets, out / "report", reference_name=ref_name,
                 title=f"Spectral detail: teacher ({cfg.eval.teacher_steps}-step) vs {K}-step students")
    summary = {"dir": str(out / "report"), "samples": n, "reference": ref_name}
    if cfg.eval.quality:
        summary["quality"] = final_quality(cfg, sets, ids if cfg.backbone == "dit" else None, reference)
        write_json(out / "quality.json", summary["quality"])
    return summary


def final_quality(cfg: DistillConfig, sets: dict[str, torch.Tensor], labels: torch.Tensor | None,
                  reference: torch.Tensor) -> dict[str, dict[str, Any]]:
    """The quality of each set of the report (teacher and students, same noises and labels), one line each."""
    from dmd_dar.metrics.quality import evaluate_quality, load_reference

    ref = load_reference(cfg.eval.reference if cfg.eval.reference and not is_latent_reference(cfg) else reference)
    out = {}
    for name, images in sets.items():
        q = out[name] = evaluate_quality(images, labels, ref)
        shown = [f"FD {q['fd']:.2f}" if "fd" in q else f"FID {q['fid']:.2f}", f"floor {q['fd_floor']:.2f}" if "fd_floor" in q else "",
                 f"accuracy {q['accuracy']:.3f}" if "accuracy" in q else "", f"precision {q['precision']:.3f}",
                 f"recall {q['recall']:.3f}", f"KID {q['kid']:.4f}" if "kid" in q else ""]
        print(f"quality[{name}]: {q['space']} space, n={q['n']}: " + ", ".join(x for x in shown if x))
    return out
