#!/usr/bin/env python
"""Train a DiT teacher with flow matching.

    python scripts/train_teacher.py --config configs/teacher_mnist.yaml [key=value ...]
    accelerate launch --num_processes 2 scripts/train_teacher.py --config ... mixed_precision=bf16
"""
import argparse

from dmd_dar.config import load_config
from dmd_dar.errors import cli_main
from dmd_dar.teacher_training import TeacherTrainConfig, train_teacher


@cli_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=100 model.routing.mode=dar")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides, TeacherTrainConfig)
    folder = train_teacher(cfg)
    print(f"teacher written to {folder}")


if __name__ == "__main__":
    main()
