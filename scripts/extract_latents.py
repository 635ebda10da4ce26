#!/usr/bin/env python
"""Encode an image folder into SD-VAE latent shards with labels, for latent teachers (SiT, REPA on ImageNet 256).

    python scripts/extract_latents.py --data /data/imagenet/train --out data/in256_latents --flip
    accelerate launch --num_processes 8 scripts/extract_latents.py --data /data/imagenet/train --out data/in256_latents

--data: an ImageNet-style folder (one sub-folder per class; classes are the sorted sub-folder names, so ImageNet's
synset folders give the usual class ids 0..999) or a flat folder of images (no labels). Each image is centre-cropped
and resized as ADM and SiT do (halve with a box filter while the short side is at least twice the size, bicubic
resize of the short side to --image-size, centre crop), encoded by the VAE (posterior mean, or a seeded draw with
--posterior sample) and scaled by its scaling factor (0.18215). --flip adds the latents of the mirrored images.

Output: OUT/part-00000.npz ... (latents [n, 4, S/8, S/8] float16, labels, source indices) and OUT/latents.json (the
index, written last: a folder without it is an unfinished extraction). A rerun with the same settings resumes,
encoding only the missing shards; several processes (accelerate launch, torchrun) share the shards. OUT is what
gan.dataset / eval.reference of a latent distillation run take, and what dmd_dar.data.load_dataset reads.
"""
from __future__ import annotations

import os
from pathlib import Path

from dmd_dar.errors import ArgumentParser, UserError, cli_main

OWN = ("latents.json", "extract.json")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--data", required=True, help="image folder: one sub-folder per class, or images directly")
    p.add_argument("--out", required=True, help="output folder of latent shards")
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-ema", help="hub id, local folder, or 'tiny' (random, tests)")
    p.add_argument("--image-size", type=int, default=256, help="pixels (ADM/SiT centre crop); latents are size / 8")
    p.add_argument("--flip", action="store_true", help="also store the latents of horizontally flipped images")
    p.add_argument("--posterior", default="mean", choices=["mean", "sample"], help="posterior mean, or a seeded draw")
    p.add_argument("--seed", type=int, default=0, help="seed of the posterior draws (--posterior sample)")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="stored latent dtype")
    p.add_argument("--shard-size", type=int, default=4096, help="images per shard (the unit of resuming)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=None, help="only the first N images (per class with --per-class)")
    p.add_argument("--per-class", action="store_true", help="--limit counts per class (a class-balanced subset)")
    p.add_argument("--device", default=None, help="default: this process's GPU, else cpu")
    return p.parse_args(argv)


def list_images(folder: Path, limit: int | None, per_class: bool) -> tuple[list[Path], list[int] | None, list[str]]:
    from dmd_dar.image_io import image_files

    if not folder.is_dir():
        raise UserError(f"--data {folder}: no such folder")
    files = image_files(folder)
    if files:
        return files[:limit] if limit else files, None, []
    classes = sorted(d for d in folder.iterdir() if d.is_dir() and image_files(d))
    if not classes:
        raise UserError(f"--data {folder}: no PNG/JPEG images in it or in class sub-folders")
    files, labels = [], []
    for k, d in enumerate(classes):
        some = image_files(d)[:limit] if (limit and per_class) else image_files(d)
        files += some
        labels += [k] * len(some)
    if limit and not per_class:
        files, labels = files[:limit], labels[:limit]
    return files, labels, [d.name for d in classes]


def center_crop(path: Path, size: int):
    """ADM / SiT preprocessing of one file -> uint8 [size, size, 3]."""
    import numpy as np
    from PIL import Image

    from dmd_dar.image_io import as_rgb, read_image

    img = Image.fromarray(as_rgb(read_image(path)))
    while min(img.size) >= 2 * size:  # repeated halving first: a box filter, as ADM does
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.Resampling.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def shard_name(k: int) -> str:
    return f"part-{k:05d}.npz"


def dist_info() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


@cli_main
def main(argv=None) -> None:
    args = parse_args(argv)
    import numpy as np
    import torch

    from dmd_dar.checkpoint import atomic_write, check_replaceable, read_json, write_json
    from dmd_dar.data import LATENTS_FORMAT, LATENTS_INDEX
    from dmd_dar.image_io import from_uint8_nhwc
    from dmd_dar.t2i.vae import downsample_factor, encode_images, load_sd_vae, scaling_factor

    for name in ("image_size", "shard_size", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be >= 1")
    out = Path(args.out)
    try:
        check_replaceable(out, lambda n: n in OWN or (n.startswith("part-") and n.endswith(".npz")) or (n.startswith(".") and ".tmp-" in n),
                          "a previous latent extraction")
    except UserError as err:
        raise UserError(f"--out: {err}") from None
    files, labels, class_names = list_images(Path(args.data), args.limit, args.per_class)
    settings = dict(data=str(Path(args.data).resolve()), vae=args.vae, image_size=args.image_size, flip=args.flip,
                    posterior=args.posterior, seed=args.seed, dtype=args.dtype, shard_size=args.shard_size, files=len(files),
                    limit=args.limit, per_class=args.per_class)
    signature = out / "extract.json"
    if signature.is_file() and read_json(signature) != settings:
        raise UserError(f"--out {out} holds an extraction with other settings ({signature}); use another --out")
    rank, world, local_rank = dist_info()
    device = torch.device(args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    vae = load_sd_vae(args.vae, device)
    if args.image_size % downsample_factor(vae):
        raise UserError(f"--image-size {args.image_size} is not a multiple of the VAE's {downsample_factor(vae)} pixels per latent")
    if rank == 0:
        write_json(signature, settings)

    n_shards = (len(files) + args.shard_size - 1) // args.shard_size
    todo = [k for k in range(n_shards) if k % world == rank and not (out / shard_name(k)).is_file()]
    print(f"[{rank}/{world}] {len(files)} images, {n_shards} shards, {len(todo)} to encode here")
    dtype = np.float16 if args.dtype == "float16" else np.float32
    for k in todo:
        idx = list(range(k * args.shard_size, min(len(files), (k + 1) * args.shard_size)))
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + k)  # per shard: the same whichever process encodes it
        latents, flipped = [], []
        for start in range(0, len(idx), args.batch_size):
            batch = [files[i] for i in idx[start : start + args.batch_size]]
            pixels = from_uint8_nhwc(np.stack([center_crop(f, args.image_size) for f in batch]))
            with torch.no_grad():
                latents.append(encode_images(vae, pixels, args.posterior == "sample", g).cpu())
                if args.flip:  # the mirrored image, encoded (not the mirrored latent: the VAE is not mirror-symmetric)
                    flipped.append(encode_images(vae, pixels.flip(-1), args.posterior == "sample", g).cpu())
        z = torch.cat(latents + flipped)  # the shard's originals, then their mirrored copies
        y = np.array([labels[i] if labels else 0 for i in idx], dtype=np.int64)
        arrays = dict(latents=z.numpy().astype(dtype), labels=np.concatenate([y, y]) if args.flip else y,
                      index=np.array(idx + (idx if args.flip else []), dtype=np.int64),
                      flipped=np.array([0] * len(idx) + ([1] * len(idx) if args.flip else []), dtype=np.uint8))
        atomic_write(out / shard_name(k), lambda tmp, a=arrays: np.savez(tmp, **a))
        print(f"[{rank}/{world}] wrote {shard_name(k)} ({len(idx)} images)")

    if all((out / shard_name(k)).is_file() for k in range(n_shards)):  # the last process to finish writes the index
        count = len(files) * (2 if args.flip else 1)
        write_json(out / LATENTS_INDEX, dict(
            format=LATENTS_FORMAT, vae=args.vae, scaling_factor=scaling_factor(vae), image_size=args.image_size,
            latent_shape=[int(vae.config["latent_channels"]), args.image_size // downsample_factor(vae),
                          args.image_size // downsample_factor(vae)],
            count=count, labelled=labels is not None, num_classes=len(class_names) if labels is not None else 0,
            class_names=class_names, flip=args.flip, posterior=args.posterior, dtype=args.dtype,
            shards=[shard_name(k) for k in range(n_shards)], crop="adm_center_crop"))
        print(f"wrote {count} latents to {out}/ ({LATENTS_INDEX} + {n_shards} shards)")
    else:
        print(f"[{rank}/{world}] done; the index is written by the last process to finish")


if __name__ == "__main__":
    main()
