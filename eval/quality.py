"""In-domain quality of image sets: FD in the MNIST classifier's features (with the real-vs-real floor),
class accuracy, precision and recall; FID, KID, precision and recall in Inception features for other sets.

    python eval/quality.py runs/teacher_cfg2 runs/student/samples.npz --out quality.json
    python eval/quality.py twemoji_samples/ --reference twemoji32
    python eval/quality.py student=runs/x --kid                 # adds KID in Inception space (slow on a CPU)

SET: an image folder, an .npz (arr_0 uint8 NHWC), or a sampling run's folder (samples.npz + sample.json,
whose "labels" give class accuracy); NAME=PATH names it in the output. --reference: a dataset name
(mnist: its 10,000 held-out digits; --reference-split picks another split) or an image set. 1-channel
32x32 sets against a 1-channel 32x32 reference use the classifier space, others Inception (--space
overrides). Prints one line per set and writes all results to --out as JSON. The work is done by
dmd_dar.metrics.quality (see docs/quality.md).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor

from dmd_dar.checkpoint import check_output_file, read_json, write_json
from dmd_dar.data import DATASET_NAMES
from dmd_dar.errors import ArgumentParser, UserError, cli_main
from dmd_dar.image_io import SAMPLES_FILE, load_images, split_named_set
from dmd_dar.metrics.classifier import BUNDLED_CLASSIFIER, load_classifier
from dmd_dar.metrics.quality import NEAREST_K, SPACES, check_labels, evaluate_quality, load_reference
from dmd_dar.sampling import META_FILE
from dmd_dar.training import resolve_device


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sets", nargs="+", metavar="SET", help="image set (folder, .npz, or run folder), optionally NAME=PATH")
    parser.add_argument("--reference", default="mnist", help=f"dataset name ({', '.join(DATASET_NAMES)}) or image set")
    parser.add_argument("--reference-split", default="heldout", choices=("train", "heldout", "all"),
                        help="split of a named reference dataset")
    parser.add_argument("--out", default=None, help="write the results to this JSON file (atomically)")
    parser.add_argument("--kid", action="store_true", help="also KID in Inception space for classifier-space sets")
    parser.add_argument("--space", default="auto", choices=SPACES, help="feature space (auto: by image shape)")
    parser.add_argument("--k", type=int, default=NEAREST_K, help="k of the k-NN manifolds of precision and recall")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images of each set")
    parser.add_argument("--seed", type=int, default=0, help="seed of the reference subsets and of KID's subsets")
    parser.add_argument("--classifier", default=None, help=f"classifier folder (default: {BUNDLED_CLASSIFIER.name} bundled)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return parser


def read_set(spec: str, limit: int | None, num_classes: int) -> tuple[str, Tensor, Tensor | None, str]:
    """(name, images, labels or None, path) of NAME=PATH or PATH; labels from a run folder's sample.json."""
    name, path = split_named_set(spec)
    images = load_images(path)
    meta_file = Path(path) / META_FILE
    labels = None
    if Path(path).is_dir() and (Path(path) / SAMPLES_FILE).is_file() and meta_file.is_file():
        raw = read_json(meta_file)
        raw = raw.get("labels") if isinstance(raw, dict) else None
        if raw is not None:
            if not isinstance(raw, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in raw):
                raise UserError(f"{meta_file}: 'labels' must be a list of integer classes")
            if len(raw) != len(images):
                raise UserError(f"{meta_file}: 'labels' has {len(raw)} entries for {len(images)} images in {SAMPLES_FILE}; "
                                "the run folder is inconsistent, sample it again")
            labels = check_labels(torch.tensor(raw, dtype=torch.long), len(images), num_classes, f"{meta_file} labels")
    if limit is not None:
        images, labels = images[:limit], (labels[:limit] if labels is not None else None)
    return name, images, labels, path


def summary_line(name: str, result: dict) -> str:
    parts = [f"{name}: n={result['n']} [{result['space']}]"]
    if "fd" in result:
        floor = f" (floor {result['fd_floor']:.3f}, {result['fd_to_floor']:.2f}x)" if "fd_floor" in result else ""
        parts.append(f"FD {result['fd']:.3f}{floor}")
    if "fid" in result:
        parts.append(f"FID {result['fid']:.2f}")
    if "accuracy" in result:
        parts.append(f"accuracy {result['accuracy']:.4f}")
    parts.append(f"precision {result['precision']:.3f} recall {result['recall']:.3f}")
    if "kid" in result:
        spread = f" ± {result['kid_std']:.5f}" if "kid_std" in result else ""
        parts.append(f"KID {result['kid']:.5f}{spread}")
    parts.append(f"({result['seconds']:.1f} s)")
    return "  ".join(parts)


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.device = str(resolve_device(args.device))  # an unavailable device: one line, before any work
    if args.limit is not None and args.limit <= args.k:
        raise UserError(f"--limit must be more than --k ({args.k}), got {args.limit}")
    if args.k < 1:
        raise UserError(f"--k must be positive, got {args.k}")
    if args.out is not None:
        check_output_file(args.out, "--out")  # not a folder, its folder writable: before any work
    # load and check everything first: a bad input ends the run before any work and writes nothing
    classifier = load_classifier(args.classifier, device=args.device)
    reference = load_reference(args.reference, split=args.reference_split)
    sets = [read_set(spec, args.limit, classifier.config["num_classes"]) for spec in args.sets]
    names = [name for name, *_ in sets]
    if len(set(names)) != len(names):
        raise UserError(f"two sets share a name ({', '.join(names)}); name them NAME=PATH")
    results = {}
    for name, images, labels, path in sets:
        result = evaluate_quality(images, labels, reference, space=args.space, kid=args.kid, k=args.k,
                                  seed=args.seed, device=args.device, classifier=classifier)
        results[name] = {"path": path, **result}
        print(summary_line(name, result), flush=True)
    if args.out is not None:
        accuracy = classifier.record.get("heldout_accuracy")
        write_json(args.out, {
            "reference": reference.name,
            "classifier": {"folder": str(args.classifier or BUNDLED_CLASSIFIER), "heldout_accuracy": accuracy},
            "sets": results,
        })
        print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
