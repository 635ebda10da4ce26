"""The run plumbing shared by the trainers (teacher training and DMD distillation): determinism, optimisers,
EMA, the CSV log, run checkpoints and resume, the non-finite guard, and `run_loop`, the one training loop.

Determinism: the data order and every random draw of step s are functions of (seed, s) alone, drawn for the
*global* batch and then sliced per process. So a resumed run continues exactly where it stopped, and a
2-process run sees the same samples and noises as a 1-process run at the same global batch.
"""
from __future__ import annotations

import copy
import csv
import io
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dmd_dar.checkpoint import (
    atomic_dir,
    atomic_write_bytes,
    load_model_files,
    load_torch_state,
    read_json,
    save_torch_state,
    write_json,
)
from dmd_dar.errors import ConfigError, UserError

STEP_DIR = re.compile(r"^step_(\d{8})$")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 0
    grad_clip: float = 1.0  # 0: no clipping

    def __post_init__(self):
        if not 0 < self.lr <= 1:
            raise ConfigError(f"optim.lr={self.lr} must be in (0, 1] (AdamW; typical values 1e-6 .. 1e-3)")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"optim.beta1={self.beta1}, beta2={self.beta2} must be in [0, 1)")
        if self.weight_decay < 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ConfigError("optim.weight_decay, warmup_steps and grad_clip must be >= 0")


MIXED_PRECISION = ("no", "bf16", "fp16")


def mixed_precision_value(value) -> str:
    """`mixed_precision=no` arrives as False (YAML 1.1 reads `no` as a boolean): map it back, and check."""
    value = "no" if value in (False, "False", "false", None) else str(value)
    if value not in MIXED_PRECISION:
        raise ConfigError(f"mixed_precision={value!r} is not one of {', '.join(MIXED_PRECISION)}")
    return value


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))


LR_SCHEDULES = ("constant", "cosine")


def lr_lambda(warmup_steps: int, schedule: str = "constant", total_steps: int = 0, final_ratio: float = 0.1) -> Callable[[int], float]:
    """The learning-rate factor at each update (for LambdaLR): a linear warm-up over `warmup_steps`, then
    constant, or a cosine from 1 down to `final_ratio` at `total_steps`. A pure function of the update count and
    the config, so a resumed run (even with a longer `steps`) follows the schedule of its config."""
    if schedule not in LR_SCHEDULES:
        raise ConfigError(f"learning-rate schedule {schedule!r} is not one of {', '.join(LR_SCHEDULES)}")

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant" or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """The generator for step `step` (and an independent `stream` within the step), on the CPU."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step * 97 + stream * 7_919) % (2**63 - 1))
    return g


def batch_indices(step: int, batch_size: int, num_items: int, seed: int) -> torch.Tensor:
    """Global batch `step` of an epoch-wise shuffled pass over `num_items` items (each epoch reshuffled)."""
    start = step * batch_size
    positions = torch.arange(start, start + batch_size)
    epochs = positions // num_items
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        g = torch.Generator()
        g.manual_seed(seed * 7_777 + epoch)
        perm = torch.randperm(num_items, generator=g)
        mask = epochs == epoch
        out[mask] = perm[positions[mask] % num_items]
    return out


def local_slice(global_batch: int, rank: int, world: int) -> slice:
    if global_batch % world:
        raise UserError(f"global batch size {global_batch} is not divisible by the number of processes {world}")
    per = global_batch // world
    return slice(rank * per, (rank + 1) * per)


class EMA:
    """Exponential moving average of a model's parameters (buffers copied).

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so short runs do not keep most of
    the initial weights (with adaLN-Zero, an initial DiT predicts zero). Resume by setting `num_updates`.
    """

    def __init__(self, model: nn.Module, decay: float, num_updates: int = 0):
        self.decay = decay
        self.num_updates = num_updates
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        self.num_updates += 1
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach().to(ema_p.dtype), 1.0 - decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)


class CSVLogger:
    """Appends one row per logged step. On resume, rows past the resumed step are dropped."""

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
        self.path = Path(path)
        self.fields: list[str] | None = None
        if self.path.exists() and resume_step is not None:
            with open(self.path) as f:
                rows = list(csv.DictReader(f))
            if rows:
                self.fields = list(rows[0].keys())
                kept = [r for r in rows if int(r["step"]) <= resume_step]
                buf = io.StringIO()
                w = csv.DictWriter(buf, fieldnames=self.fields)
                w.writeheader()
                w.writerows(kept)
                atomic_write_bytes(self.path, buf.getvalue().encode())
        elif self.path.exists():
            self.path.unlink()

    def log(self, step: int, values: dict[str, float]) -> None:
        row = {"step": step, **{k: (float(v) if torch.is_tensor(v) else v) for k, v in values.items()}}
        if self.fields is None or not set(row) <= set(self.fields):
            # first row, or a metric logged only every N steps appears: (re)write the header
            rows = []
            if self.fields is not None and self.path.exists():
                with open(self.path) as f:
                    rows = list(csv.DictReader(f))
            self.fields = (self.fields or []) + [k for k in row if k not in (self.fields or [])]
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=self.fields)
            writer.writeheader()
            writer.writerows(rows)
            atomic_write_bytes(self.path, buf.getvalue().encode())
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields).writerow(row)


# --------------------------------------------------------------------------------- run checkpoints
def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


CHECKPOINT_FILES = ("meta.json", "trainer_state.pt")  # present in every complete checkpoint folder


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint: a step_XXXXXXXX folder holding all of CHECKPOINT_FILES. Folders are
    renamed into place whole and renamed away before they are deleted, so a complete-looking partial one
    cannot occur; the file check is the second line of defence."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    steps = sorted(p for p in root.iterdir() if STEP_DIR.match(p.name) and all((p / f).is_file() for f in CHECKPOINT_FILES))
    return steps[-1] if steps else None


def clean_stale_checkpoints(run_dir: str | os.PathLike) -> list[str]:
    """Remove what interrupted runs left in checkpoints/: the hidden temporary folders of unfinished writes,
    replacements and deletions (`.step_*`), never a step_XXXXXXXX folder. Returns the names removed."""
    root = Path(run_dir) / "checkpoints"
    stale = sorted(p for p in root.iterdir() if p.name.startswith(".step_")) if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in stale]


def remove_checkpoint(folder: Path) -> None:
    """Delete a checkpoint crash-safely: rename it to a hidden name first (one atomic step, after which it is no
    longer a checkpoint), then delete; a kill during the deletion leaves only a hidden folder for start-up to clean."""
    trash = folder.with_name(f".{folder.name}.trash-{os.getpid()}")
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_run_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    models: dict[str, Callable[[Path], None]],
    trainer_state: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write checkpoints/step_XXXXXXXX atomically: one folder per model (via its save callable), the
    trainer state (weights_only-loadable) and meta.json (written last: its presence marks completeness)."""
    final = checkpoint_dir(run_dir, step)
    with atomic_dir(final) as tmp:
        for name, save in models.items():
            save(tmp / name)
        save_torch_state(tmp / "trainer_state.pt", trainer_state)
        write_json(tmp / "meta.json", {"step": step, **meta})
    root = final.parent
    done = sorted(p for p in root.iterdir() if STEP_DIR.match(p.name))
    for old in done[:-keep_last] if keep_last > 0 else []:
        remove_checkpoint(old)
    return final


def load_run_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    path = Path(path)
    return read_json(path / "meta.json"), load_torch_state(path / "trainer_state.pt")


def global_grad_norm(params) -> float:
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def all_finite(*values: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in values)


# --------------------------------------------------------------------------------- resume
def load_module_state(module: nn.Module, folder: Path) -> None:
    """Load a run checkpoint's weights strictly: a checkpoint of another model (another routing, size or LoRA
    rank) is a user error naming the keys, never a silent partial load."""
    state = load_model_files(folder).state_dict
    own = module.state_dict()
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    shapes = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise UserError(f"checkpoint {folder} does not fit this run's model (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}, other shapes {shapes[:3]}): it was written with another configuration; "
                        "use another out_dir or resume=false")
    module.load_state_dict(state)


@dataclass
class Resumed:
    step: int = 0
    skipped_steps: int = 0
    meta: dict[str, Any] | None = None


def resume_run(run_dir: Path, modules: dict[str, nn.Module | None], states: dict[str, Any]) -> Resumed:
    """Load the latest complete checkpoint of `run_dir` into `modules` (one folder each) and into the objects
    with `load_state_dict` in `states` (optimisers, schedulers; from trainer_state.pt). Nothing to resume:
    Resumed(step=0)."""
    clean_stale_checkpoints(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return Resumed()
    meta, state = load_run_checkpoint(ckpt)
    for name, module in modules.items():
        if module is not None:
            load_module_state(module, ckpt / name)
    for name, obj in states.items():
        obj.load_state_dict(state[name])
    return Resumed(int(meta["step"]), int(meta.get("skipped_steps", 0)), meta)


# --------------------------------------------------------------------------------- the loop
class TrainingDiverged(UserError):
    pass


def guarded_update(accelerator, loss: torch.Tensor, params: Sequence[nn.Parameter], optimizer, grad_clip: float) -> tuple[bool, float]:
    """One optimiser step, skipped on every process when the loss or the gradient is not finite anywhere.
    Returns (stepped, gradient norm after clipping)."""

    def finite_everywhere(value: torch.Tensor) -> bool:
        flag = torch.tensor([1.0 if all_finite(value) else 0.0], device=accelerator.device)
        return bool(accelerator.gather(flag).min() > 0)

    optimizer.zero_grad(set_to_none=True)
    if not finite_everywhere(loss.detach()):
        return False, float("nan")
    accelerator.backward(loss)
    if grad_clip > 0:
        accelerator.clip_grad_norm_(params, grad_clip)
    norm = global_grad_norm(params)
    if not finite_everywhere(torch.tensor(norm)):
        optimizer.zero_grad(set_to_none=True)
        return False, norm
    optimizer.step()
    return True, norm


@dataclass
class StepResult:
    logs: dict[str, Any]  # tensors are averaged over processes when logged
    ok: bool = True  # False: a non-finite loss or gradient, the update was skipped


@dataclass
class Cadence:
    """When the loop logs, evaluates, samples and checkpoints (every N steps, and always at the last step)."""

    steps: int
    log_every: int
    sample_every: int
    checkpoint_every: int
    eval_every: int = 0  # 0: the trainer has no periodic evaluation

    def due(self, done: int, every: int) -> bool:
        return every > 0 and (done % every == 0 or done == self.steps)


def run_loop(
    accelerator,
    name: str,
    run_dir: Path,
    cadence: Cadence,
    train_step: Callable[[int], StepResult],
    save_checkpoint: Callable[[int, int], None],
    resumed: Resumed,
    max_bad_steps: int,
    ema: EMA | None = None,
    model: nn.Module | None = None,
    evaluate: Callable[[int], dict[str, float]] | None = None,
    sample: Callable[[int], None] | None = None,
    progress: Sequence[str] = ("loss",),
    log_prefix: str = "",
    deadline: float | None = None,
) -> tuple[int, float, int]:
    """The one training loop of both trainers: progress bar, the non-finite guard (skip, count, stop after
    `max_bad_steps` in a row keeping the last good checkpoint), EMA of `model`, and the log / evaluate /
    sample / checkpoint cadence. `train_step(step)` does the work of one step. Evaluation and samples run
    on the main process; checkpoints on every process (the state dicts are gathered collectively).
    `deadline` (a `time.monotonic()` value): after the first step that ends past it, the loop writes a checkpoint
    and stops early, so that running the same command again resumes where it stopped (a wall-clock budget).
    Returns (skipped steps, seconds, the step reached)."""
    main = accelerator.is_main_process
    logger = CSVLogger(run_dir / "log.csv", resume_step=resumed.step) if main else None
    skipped, bad_in_a_row, good, t0 = resumed.skipped_steps, 0, 0, time.time()
    bar = tqdm(range(resumed.step, cadence.steps), initial=resumed.step, total=cadence.steps, desc=name, disable=not main)
    for step in bar:
        result = train_step(step)
        if not result.ok:
            bad_in_a_row, skipped = bad_in_a_row + 1, skipped + 1
            accelerator.print(f"step {step + 1}: non-finite loss or gradient, update skipped ({bad_in_a_row} in a row)")
            if bad_in_a_row >= max_bad_steps:
                raise TrainingDiverged(
                    f"{bad_in_a_row} non-finite steps in a row at step {step + 1}; stopped. Last good checkpoint: "
                    f"{latest_checkpoint(run_dir) or 'none'}. Lower the learning rates or check the data / teacher")
            continue
        bad_in_a_row, good = 0, good + 1
        if ema is not None:
            ema.update(model)
        done, logs = step + 1, result.logs
        if main and evaluate is not None and cadence.due(done, cadence.eval_every):
            logs.update(evaluate(done))
        if cadence.due(done, cadence.log_every):
            values = {k: float(accelerator.reduce(v.detach().clone(), "mean")) if torch.is_tensor(v) else v for k, v in logs.items()}
            values.update(skipped_steps=skipped, elapsed_s=round(time.time() - t0, 2))
            accelerator.log({f"{log_prefix}{k}": v for k, v in values.items()}, step=done)
            if logger:
                logger.log(done, values)
            bar.set_postfix({k: f"{values[k]:.4g}" for k in progress if k in values})
        if main and sample is not None and cadence.due(done, cadence.sample_every):
            sample(done)
        saved = cadence.due(done, cadence.checkpoint_every)
        if saved:
            save_checkpoint(done, skipped)
        if done < cadence.steps and past_deadline(accelerator, deadline):
            if not saved:
                save_checkpoint(done, skipped)
            bar.close()
            accelerator.print(f"{name}: time limit reached after step {done} of {cadence.steps}; checkpoint written, "
                              "run the same command again to resume")
            return skipped, time.time() - t0, done
    if good == 0 and cadence.steps > resumed.step:
        raise TrainingDiverged(f"every one of the {cadence.steps - resumed.step} steps had a non-finite loss or gradient and "
                               "was skipped: nothing was trained. Lower the learning rates or check the data / teacher")
    return skipped, time.time() - t0, cadence.steps


def past_deadline(accelerator, deadline: float | None) -> bool:
    """Whether the wall-clock budget is spent, decided on the main process and shared, so that every process stops
    after the same step (a process that stopped alone would hang the others' next collective)."""
    if deadline is None:
        return False
    late = time.monotonic() >= deadline
    if accelerator.num_processes == 1:
        return late
    flag = torch.tensor([float(late and accelerator.is_main_process)], device=accelerator.device)
    return bool(accelerator.reduce(flag, "sum").item() > 0)


def deadline_after(minutes: float, start: float) -> float | None:
    """The `run_loop` deadline of a `time_limit_min` setting (0: none), counted from `start` (time.monotonic())."""
    return start + 60.0 * minutes if minutes > 0 else None


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """The device a user asked for, checked: None is CUDA when available, else the CPU; a device this machine
    does not have is a user error, not a driver traceback at the first tensor moved there."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"device {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"device {name!r} is not available on this machine ({torch.cuda.device_count()} CUDA devices); use cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device {name!r} is not supported; use cpu or cuda")
    return device
