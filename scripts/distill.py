#!/usr/bin/env python
"""Distill a teacher into a one- or K-step student with DMD (DAR or residual routing).

    python scripts/distill.py --config configs/default.yaml [key=value ...]
    accelerate launch --num_processes 8 scripts/distill.py --config configs/dmd_sd3.yaml teacher=/data/sd3
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 scripts/distill.py --config configs/default.yaml
"""
from dmd_dar.config import parse_config_args
from dmd_dar.dmd.config import DistillConfig
from dmd_dar.dmd.trainer import run_distillation
from dmd_dar.errors import cli_main


@cli_main
def main() -> None:
    cfg = parse_config_args(__doc__, DistillConfig)
    summary = run_distillation(cfg)
    print(f"done: {cfg.out_dir} (students: {', '.join(summary.get('arms', {}))})")


if __name__ == "__main__":
    main()
