"""Where the one-step speckle comes from (issue 12 diagnostic): the background of a model's one-step x0 at t = 1.

For each model: the share of background pixels above 8/255 (`background_speckle`) and, on the background, the
correlation and regression slope of x0 on the input noise (a pixel-wise leak of the noise would show as both).

    .venv/bin/python eval/experiments/one_step_haze.py bundled runs/stage1_s0/dar/student --out haze.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from dmd_dar.diffusion import few_step_sample  # noqa: E402
from dmd_dar.dmd.family import DiTFamily  # noqa: E402
from dmd_dar.metrics.quality import SPECKLE_MARGIN, background_speckle  # noqa: E402


def haze(model_dir: str, n: int, seed: int) -> dict[str, float]:
    family = DiTFamily(model_dir, torch.device("cpu"))
    noise = torch.randn((n, *family.sample_shape), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        x = few_step_sample(family.denoiser(family.teacher()), noise, family.conditions(torch.arange(n) % family.num_conditions))
    size = 2 * SPECKLE_MARGIN + 1  # background_speckle's background: farther than the margin from any stroke
    background = torch.nn.functional.max_pool2d((x.clamp(-1, 1) + 1) / 2, size, 1, SPECKLE_MARGIN) < 0.5
    xb, zb = x[background], noise[background]
    return {"speckle": background_speckle(x.clamp(-1, 1)), "background_corr_with_noise": float(torch.corrcoef(torch.stack([xb, zb]))[0, 1]),
            "background_slope_on_noise": float(((xb - xb.mean()) * (zb - zb.mean())).mean() / zb.var()),
            "background_std": float(xb.std())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", help="DiT folders, or 'bundled'")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    rows = {m: haze(m, a.n, a.seed) for m in a.models}
    for m, r in rows.items():
        print(f"{m}: " + ", ".join(f"{k} {v:.4f}" for k, v in r.items()))
    Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
