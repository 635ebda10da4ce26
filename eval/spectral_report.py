"""Spectral-detail report over image files: how much high-frequency detail each candidate set keeps.

    python eval/spectral_report.py --reference data/real.npz \
        --candidate teacher_50step=runs/x/teacher_samples --candidate student_1step=runs/x/samples.npz \
        --out runs/x/spectral_report

Image sets: a folder of PNGs, an .npz with arr_0 (uint8 NHWC), or a sampling run's folder holding
samples.npz. Writes metrics.json, report.md and a self-contained report.html (see docs/spectral.md).
The work is done by dmd_dar.spectral.report.write_report; this file only parses arguments and loads files.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dmd_dar.checkpoint import check_replaceable
from dmd_dar.errors import ArgumentParser, UserError, cli_main
from dmd_dar.image_io import load_images
from dmd_dar.spectral import CHANNEL_MODES, DEFAULT_CUTOFFS, DEFAULT_WINDOW, WINDOWS
from dmd_dar.spectral.report import HEADLINE_CUTOFF, OUTPUT_FILES, PREVIOUS_OUTPUT, write_report


def _parse_candidate(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise UserError(f"--candidate expects NAME=PATH (e.g. student_1step=runs/x/samples.npz), got {text!r}")
    return name.strip(), path.strip()


def _parse_floats(text: str, option: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{option} expects comma-separated numbers (e.g. 0.125,0.25,0.375), got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, help="reference image set (folder, .npz, or run folder)")
    parser.add_argument("--reference-name", default="reference", help="label of the reference in the report")
    parser.add_argument("--candidate", action="append", required=True, metavar="NAME=PATH",
                        help="candidate image set; repeat for several")
    parser.add_argument("--out", required=True, help="output folder (created; a previous report there is replaced)")
    parser.add_argument("--cutoffs", default=",".join(f"{c:g}" for c in DEFAULT_CUTOFFS),
                        help="HF cutoffs in cycles/pixel, comma-separated")
    parser.add_argument("--window", default=DEFAULT_WINDOW, choices=WINDOWS)
    parser.add_argument("--channels", default="mean", choices=CHANNEL_MODES,
                        help="average the spectra of the channels, or use the luminance")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images of each set")
    parser.add_argument("--title", default="Spectral detail report")
    return parser


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.bootstrap < 1:
        raise UserError(f"--bootstrap {args.bootstrap}: give at least 1 resample (1000 for the reported intervals)")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit}: must be a positive number of images")
    cutoffs = _parse_floats(args.cutoffs, "--cutoffs")
    candidates = [_parse_candidate(text) for text in args.candidate]
    names = [args.reference_name] + [name for name, _ in candidates]
    if len(set(names)) != len(names):
        raise UserError(f"set names must be unique, got {names}")
    try:
        check_replaceable(args.out, OUTPUT_FILES, PREVIOUS_OUTPUT)  # before loading and measuring
    except UserError as err:
        raise UserError(f"--out: {err}") from None
    reference = load_images(args.reference, args.limit)
    images = {name: load_images(path, args.limit) for name, path in candidates}
    sources = {args.reference_name: args.reference, **dict(candidates)}
    metrics = write_report(
        reference, images, args.out,
        reference_name=args.reference_name, sources=sources, title=args.title,
        cutoffs=cutoffs, window=args.window, channels=args.channels,
        num_bootstrap=args.bootstrap, seed=args.seed,
    )
    cutoffs = metrics["settings"]["cutoffs_cycles_per_pixel"]
    key = f"{min(cutoffs, key=lambda c: abs(c - HEADLINE_CUTOFF)):g}"
    for name, res in metrics["candidates"].items():
        ci = res["hf_retention_ci"][key]
        print(f"{name}: HF retention (f > {key}) {res['hf_retention'][key]:.3f} "
              f"[{ci['low']:.3f}, {ci['high']:.3f}], LSD {res['log_spectral_distance_db']:.2f} dB")
    print(f"report: {Path(args.out) / 'report.html'}")


if __name__ == "__main__":
    main()
