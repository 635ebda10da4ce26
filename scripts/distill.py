#!/usr/bin/env python
"""Distill a teacher into a one- or K-step student with DMD (DAR or residual routing).

    python scripts/distill.py --config configs/default.yaml [key=value ...]
    accelerate launch --num_processes 2 scripts/distill.py --config configs/default.yaml
"""
import argparse

from dmd_dar.config import load_config
from dmd_dar.distill import DistillConfig, run_distillation
from dmd_dar.errors import cli_main


@cli_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=100 student.routing.mode=residual")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides, DistillConfig)
    summary = run_distillation(cfg)
    print(f"done: {cfg.out_dir} (students: {', '.join(summary.get('arms', {}))})")


if __name__ == "__main__":
    main()
