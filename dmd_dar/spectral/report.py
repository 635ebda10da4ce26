"""Spectral-detail report: metrics.json, report.md and a self-contained report.html with plots.

`write_report(reference, {"name": images, ...}, out_dir)` is what the distillation trainer calls at the
end of a run (reference = held-out real data or the teacher's multi-step samples); `eval/spectral_report.py`
is the command-line front end over files. The output folder appears complete or not at all: everything is
written into a temporary sibling folder that is renamed into place at the end.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dmd_dar.checkpoint import atomic_dir, check_replaceable
from dmd_dar.errors import UserError
from dmd_dar.spectral import (
    DEFAULT_BAND_EDGES,
    DEFAULT_CUTOFFS,
    DEFAULT_SLOPE_FIT_RANGE,
    DEFAULT_WINDOW,
    LUMINANCE_WEIGHTS,
    SpectralInputError,
    bootstrap_hf_retention,
    compare_statistics,
    high_pass,
    spectral_statistics,
    validate_images,
)

REPORT_FILES = ("metrics.json", "report.md", "report.html")
FIGURE_FILES = ("spectra.png", "band_ratios.png", "hf_retention.png", "examples.png")
# An existing output folder is replaced only when it holds nothing but these (a previous report).
OUTPUT_FILES = frozenset(REPORT_FILES + FIGURE_FILES)
PREVIOUS_OUTPUT = "a previous report"
# The cutoff the summary table and the CLI's last line lead with.
HEADLINE_CUTOFF = 0.25
REFERENCE_COLOR = "black"
# Images larger than this are shown as a central crop in the example strip, so detail stays visible.
EXAMPLE_CROP = 64


def write_report(
    reference: Any,
    candidates: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    reference_name: str = "reference",
    sources: Mapping[str, str] | None = None,
    title: str = "Spectral detail report",
    cutoffs: Sequence[float] = DEFAULT_CUTOFFS,
    band_edges: Sequence[float] = DEFAULT_BAND_EDGES,
    window: str = DEFAULT_WINDOW,
    channels: str = "mean",
    slope_fit_range: Sequence[float] = DEFAULT_SLOPE_FIT_RANGE,
    num_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    num_examples: int = 6,
) -> dict[str, Any]:
    """Compare each candidate image set with the reference and write the report into out_dir.

    Images are float NCHW in [-1, 1] (tensors or arrays); all sets must share C x H x W. `sources` maps
    set names (reference_name included) to where they came from, for the record. An existing out_dir is
    replaced only if it holds nothing but a previous report. Returns the metrics written to metrics.json.
    """
    if not candidates:
        raise UserError("no candidate image sets given; pass at least one name -> images")
    names = [reference_name, *candidates]
    for name in names:
        if not isinstance(name, str) or not name.strip() or "=" in name:
            raise UserError(f"image set names must be non-empty text without '=', got {name!r}")
    if len(set(names)) != len(names):
        raise UserError(f"image set names must be unique (the reference is {reference_name!r}), got {names}")
    out_dir = Path(out_dir)
    check_replaceable(out_dir, OUTPUT_FILES, PREVIOUS_OUTPUT)  # before the work, not only at the write

    ref_images = validate_images(reference, reference_name)
    cand_images = {name: validate_images(images, name) for name, images in candidates.items()}
    for name, images in cand_images.items():
        if images.shape[1:] != ref_images.shape[1:]:
            raise SpectralInputError(
                f"mismatched sizes: {reference_name} images are CxHxW {tuple(ref_images.shape[1:])}, "
                f"{name} images {tuple(images.shape[1:])}; every set must have the same size"
            )

    options = dict(cutoffs=cutoffs, band_edges=band_edges, window=window, channels=channels)
    ref_stats = spectral_statistics(ref_images, name=reference_name, **options)
    results: dict[str, dict[str, Any]] = {}
    for name, images in cand_images.items():
        stats = spectral_statistics(images, name=name, **options)
        comparison = compare_statistics(ref_stats, stats, slope_fit_range=slope_fit_range)
        comparison["hf_retention_ci"] = bootstrap_hf_retention(
            ref_stats, stats, num_resamples=num_bootstrap, confidence=confidence, seed=seed
        )
        results[name] = comparison
    first = next(iter(results.values()))
    metrics = {
        "title": title,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "settings": {
            "window": window,
            "channels": channels,
            "cutoffs_cycles_per_pixel": list(ref_stats.cutoffs),
            "band_edges_cycles_per_pixel": list(ref_stats.band_edges),
            "spectral_slope_fit_range_cycles_per_pixel": [float(v) for v in slope_fit_range],
            "bootstrap_resamples": num_bootstrap,
            "confidence": confidence,
            "seed": seed,
        },
        "reference": {
            "name": reference_name,
            "source": (sources or {}).get(reference_name),
            "num_images": ref_stats.num_images,
            "image_shape_chw": list(ref_stats.image_shape),
            "hf_ratio": first["reference_hf_ratio"],
            "energy": first["reference_energy"],
            "spectral_slope": first["reference_spectral_slope"],
            "radial_power": first["reference_radial_power"],
        },
        "radial_frequencies_cycles_per_pixel": first["radial_frequencies_cycles_per_pixel"],
        "candidates": {name: {"source": (sources or {}).get(name), **res} for name, res in results.items()},
    }

    figures = {
        "spectra.png": _plot_spectra(metrics),
        "band_ratios.png": _plot_band_ratios(metrics),
        "hf_retention.png": _plot_retention(metrics),
        "examples.png": _plot_examples(
            {reference_name: ref_images, **cand_images}, num_examples, _nearest_cutoff(ref_stats.cutoffs)
        ),
    }
    markdown = _render_markdown(metrics)
    page = _render_html(metrics, figures)

    with atomic_dir(out_dir, OUTPUT_FILES, PREVIOUS_OUTPUT) as tmp_dir:
        (tmp_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
        (tmp_dir / "report.md").write_text(markdown)
        (tmp_dir / "report.html").write_text(page)
        for filename, png in figures.items():
            (tmp_dir / filename).write_bytes(png)
    return metrics


# ------------------------------------------------------------------------------------------ Figures
# matplotlib's object API with the Agg canvas: no pyplot, no global figure state.


def _new_figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    # Fixed margins in inches (constrained layout costs about a second per figure on a busy CPU).
    fig.subplots_adjust(left=0.75 / width, right=1 - 0.2 / width, bottom=0.75 / height, top=1 - 0.4 / height,
                        wspace=0.28)
    axes = fig.subplots(1, ncols)
    return fig, axes


def _png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _colors(count: int) -> list:
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    return [palette[i % len(palette)] for i in range(count)]


def _nearest_cutoff(cutoffs: Sequence[float]) -> float:
    return min(cutoffs, key=lambda c: abs(c - HEADLINE_CUTOFF)) if cutoffs else HEADLINE_CUTOFF


def _plot_spectra(metrics: dict[str, Any]) -> bytes:
    freqs = metrics["radial_frequencies_cycles_per_pixel"]
    ref = metrics["reference"]
    fig, (ax_power, ax_ratio) = _new_figure(10.5, 4.0, ncols=2)
    ax_power.loglog(freqs, ref["radial_power"], color=REFERENCE_COLOR, lw=2.2, label=f"{ref['name']} (reference)")
    for (name, res), color in zip(metrics["candidates"].items(), _colors(len(metrics["candidates"]))):
        ax_power.loglog(freqs, res["candidate_radial_power"], color=color, lw=1.5, label=name)
        ratio = [c / r if r > 0 else float("nan") for c, r in zip(res["candidate_radial_power"], ref["radial_power"])]
        ax_ratio.semilogy(freqs, ratio, color=color, lw=1.5, marker="o", ms=2.5, label=name)
    ax_ratio.axhline(1.0, color=REFERENCE_COLOR, lw=1, ls="--")
    for cutoff in metrics["settings"]["cutoffs_cycles_per_pixel"]:
        ax_power.axvline(cutoff, color="0.75", lw=0.8, ls=":")
        ax_ratio.axvline(cutoff, color="0.75", lw=0.8, ls=":")
    ax_power.set(xlabel="frequency (cycles/pixel)", ylabel="mean power", title="Radially averaged power spectrum")
    ax_ratio.set(xlabel="frequency (cycles/pixel)", ylabel="candidate / reference power", title="Power ratio to reference")
    ax_ratio.set_xlim(0, 0.5)
    # Plain-number ticks: matplotlib's default log ticks at these short ranges overlap (3x10^-2 4x10^-2 ...).
    from matplotlib.ticker import NullFormatter

    ticks = [t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5) if freqs[0] * 0.9 <= t <= 0.5]
    ax_power.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax_power.xaxis.set_minor_formatter(NullFormatter())
    ax_power.legend(fontsize=8)
    ax_ratio.legend(fontsize=8)
    for ax in (ax_power, ax_ratio):
        ax.grid(True, alpha=0.25)
    return _png_bytes(fig)


def _plot_band_ratios(metrics: dict[str, Any]) -> bytes:
    candidates = metrics["candidates"]
    labels = next(iter(candidates.values()))["band_labels"]
    fig, ax = _new_figure(7.0, 3.6)
    width = 0.8 / len(candidates)
    for i, ((name, res), color) in enumerate(zip(candidates.items(), _colors(len(candidates)))):
        positions = [b + (i - (len(candidates) - 1) / 2) * width for b in range(len(labels))]
        ax.bar(positions, res["band_energy_ratio"], width=width * 0.95, color=color, label=name)
    ax.axhline(1.0, color=REFERENCE_COLOR, lw=1, ls="--")
    ax.set_yscale("log")
    values = [v for res in candidates.values() for v in res["band_energy_ratio"] if v > 0] + [1.0]
    ax.set_ylim(min(values) / 1.6, max(values) * 4)  # log bars start at 0; headroom for the legend
    ax.set_xticks(range(len(labels)), [f"{lab}\ncycles/px" for lab in labels], fontsize=8)
    ax.set(ylabel="band energy / reference", title="Energy per frequency band, relative to the reference")
    ax.legend(fontsize=8, loc="upper center", ncol=min(len(candidates), 4))
    ax.grid(True, axis="y", alpha=0.25)
    return _png_bytes(fig)


def _plot_retention(metrics: dict[str, Any]) -> bytes:
    candidates = metrics["candidates"]
    cutoffs = metrics["settings"]["cutoffs_cycles_per_pixel"]
    keys = list(next(iter(candidates.values()))["hf_retention"])
    fig, ax = _new_figure(7.0, 3.6)
    width = 0.8 / len(candidates)
    for i, ((name, res), color) in enumerate(zip(candidates.items(), _colors(len(candidates)))):
        positions = [k + (i - (len(candidates) - 1) / 2) * width for k in range(len(keys))]
        ci = res["hf_retention_ci"]
        values = [res["hf_retention"][key] for key in keys]
        lower = [max(v - ci[key]["low"], 0.0) for v, key in zip(values, keys)]
        upper = [max(ci[key]["high"] - v, 0.0) for v, key in zip(values, keys)]
        ax.bar(positions, values, width=width * 0.95, color=color, label=name,
               yerr=[lower, upper], capsize=3, error_kw={"lw": 1})
    ax.axhline(1.0, color=REFERENCE_COLOR, lw=1, ls="--", label="reference level")
    ax.set_xticks(range(len(keys)), [f"f > {c:g}" for c in cutoffs])
    conf = metrics["settings"]["confidence"]
    ax.set(ylabel="HF energy / reference", title=f"High-frequency retention ({conf:.0%} bootstrap intervals)")
    top = max([1.0] + [ci["high"] for res in candidates.values() for ci in res["hf_retention_ci"].values()])
    ax.set_ylim(0, top * 1.3)  # headroom so the legend does not cover the bars
    ax.legend(fontsize=8, loc="upper center", ncol=min(len(candidates) + 1, 4))
    ax.grid(True, axis="y", alpha=0.25)
    return _png_bytes(fig)


def _display_crop(images: torch.Tensor) -> torch.Tensor:
    h, w = images.shape[-2:]
    ch, cw = min(h, EXAMPLE_CROP), min(w, EXAMPLE_CROP)
    top, left = (h - ch) // 2, (w - cw) // 2
    return images[..., top : top + ch, left : left + cw]


def _plot_examples(image_sets: Mapping[str, torch.Tensor], num_examples: int, cutoff: float) -> bytes:
    """Rows: image sets; columns: a few images, then the same images' high-pass (f > cutoff) part."""
    count = max(1, min(num_examples, min(len(images) for images in image_sets.values())))
    shown = {name: images[:count].float().cpu() for name, images in image_sets.items()}
    # High-pass of the luminance (one signed map per image), on one grey scale shared by every row.
    luma = {
        name: (x * x.new_tensor(LUMINANCE_WEIGHTS).view(1, 3, 1, 1)).sum(1, keepdim=True) if x.shape[1] == 3 else x[:, :1]
        for name, x in shown.items()
    }
    detail = {name: _display_crop(high_pass(x, cutoff))[:, 0] for name, x in luma.items()}
    scale = float(torch.quantile(torch.cat([d.flatten() for d in detail.values()]).abs(), 0.995)) or 1e-6

    rows, cols = len(shown), 2 * count
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.25 * cols + 1.4, 1.35 * rows + 0.5), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, gridspec_kw={"wspace": 0.05, "hspace": 0.08})
    for r, name in enumerate(shown):
        crops = _display_crop(shown[name])
        for c in range(count):
            ax = axes[r][c]
            img = ((crops[c] + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax_hp = axes[r][count + c]
            ax_hp.imshow(detail[name][c].numpy(), cmap="gray", vmin=-scale, vmax=scale, interpolation="nearest")
            for a in (ax, ax_hp):
                a.set_xticks([])
                a.set_yticks([])
        axes[r][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=10)
    axes[0][0].set_title("images", loc="left", fontsize=10)
    axes[0][count].set_title(f"high-pass part (f > {cutoff:g} cycles/px, shared grey scale)", loc="left", fontsize=10)
    fig.subplots_adjust(left=1.3 / (1.25 * cols + 1.4), right=0.99, top=1 - 0.35 / (1.35 * rows + 0.5), bottom=0.02)
    return _png_bytes(fig)


# --------------------------------------------------------------------------------------------- Text


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _summary_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    cutoffs = metrics["settings"]["cutoffs_cycles_per_pixel"]
    conf = metrics["settings"]["confidence"]
    header = ["set", "images"]
    header += [f"HF retention f>{c:g} [{conf:.0%} CI]" for c in cutoffs]
    header += [f"HF share f>{_nearest_cutoff(cutoffs):g}", "LSD (dB)", "slope"]
    ref = metrics["reference"]
    headline = f"{_nearest_cutoff(cutoffs):g}"
    rows = [[f"{ref['name']} (reference)", str(ref["num_images"])] + ["1 (by definition)"] * len(cutoffs)
            + [_fmt(ref["hf_ratio"].get(headline)), "0", _fmt(ref["spectral_slope"], 2)]]
    for name, res in metrics["candidates"].items():
        row = [name, str(res["num_candidate_images"])]
        for key in res["hf_retention"]:
            ci = res["hf_retention_ci"][key]
            row.append(f"{_fmt(res['hf_retention'][key])} [{_fmt(ci['low'])}, {_fmt(ci['high'])}]")
        row += [_fmt(res["candidate_hf_ratio"].get(headline)), _fmt(res["log_spectral_distance_db"], 2),
                _fmt(res["candidate_spectral_slope"], 2)]
        rows.append(row)
    return header, rows


def _band_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    labels = next(iter(metrics["candidates"].values()))["band_labels"]
    header = ["set"] + [f"{lab} ratio" for lab in labels] + [f"{lab} LSD dB" for lab in labels]
    rows = []
    for name, res in metrics["candidates"].items():
        rows.append([name] + [_fmt(v) for v in res["band_energy_ratio"]]
                    + [_fmt(v, 2) for v in res["log_spectral_distance_db_per_band"]])
    return header, rows


HOW_TO_READ = [
    "**HF retention** at a cutoff f: the candidate's mean spectral energy at radial frequencies above f "
    "(cycles/pixel) divided by the reference's. 1 = as much fine detail as the reference; below 1 = detail "
    "lost (blur, over-smoothing); above 1 = extra high-frequency energy (noise, artefacts, over-sharpening). "
    "The interval resamples the images of both sets (percentile bootstrap).",
    "**HF share**: the fraction of a set's own (mean-removed) energy above the cutoff; it does not depend on "
    "overall contrast, so compare it with the retention to tell lost detail from lost contrast.",
    "**LSD**: log-spectral distance, the root-mean-square over radial bins of 10 log10(candidate / reference "
    "power), in dB; 0 = identical spectra. Per band it is restricted to the bins in that band.",
    "**Band energy ratio**: energy in each radial band relative to the reference (the bar chart).",
    "**Slope**: least-squares slope of log power against log frequency; natural images are near -2, and a "
    "steeper (more negative) slope than the reference means high frequencies fall off faster.",
    "Spectra: mean removed, periodic Hann window by default, power averaged over channels and images.",
]


def _render_markdown(metrics: dict[str, Any]) -> str:
    settings, ref = metrics["settings"], metrics["reference"]
    c, h, w = ref["image_shape_chw"]
    lines = [f"# {metrics['title']}", ""]
    lines.append(
        f"Reference: **{ref['name']}** ({ref['num_images']} images, {c}x{h}x{w}"
        + (f", from `{ref['source']}`" if ref.get("source") else "") + "). "
        f"Window: {settings['window']}; channels: {settings['channels']}; "
        f"{settings['bootstrap_resamples']} bootstrap resamples. Created {metrics['created_utc']}."
    )
    lines.append("")
    for title, (header, rows) in (("Summary", _summary_rows(metrics)), ("Per band", _band_rows(metrics))):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    lines += ["## Plots", ""]
    for filename, caption in zip(FIGURE_FILES, ("Radial spectra", "Band energy ratios", "HF retention", "Examples")):
        lines += [f"![{caption}]({filename})", ""]
    lines += ["## How to read this", ""] + [f"- {item}" for item in HOW_TO_READ] + [""]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_inline(text: str) -> str:
    """The two bits of markdown HOW_TO_READ uses (**bold**), as HTML."""
    parts = html.escape(text).split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1180px;
       color: #222; line-height: 1.4; padding: 0 16px; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
p.meta { color: #555; font-size: 0.92em; }
table { border-collapse: collapse; font-size: 0.88em; margin: 8px 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
figure { margin: 12px 0; } figure img { max-width: 100%; border: 1px solid #eee; }
.pair { display: flex; gap: 16px; flex-wrap: wrap; } .pair figure { flex: 1 1 480px; margin: 0; }
figcaption { color: #555; font-size: 0.88em; }
ul.read li { margin-bottom: 4px; }
"""


def _render_html(metrics: dict[str, Any], figures: Mapping[str, bytes]) -> str:
    settings, ref = metrics["settings"], metrics["reference"]
    c, h, w = ref["image_shape_chw"]
    meta = (
        f"Reference: <b>{html.escape(ref['name'])}</b> ({ref['num_images']} images, {c}&times;{h}&times;{w}"
        + (f", from <code>{html.escape(ref['source'])}</code>" if ref.get("source") else "")
        + f"). Window: {html.escape(settings['window'])}; channels: {html.escape(settings['channels'])}; "
        f"{settings['bootstrap_resamples']} bootstrap resamples. Created {metrics['created_utc']}."
    )
    captions = {
        "spectra.png": "Left: mean radial power spectra (log-log). Right: each candidate's power divided by the "
        "reference's, per radial bin; dotted lines mark the cutoffs.",
        "band_ratios.png": "Energy in each radial band relative to the reference (1 = same).",
        "hf_retention.png": "High-frequency retention per cutoff with bootstrap intervals (1 = all detail kept).",
        "examples.png": "A few images per set (central crops for large images) and their high-pass parts.",
    }
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(metrics['title'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(metrics['title'])}</h1><p class='meta'>{meta}</p>",
        "<h2>Summary</h2>", _html_table(*_summary_rows(metrics)),
        "<h2>Per band</h2>", _html_table(*_band_rows(metrics)),
        "<h2>Plots</h2>",
    ]
    def figure(filename: str) -> str:
        encoded = base64.b64encode(figures[filename]).decode("ascii")
        return (
            f"<figure><img alt='{filename}' src='data:image/png;base64,{encoded}'>"
            f"<figcaption>{html.escape(captions[filename])}</figcaption></figure>"
        )

    parts.append(figure("spectra.png"))
    parts.append(f"<div class='pair'>{figure('hf_retention.png')}{figure('band_ratios.png')}</div>")
    parts.append(figure("examples.png"))
    parts.append("<h2>How to read this</h2><ul class='read'>")
    parts += [f"<li>{_md_inline(item)}</li>" for item in HOW_TO_READ]
    parts.append("</ul></body></html>\n")
    return "\n".join(parts)
