"""Pieces shared by the trainers (teacher training and DMD distillation).

Determinism: the data order and every random draw of step s are functions of (seed, s) alone, drawn for the
*global* batch and then sliced per process. So a resumed run continues exactly where it stopped, and a
2-process run sees the same samples and noises as a 1-process run at the same global batch.
"""
from __future__ import annotations

import copy
import csv
import io
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from dmd_dar.checkpoint import atomic_dir, atomic_write_bytes, load_torch_state, read_json, save_torch_state, write_json
from dmd_dar.errors import UserError

STEP_DIR = re.compile(r"^step_(\d{8})$")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 0
    grad_clip: float = 1.0


MIXED_PRECISION = ("no", "bf16", "fp16")


def mixed_precision_value(value) -> str:
    """`mixed_precision=no` arrives as False (YAML 1.1 reads `no` as a boolean): map it back, and check."""
    value = "no" if value in (False, "False", "false", None) else str(value)
    if value not in MIXED_PRECISION:
        from dmd_dar.errors import ConfigError

        raise ConfigError(f"mixed_precision={value!r} is not one of {', '.join(MIXED_PRECISION)}")
    return value


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))


def warmup_lambda(warmup_steps: int) -> Callable[[int], float]:
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


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


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    steps = sorted(p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "meta.json").is_file())
    return steps[-1] if steps else None


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
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_run_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    path = Path(path)
    return read_json(path / "meta.json"), load_torch_state(path / "trainer_state.pt")


def global_grad_norm(params) -> float:
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def all_finite(*values: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in values)
