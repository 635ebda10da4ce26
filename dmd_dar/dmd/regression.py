"""DMD (v1) regression loss: LPIPS between the student's one-step output and the teacher's ODE output
for the same fixed noise and condition (Yin et al. 2023, section 3.3); or, with `regression.distance=mse`, their
mean squared pixel difference, which needs no pretrained weights.

The pairs are computed once (`make_pairs`, script `scripts/make_regression_pairs.py`) and stored in one
`.npz`: `noise` float32 [N, *sample_shape], `ids` int64 [N], `samples` float32 [N, *sample_shape] (the
teacher's outputs in the model's sample space: pixels for our DiT, latents for latent teachers) and `meta`
(a JSON string: teacher, sampler, steps, guidance, seed, ...).

During distillation (`regression.enabled=true regression.pairs=<file>`), each student update takes a
deterministic global batch of pairs for its step (sliced per process), runs the student once at t = 1 from
the stored noise with the stored condition, decodes both to images and adds `regression.weight` times the
mean LPIPS (or pixel MSE) distance. A K-step student is regressed on its first step only (DMD v1 is one-step); the later
steps are shaped by the distribution-matching loss alone.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmd_dar.checkpoint import atomic_write
from dmd_dar.dmd.lpips_loss import NETS, LPIPSLoss, load_lpips
from dmd_dar.errors import UserError
from dmd_dar.training import batch_indices

PAIRS_KEYS = ("noise", "ids", "samples", "meta")
MAKE_PAIRS_HINT = "make them with scripts/make_regression_pairs.py --config <distill config> --out <file>.npz"


@dataclass
class RegressionPairs:
    """Fixed noises, their condition ids and the teacher's ODE outputs for them (all on the CPU)."""

    noise: torch.Tensor  # float32 [N, *sample_shape]
    ids: torch.Tensor  # int64 [N]
    samples: torch.Tensor  # float32 [N, *sample_shape]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.samples.shape[1:])

    def save(self, path: str | os.PathLike) -> Path:
        """Write the `.npz` atomically (see `dmd_dar.checkpoint.atomic_write`)."""
        arrays = dict(noise=self.noise.float().numpy(), ids=self.ids.long().numpy(),
                      samples=self.samples.float().numpy(), meta=np.array(json.dumps(self.meta, sort_keys=True)))
        return atomic_write(path, lambda tmp: np.savez(tmp, **arrays))

    @classmethod
    def load(cls, path: str | os.PathLike) -> RegressionPairs:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"regression pairs {path} not found; {MAKE_PAIRS_HINT}")
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = [k for k in PAIRS_KEYS if k not in data.files]
                if missing:
                    raise UserError(f"{path} is not a regression-pairs file (no {', '.join(missing)}); {MAKE_PAIRS_HINT}")
                noise, ids, samples = data["noise"], data["ids"], data["samples"]
                meta = json.loads(str(data["meta"]))
        except UserError:
            raise
        except Exception as err:  # zip / npy / JSON damage
            raise UserError(f"cannot read regression pairs {path} ({type(err).__name__}: "
                            f"{(str(err).splitlines() or [''])[0]}); {MAKE_PAIRS_HINT}") from None
        if ids.ndim != 1 or noise.shape != samples.shape or len(noise) != len(ids) or len(ids) == 0:
            raise UserError(f"{path}: inconsistent pairs (noise {list(noise.shape)}, ids {list(ids.shape)}, "
                            f"samples {list(samples.shape)}); {MAKE_PAIRS_HINT}")
        return cls(torch.from_numpy(noise).float(), torch.from_numpy(ids).long(), torch.from_numpy(samples).float(), meta)


@torch.no_grad()
def make_pairs(family, n: int, seed: int, sampler: str, steps: int, guidance: float, batch: int = 64,
               progress: Callable[[int], None] | None = None) -> RegressionPairs:
    """Draw `n` fixed noises (CPU generator seeded `seed`) and condition ids (0, 1, ..., cycling through
    `family.num_conditions`), and run the teacher's ODE (with CFG `guidance`) on each batch of `batch`.
    `progress(k)` is called after each batch with the number of pairs done."""
    if n < 1 or batch < 1:
        raise UserError(f"n={n} and batch={batch} must both be >= 1")
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *family.sample_shape), generator=g)
    ids = torch.arange(n) % family.num_conditions
    teacher = family.teacher()
    out = []
    for i in range(0, n, batch):
        x = family.teacher_sample(teacher, noise[i : i + batch].to(family.device), ids[i : i + batch], sampler, steps, guidance)
        out.append(x.float().cpu())
        if progress is not None:
            progress(min(i + batch, n))
    meta = {"n": n, "seed": seed, "sampler": sampler, "steps": steps, "guidance": guidance,
            "sample_shape": list(family.sample_shape), "num_conditions": family.num_conditions}
    return RegressionPairs(noise, ids, torch.cat(out), meta)


class PixelMSE(torch.nn.Module):
    """`regression.distance=mse`: the mean squared difference of the two image batches (in [-1, 1])."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(a.float(), b.float())


class RegressionLoss:
    """`loss = regression(student_x0, step, sl)`: mean LPIPS (or pixel MSE) between the student's one-step images and the
    teacher's, on global batch `step` of the pairs (this process's slice `sl` of it)."""

    def __init__(self, pairs: RegressionPairs, family, lpips: LPIPSLoss | PixelMSE, batch_size: int | None = None, seed: int = 0,
                 source: str | None = None):
        label = f"regression pairs {source}" if source else "the regression pairs"
        if pairs.sample_shape != tuple(family.sample_shape):
            raise UserError(f"{label} hold samples of shape {list(pairs.sample_shape)} but the teacher "
                            f"makes {list(family.sample_shape)}; {MAKE_PAIRS_HINT} for this teacher")
        low, top = int(pairs.ids.min()), int(pairs.ids.max())
        if low < 0 or top >= family.num_conditions:
            raise UserError(f"{label} use condition ids {low}..{top} but the teacher has "
                            f"{family.num_conditions} conditions; {MAKE_PAIRS_HINT} for this teacher")
        if batch_size is not None and batch_size < 1:
            raise UserError(f"regression batch_size={batch_size} must be >= 1")
        self.pairs, self.family, self.lpips = pairs, family, lpips
        self.batch_size, self.seed = batch_size, seed

    @classmethod
    def from_config(cls, cfg, family, device: torch.device | str, batch_size: int | None = None, seed: int = 0,
                    lpips: LPIPSLoss | PixelMSE | None = None) -> RegressionLoss:
        """`cfg` is a `dmd_dar.dmd.config.RegressionConfig`. `batch_size` is the *global* batch (the trainer's
        `cfg.batch_size`); None means a single process whose slice is the whole batch. `lpips` replaces the
        network `cfg.net` / `cfg.pretrained_backbone` would load (tests)."""
        if not cfg.pairs:
            raise UserError(f"regression.enabled=true needs regression.pairs=<file.npz>; {MAKE_PAIRS_HINT}")
        if cfg.distance == "lpips" and cfg.net not in NETS:
            raise UserError(f"regression.net={cfg.net!r} is unknown; use one of {', '.join(NETS)}")
        pairs = RegressionPairs.load(cfg.pairs)
        if lpips is None:
            lpips = PixelMSE() if cfg.distance == "mse" else load_lpips(cfg.net, pretrained_backbone=cfg.pretrained_backbone, device=device)
        return cls(pairs, family, lpips.to(device), batch_size=batch_size, seed=seed, source=str(cfg.pairs))

    def indices(self, step: int, sl: slice) -> torch.Tensor:
        """Pair indices of this process for `step` (the same global batch on every process and on resume)."""
        global_batch = self.batch_size
        if global_batch is None:
            if sl.start not in (None, 0) or sl.stop is None:
                raise UserError("RegressionLoss needs batch_size=<global batch> when the batch is split over processes")
            global_batch = sl.stop
        return batch_indices(step, global_batch, len(self.pairs), self.seed)[sl]

    def __call__(self, student_x0, step: int, sl: slice) -> torch.Tensor:
        idx = self.indices(step, sl)
        device = self.family.device
        noise = self.pairs.noise[idx].to(device)
        t = torch.ones(len(idx), device=device)  # the student's first step starts from pure noise
        x0 = student_x0(noise, t, self.family.conditions(self.pairs.ids[idx]))
        with torch.no_grad():
            target = self.family.to_images(self.pairs.samples[idx].to(device))
        return self.lpips(self.family.to_images(x0), target)
