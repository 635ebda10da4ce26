#!/usr/bin/env python
"""Train the MNIST digit classifier behind the in-domain quality metrics (see docs/quality.md).

    python scripts/train_classifier.py                     # writes dmd_dar/assets/mnist_classifier
    python scripts/train_classifier.py --out /tmp/clf --epochs 1

Seeded and reproducible on one thread: the same arguments give the same weights. Trains on the 60,000
MNIST training digits with random affine augmentation, measures accuracy once on the 10,000 held-out
digits (never used for any choice during training) and writes config.json + model.safetensors atomically,
with the accuracy and the recipe in config.json. Refuses to write a classifier below --min-accuracy.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from dmd_dar.checkpoint import CONFIG_NAME, WEIGHTS_NAME, check_replaceable
from dmd_dar.data import load_dataset
from dmd_dar.errors import ArgumentParser, UserError, cli_main
from dmd_dar.metrics.classifier import BUNDLED_CLASSIFIER, DigitClassifier, save_classifier

CLASSIFIER_FILES = {CONFIG_NAME, WEIGHTS_NAME}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(BUNDLED_CLASSIFIER), help="output folder (replaced atomically)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: reproducible, shares the machine)")
    parser.add_argument("--min-accuracy", type=float, default=0.99, help="do not write a classifier below this held-out accuracy")
    return parser


def augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """Random rotation (+-10 deg), scale (0.9-1.1) and shift (+-2 px) per image; background stays -1."""
    n = images.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(10)
    scale = 0.9 + 0.2 * torch.rand(n, generator=generator)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 * 2 / images.shape[-1])  # 2 px in [-1, 1] coordinates
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # grid_sample pads with 0: sample (x + 1) so the padding is the background value -1 after the shift back
    return F.grid_sample(images + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


@torch.no_grad()
def accuracy(model: DigitClassifier, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    model.eval()
    correct = sum(
        int((model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum())
        for i in range(0, len(images), batch_size)
    )
    return correct / len(images)


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size), ("--threads", args.threads)):
        if value < 1:
            raise UserError(f"{flag} {value}: must be a positive integer")
    if not 0 < args.lr <= 1:
        raise UserError(f"--lr {args.lr}: must be in (0, 1] (AdamW; the recipe uses 3e-3)")
    if not args.weight_decay >= 0:
        raise UserError(f"--weight-decay {args.weight_decay}: must be >= 0")
    if not 0 <= args.min_accuracy <= 1:
        raise UserError(f"--min-accuracy {args.min_accuracy}: must be a fraction in [0, 1]")
    try:  # before the minutes of training: the folder is replaced only when it holds a classifier (or nothing)
        check_replaceable(args.out, CLASSIFIER_FILES, "a classifier")
    except UserError as err:
        raise UserError(f"--out: {err}") from None
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train, heldout = load_dataset("mnist", split="train"), load_dataset("mnist", split="heldout")
    model = DigitClassifier()
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        total = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * args.batch_size : (step + 1) * args.batch_size]
            loss = F.cross_entropy(model(augment(train.images[idx], generator)), train.labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        elapsed = time.time() - start
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {total / steps_per_epoch:.4f}  ({elapsed:.0f} s)", flush=True)
    heldout_accuracy = accuracy(model, heldout.images, heldout.labels)
    train_seconds = time.time() - start
    print(f"held-out accuracy {heldout_accuracy:.4f} on {len(heldout)} digits; trained in {train_seconds:.0f} s")
    if heldout_accuracy < args.min_accuracy:
        raise UserError(
            f"held-out accuracy {heldout_accuracy:.4f} is below --min-accuracy {args.min_accuracy}; train longer (--epochs)"
        )
    record = {
        "heldout_accuracy": heldout_accuracy,
        "heldout_digits": len(heldout),
        "training": {
            "data": "mnist train (60000 digits), random affine augmentation",
            "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
            "weight_decay": args.weight_decay, "seed": args.seed, "threads": args.threads,
            "seconds": round(train_seconds),
        },
    }
    save_classifier(model.eval(), args.out, record)
    print(f"classifier written to {args.out}")


if __name__ == "__main__":
    main()
