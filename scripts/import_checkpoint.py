#!/usr/bin/env python
"""Import an official SiT or REPA checkpoint as a DiT folder that predicts in our conventions.

    python scripts/import_checkpoint.py --format sit --checkpoint SiT-XL-2-256.pt --out runs/teachers/sit_xl2
    python scripts/import_checkpoint.py --format repa --checkpoint last.pt --out runs/teachers/repa_sit_xl2

FILE is a bare state dict (SiT's released SiT-XL-2-256.pt) or a training checkpoint with "ema"/"model" keys (the
EMA weights are taken). The architecture is read from the tensors' shapes; --num-heads is needed only for widths
that are not an official size. The imported model predicts v = eps - x0 at our time t (t = 1 noise):
v(x, t, y) = -u_SiT(x, 1 - t, y)[:, :C] for SiT, REPA's own v for REPA. It denoises SD-VAE latents (scaled by
0.18215); --vae records which VAE decodes them (default stabilityai/sd-vae-ft-ema; "none": record none).
Anything that is not such a checkpoint stops with one line, exit status 2, and nothing written.
"""
from __future__ import annotations

from dmd_dar.errors import ArgumentParser, UserError, cli_main

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--format", required=True, choices=["sit", "repa"], help="which official code wrote FILE")
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="the .pt file")
    p.add_argument("--out", required=True, metavar="DIR", help="the DiT folder to write (config.json + model.safetensors)")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads (default: the official size of the width)")
    p.add_argument("--repa-depth", type=int, default=None,
                   help="REPA: the block whose output the projector reads (default: the checkpoint's args, else 8)")
    p.add_argument("--drop-projector", action="store_true", help="REPA: do not keep the projector head")
    p.add_argument("--vae", default=DEFAULT_VAE, help=f"VAE recorded for decoding (hub id, folder, 'tiny'; 'none'); default {DEFAULT_VAE}")
    return p.parse_args(argv)


@cli_main
def main(argv=None) -> None:
    args = parse_args(argv)
    from dmd_dar.checkpoint import check_replaceable
    from dmd_dar.models.importers import import_checkpoint

    try:
        check_replaceable(args.out, {"config.json", "model.safetensors"}, "a previous model folder")
    except UserError as err:
        raise UserError(f"--out: {err}") from None
    if args.format == "sit" and (args.repa_depth is not None or args.drop_projector):
        raise UserError("--repa-depth and --drop-projector are for --format repa")
    imported = import_checkpoint(args.checkpoint, args.format, args.out, num_heads=args.num_heads, repa_depth=args.repa_depth,
                                 drop_projector=args.drop_projector, vae=None if args.vae == "none" else args.vae,
                                 note=lambda line: print(f"note: {line}"))
    s = imported.source
    print(f"imported {args.format.upper()} ({s['weights']}): depth {s['depth']}, width {s['hidden_size']}, heads {s['heads']}, "
          f"patch {s['patch_size']}, input {s['input_size']}x{s['input_size']}x{s['in_channels']}, {s['num_classes']} classes, "
          f"learn_sigma {s['learn_sigma']} -> {args.out}")


if __name__ == "__main__":
    main()
