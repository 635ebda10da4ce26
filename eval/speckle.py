"""Background speckle of digit sets (`dmd_dar.metrics.quality.background_speckle`): the share of background
pixels (farther than 2 px from the strokes) brighter than 8/255. Real held-out MNIST: 2e-6.

    python eval/speckle.py [NAME=]SET [...] [--out results.json]    (SET: .npz, image folder or sampling-run folder)
"""
from __future__ import annotations

from dmd_dar.checkpoint import check_output_file, write_json
from dmd_dar.errors import ArgumentParser, cli_main
from dmd_dar.image_io import load_images, split_named_set
from dmd_dar.metrics.quality import background_speckle


@cli_main
def main(argv=None) -> None:
    parser = ArgumentParser(description="Background speckle of digit image sets.")
    parser.add_argument("sets", nargs="+", metavar="SET", help="image set (.npz, folder, run folder), optionally NAME=PATH")
    parser.add_argument("--out", help="write {name: share} to this JSON file (atomically)")
    args = parser.parse_args(argv)
    if args.out:
        check_output_file(args.out)
    images = {name: load_images(path) for name, path in map(split_named_set, args.sets)}  # every input read before anything is written
    shares = {name: background_speckle(x) for name, x in images.items()}
    for name, share in shares.items():
        print(f"speckle[{name}]: {100 * share:.2f}% of background pixels above 8/255 (n={len(images[name])})")
    if args.out:
        write_json(args.out, shares)


if __name__ == "__main__":
    main()
