"""Throughput of the spectral evaluator (images/s) on the CPU: radial spectrum + HF energies + bands.

    python eval/bench_spectral.py                 # 32x32 and 256x256 RGB, 2 threads
    python eval/bench_spectral.py --threads 1 --sizes 32,64 --repeats 5

Times `spectral_statistics` (the pass every metric uses: input checks, window, rfft2, radial binning) and
`compare_spectra` (two such passes plus the comparison). Prints one line per case and the machine; the
targets (issue 5) are 5,000 images/s at 32x32 and 200 images/s at 256x256 on 2 CPU cores.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import time
from pathlib import Path

import torch

from dmd_dar.errors import ArgumentParser, UserError, cli_main
from dmd_dar.spectral import compare_spectra, spectral_statistics

TARGETS = {32: 5000, 256: 200}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _best_time(fn, repeats: int) -> float:
    fn()  # warm-up: builds the cached frequency layout, page-faults the buffers
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="32,256", help="square image sizes, comma-separated")
    parser.add_argument("--count", default=None, help="images per size, comma-separated (default 5000 at <=64, else 200)")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
        counts = [int(c) for c in args.count.split(",")] if args.count else [5000 if s <= 64 else 200 for s in sizes]
    except ValueError:
        raise UserError(f"--sizes/--count expect comma-separated integers, got {args.sizes!r} / {args.count!r}") from None
    if len(counts) != len(sizes):
        raise UserError("--count needs one number per size")
    if min(sizes) < 4:
        raise UserError(f"--sizes {args.sizes}: each size must be at least 4 pixels")
    if min(counts) < 1:
        raise UserError(f"--count {args.count}: each count must be at least 1")
    if not 1 <= args.channels <= 4:
        raise UserError(f"--channels {args.channels}: must be 1 to 4 (grey, RGB, RGBA)")
    for flag, value in (("--threads", args.threads), ("--repeats", args.repeats)):
        if value < 1:
            raise UserError(f"{flag} {value}: must be a positive integer")
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {_dt.date.today()}  {_cpu_name()}, {os.cpu_count()} logical CPUs visible, torch threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}, Python {platform.python_version()}, "
          f"1-min load average {load:.1f}")
    generator = torch.Generator().manual_seed(0)
    for size, count in zip(sizes, counts):
        images = torch.rand(count, args.channels, size, size, generator=generator) * 2 - 1
        other = images.flip(0)
        stats_s = _best_time(lambda: spectral_statistics(images), args.repeats)
        compare_s = _best_time(lambda: compare_spectra(images, other), args.repeats)
        target = TARGETS.get(size)
        verdict = "" if target is None else f"  (target {target}/s: {'met' if count / stats_s >= target else 'NOT met'})"
        print(f"{size}x{size}x{args.channels}  N={count}: spectral_statistics {count / stats_s:,.0f} images/s; "
              f"compare_spectra {2 * count / compare_s:,.0f} images/s{verdict}")


if __name__ == "__main__":
    main()
