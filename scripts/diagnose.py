#!/usr/bin/env python
"""Cross-layer information-flow diagnostics of a DiT checkpoint (the paper's §3 measurements).

    python scripts/diagnose.py --checkpoint runs/teacher/teacher --out runs/diag
    python scripts/diagnose.py --checkpoint bundled --compare runs/student/student --out runs/diag_cmp

Writes OUT/diagnostics.json (OUT/diagnostics_compare.json with --compare) and the plots heatmaps.png,
depth_curves.png, maps.png (maps_compare.png) and probe.png. See docs/diagnostics.md for how to read them.
"""
from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from dmd_dar.checkpoint import atomic_dir, check_replaceable, write_json
from dmd_dar.dmd.family import BUNDLED_TEACHER, resolve_dit_teacher
from dmd_dar.errors import ArgumentParser, UserError, cli_main
from dmd_dar.metrics.diagnostics import DEFAULT_T_POINTS, diagnose
from dmd_dar.models import DiT
from dmd_dar.training import resolve_device

OUTPUT_FILES = frozenset({"diagnostics.json", "diagnostics_compare.json", "heatmaps.png", "depth_curves.png", "maps.png",
                          "maps_compare.png", "probe.png"})
PREVIOUS_OUTPUT = "a previous diagnosis"
CURVE_TIMES = (0.2, 0.5, 0.8)  # depth curves are drawn at the grid points nearest to these t
MAX_MAPS = 4  # routing / importance maps drawn per model (the JSON keeps every chosen sublayer)


def resolve_checkpoint(name: str, flag: str) -> Path:
    """A DiT folder or 'bundled' (the teacher shipped in dmd_dar/assets), found as the trainer finds its teacher."""
    try:
        return resolve_dit_teacher(name)
    except UserError:
        if name == "bundled":
            raise UserError(f"{flag} bundled: the bundled teacher is not in {BUNDLED_TEACHER}; train it with "
                            f"scripts/train_teacher.py or pass {flag} DIR") from None
        raise UserError(f"{flag} {name}: no model.safetensors there; pass a DiT folder (config.json + "
                        "model.safetensors, e.g. from scripts/train_teacher.py) or 'bundled'") from None


def load_images(dataset: str, model: DiT, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Held-out real images at the model's resolution, or `gaussian`: clipped N(0, 1) images (smoke tests)."""
    shape = (model.in_channels, model.input_size, model.input_size)
    if dataset == "gaussian":
        noise = torch.randn(count, *shape, generator=torch.Generator().manual_seed(seed + 1))
        return noise.clamp(-1, 1), None
    from dmd_dar.data import load_dataset  # here: the gaussian smoke test needs no image libraries
    data = load_dataset(dataset, split="heldout", image_size=model.input_size)
    images, labels = data.images, data.labels
    if tuple(images.shape[1:]) != shape:
        raise UserError(f"dataset {dataset} gives {list(images.shape[1:])} images but the model expects {list(shape)}; "
                        "pick the dataset the checkpoint was trained on")
    return images, labels


def parse_sublayers(text: str | None) -> list | None:
    if text is None:
        return None
    try:
        return [item if item == "final" else int(item) for item in text.split(",") if item]
    except ValueError:
        raise UserError(f"--sublayers {text!r}: give a comma list of sublayer numbers and/or 'final', e.g. 1,6,12,final") from None


def load_checkpoint(folder: Path, flag: str) -> DiT:
    """The model of `folder`, refused in one line when its weights hold NaN or inf (a diverged run)."""
    model = DiT.from_pretrained(folder)
    bad = [name for name, p in model.state_dict().items() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if bad:
        raise UserError(f"{flag} {folder}: non-finite weights ({', '.join(bad[:3])}); the run that wrote it diverged, "
                        "diagnose another checkpoint")
    return model


def check_args(args) -> None:
    """Every number and list of the command line, before a model is loaded."""
    for flag, value, low in (("--n", args.n, 3), ("--t-grid", args.t_grid, 2), ("--batch-size", args.batch_size, 1),
                             ("--threads", args.threads, 1)):
        if value is not None and value < low:
            raise UserError(f"{flag} {value}: must be at least {low}")
    parse_sublayers(args.sublayers)


def run_one(model: DiT, folder: Path, args, device: torch.device) -> dict:
    model = model.to(device)
    images, labels = load_images(args.dataset, model, args.n, args.seed)
    if len(images) < args.n:
        raise UserError(f"{args.dataset} held-out split has {len(images)} images, fewer than --n {args.n}; lower --n")
    start = time.perf_counter()
    result = diagnose(model, images, labels, t_grid=args.t_grid, num_samples=args.n, batch_size=args.batch_size,
                      sublayers=parse_sublayers(args.sublayers), seed=args.seed)
    result["run"] = {
        "checkpoint": str(folder), "dataset": args.dataset, "device": str(device),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads", "wall_time_s": round(time.perf_counter() - start, 2),
    }
    return result


def model_label(result: dict) -> str:
    routing = result["routing"]
    mode = routing["mode"] if routing["mode"] == "residual" else f"dar {routing.get('query', '')} S={routing.get('chunk_size', '')}"
    path = Path(result["run"]["checkpoint"])
    return f"{path.parent.name}/{path.name} ({mode})" if path.parent.name else f"{path.name} ({mode})"


# ------------------------------------------------------------------------------------------ plots
def _heat(ax, fig, matrix, ts, rows, title, log=False, row_label="block", from_zero=False):
    import numpy as np

    data = np.asarray(matrix, dtype=float)
    if log:
        data = np.log10(np.maximum(data, 1e-30))
    # Weights and importances are read against zero (a uniform map then shows as one flat colour).
    limits = dict(vmin=0.0, vmax=max(float(data.max()), 1e-30)) if from_zero else {}
    image = ax.imshow(data, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis", **limits)
    ax.set_xticks(range(len(ts)), [f"{t:.1f}" for t in ts], fontsize=7)
    ax.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize=7)
    ax.set_xlabel("t (1 = noise)")
    ax.set_ylabel(row_label)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax)


def plot_heatmaps(results, path):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 3, figsize=(15, 4 * len(results)), squeeze=False)
    for row, result in zip(axes, results):
        ts, label = result["t_grid"], model_label(result)
        _heat(row[0], fig, result["rms"], ts, result["blocks"], f"{label}\nlog10 RMS(z_k)", log=True)
        _heat(row[1], fig, result["grad_rms"], ts, result["blocks"], f"{label}\nlog10 RMS(dL/dz_k)", log=True)
        _heat(row[2], fig, result["cosine"], ts, [p[0] for p in result["cosine_pairs"]], f"{label}\ncos(z_k, z_k+1)",
              row_label="k (pair k, k+1)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_depth_curves(results, path):
    import matplotlib.pyplot as plt

    panels = [("rms", "RMS(z_k)", True), ("grad_rms", "RMS(dL/dz_k)", True),
              ("output_grad_rms", "RMS(dL/d block output)", True), ("cosine", "cos(z_k, z_k+1)", False)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for style, result in zip(("-", "--", ":"), results):
        ts = result["t_grid"]
        picks = sorted({min(range(len(ts)), key=lambda j: abs(ts[j] - c)) for c in CURVE_TIMES})
        for ax, (key, title, log) in zip(axes, panels):
            depth = [p[0] for p in result["cosine_pairs"]] if key == "cosine" else result["blocks"]
            for color, j in zip(colors, picks):
                ax.plot(depth, [row[j] for row in result[key]], style, color=color, marker="o", markersize=3,
                        label=f"{model_label(result)}, t={ts[j]:.1f}")
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("block k")
            ax.xaxis.get_major_locator().set_params(integer=True)
            if log:
                ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _spread(keys, count):
    """Up to `count` keys evenly spread, always keeping the last (the final aggregator). Sublayer 1 reads
    only the embedding (a trivial map), so it is shown only when nothing else is there."""
    keys = [k for k in keys if k != "1"] or keys
    if len(keys) <= count:
        return list(keys)
    step = (len(keys) - 1) / (count - 1)
    return [keys[round(i * step)] for i in range(count)]


def plot_maps(result, path):
    """DAR: routing weights alpha_{i->l}(t); residual: counterfactual importance |dL/dg| per source."""
    import matplotlib.pyplot as plt

    ts = result["t_grid"]
    if "routing_maps" in result:
        maps = result["routing_maps"]
        entries = [(f"alpha -> {'head' if k == 'final' else f'sublayer {k}'}", maps[k]["weights"], maps[k]["sources"])
                   for k in _spread(list(maps), MAX_MAPS)]
    else:
        imp = result["importance"]
        entries = [("|dL/dg| shared gate per source", imp["gate_grad_abs"], imp["sources"])]
        sub = imp["sublayers"]
        entries += [(f"|dL/dg| -> {'head' if k == 'final' else f'sublayer {k}'}", sub[k]["gate_grad_abs"], sub[k]["sources"])
                    for k in _spread(list(sub), MAX_MAPS - 1)]
    fig, axes = plt.subplots(1, len(entries), figsize=(4.5 * len(entries), 5), squeeze=False)
    for ax, (title, matrix, sources) in zip(axes[0], entries):
        _heat(ax, fig, matrix, ts, sources, title, row_label="source", from_zero=True)
    fig.suptitle(model_label(result), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_probe(results, path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for style, result in zip(("-", "--", ":"), results):
        probe = result["probe"]
        line, = ax.plot([0] + probe["blocks"], [probe["embedding_r2"]] + probe["r2"], style, marker="o",
                        label=f"{model_label(result)}")
        ax.axhline(probe["x_t_baseline_r2"], color=line.get_color(), linestyle=":", linewidth=1,
                   label=f"raw x_t baseline ({probe['x_t_baseline_r2']:.2f})")
    ax.set_xlabel("depth (0 = embedding, k = state after block k)")
    ax.set_ylabel("test R^2 of t (ridge)")
    ax.set_ylim(min(-0.05, ax.get_ylim()[0]), 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main
@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="DiT folder (config.json + model.safetensors) or 'bundled'")
    parser.add_argument("--out", required=True, help="output folder (written atomically; replaces only a previous diagnosis)")
    parser.add_argument("--compare", help="a second DiT folder (or 'bundled') overlaid in the depth curves")
    parser.add_argument("--n", type=int, default=64, help="(image, noise) pairs, each used at every t")
    parser.add_argument("--t-grid", type=int, default=DEFAULT_T_POINTS, help="number of t values in [0, 1]")
    parser.add_argument("--dataset", default="mnist", help="held-out images (dmd_dar.data) or 'gaussian' (smoke test)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--sublayers", help="routing/importance maps to keep, e.g. 1,6,12,final (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a busy 2-core machine)")
    args = parser.parse_args(argv)
    args.device = str(resolve_device(args.device))  # an unavailable device: one line, before any work
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)

    import matplotlib

    matplotlib.use("Agg")
    device = torch.device(args.device)
    try:
        check_replaceable(args.out, OUTPUT_FILES, PREVIOUS_OUTPUT)  # before the (slow) diagnosis
    except UserError as err:
        raise UserError(f"--out: {err}") from None
    flags = {"--checkpoint": args.checkpoint, **({"--compare": args.compare} if args.compare else {})}
    folders = {flag: resolve_checkpoint(name, flag) for flag, name in flags.items()}
    models = {flag: load_checkpoint(folder, flag) for flag, folder in folders.items()}  # all of them, before any work
    results = [run_one(models[flag], folder, args, device) for flag, folder in folders.items()]

    with atomic_dir(args.out, OUTPUT_FILES, PREVIOUS_OUTPUT) as tmp:
        write_json(tmp / "diagnostics.json", results[0])
        if len(results) == 2:
            write_json(tmp / "diagnostics_compare.json", results[1])
        plot_heatmaps(results, tmp / "heatmaps.png")
        plot_depth_curves(results, tmp / "depth_curves.png")
        for suffix, result in zip(("", "_compare"), results):
            plot_maps(result, tmp / f"maps{suffix}.png")
        plot_probe(results, tmp / "probe.png")
    for result in results:
        probe = result["probe"]
        print(f"{model_label(result)}: {result['run']['wall_time_s']} s; RMS(z) {result['rms'][0][-1]:.3g} -> "
              f"{result['rms'][-1][-1]:.3g} at t={result['t_grid'][-1]:.1f}; probe R^2 last block {probe['r2'][-1]:.3f} "
              f"(raw x_t {probe['x_t_baseline_r2']:.3f})")
    print(f"diagnostics written to {args.out}")


if __name__ == "__main__":
    main()
