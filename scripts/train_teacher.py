#!/usr/bin/env python
"""Train a DiT teacher with flow matching.

    python scripts/train_teacher.py --config configs/teacher_mnist.yaml [key=value ...]
    accelerate launch --num_processes 2 scripts/train_teacher.py --config ... mixed_precision=bf16
"""
from dmd_dar.config import parse_config_args
from dmd_dar.errors import cli_main
from dmd_dar.teacher.training import TeacherTrainConfig, train_teacher


@cli_main
def main() -> None:
    folder = train_teacher(parse_config_args(__doc__, TeacherTrainConfig))
    print(f"teacher written to {folder}")


if __name__ == "__main__":
    main()
