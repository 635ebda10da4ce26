#!/usr/bin/env python
"""Precompute the noise -> teacher-ODE-output pairs of the DMD (v1) regression loss (docs/regression.md).

    python scripts/make_regression_pairs.py --config configs/default.yaml --n 1024 --out runs/pairs.npz
    python scripts/distill.py --config configs/default.yaml regression.enabled=true regression.pairs=runs/pairs.npz

The teacher, family, sampler (eval.teacher_sampler, eval.teacher_steps) and guidance (dm.guidance_scale) come
from the distill config, so the pairs match the teacher the student is distilled from.
"""
import time

import torch
from tqdm.auto import tqdm

from dmd_dar.checkpoint import check_output_file
from dmd_dar.config import load_config
from dmd_dar.dmd.config import DistillConfig
from dmd_dar.dmd.family import make_family
from dmd_dar.dmd.regression import make_pairs
from dmd_dar.errors import ArgumentParser, UserError, cli_main


@cli_main
def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="the distill YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the distill config, e.g. teacher=<folder>")
    parser.add_argument("--n", type=int, default=1024, help="number of pairs")
    parser.add_argument("--out", required=True, help="output .npz")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fixed noises")
    parser.add_argument("--batch", type=int, default=64, help="teacher batch size")
    args = parser.parse_args()
    if args.n < 1 or args.batch < 1:
        raise UserError(f"--n={args.n} and --batch={args.batch} must both be >= 1")
    check_output_file(args.out, "--out", suffix=".npz")  # before the teacher's ODE runs
    cfg = load_config(args.config, args.overrides, DistillConfig)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    family = make_family(cfg.backbone, cfg.teacher, device, cfg.t2i)

    t0 = time.time()
    with tqdm(total=args.n, desc="teacher ODE", unit="pair") as bar:
        pairs = make_pairs(family, args.n, args.seed, cfg.eval.teacher_sampler, cfg.eval.teacher_steps,
                           cfg.dm.guidance_scale, batch=args.batch, progress=lambda done: bar.update(done - bar.n))
    pairs.meta.update(teacher=cfg.teacher, backbone=cfg.backbone)
    pairs.save(args.out)
    print(f"wrote {len(pairs)} pairs of shape {list(pairs.sample_shape)} to {args.out} "
          f"({cfg.eval.teacher_sampler}, {cfg.eval.teacher_steps} steps, guidance {cfg.dm.guidance_scale}; "
          f"{time.time() - t0:.1f}s)")


if __name__ == "__main__":
    main()
