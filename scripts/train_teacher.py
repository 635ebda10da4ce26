#!/usr/bin/env python
"""Train a DiT teacher with flow matching.

    python scripts/train_teacher.py --config configs/teacher_mnist.yaml [key=value ...]
    accelerate launch --num_processes 2 scripts/train_teacher.py --config ... mixed_precision=bf16
"""
from dmd_dar.checkpoint import check_output_dir
from dmd_dar.config import parse_config_args
from dmd_dar.errors import cli_main
from dmd_dar.teacher.training import TeacherTrainConfig, train_teacher


@cli_main
def main() -> None:
    cfg = parse_config_args(__doc__, TeacherTrainConfig)
    check_output_dir(cfg.out_dir, "out_dir")  # before any work: not a file, not under one, writable
    folder = train_teacher(cfg)
    print(f"teacher written to {folder}")


if __name__ == "__main__":
    main()
