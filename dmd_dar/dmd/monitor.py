"""The training monitor: DMD's known failures, watched on a fixed batch every `eval.every` steps.

DMD users most often report mode collapse, over-saturation (colour drift) and quality that degrades late in
training. On the fixed probe batch of noises and conditions the monitor measures, for the model that would be
exported (the EMA when there is one):
- quality (`eval.quality`): classifier Fréchet distance, class accuracy, precision and recall against the real
  reference (`dmd_dar.metrics.quality`; KID / FID in Inception features where no classifier applies);
- pixel statistics against the teacher's samples of the same batch: mean drift, standard-deviation ratio,
  share of saturated pixels, and the diversity across the batch (per-pixel std over samples) over the teacher's;
- the high-frequency share and its ratio to the teacher's.
A step is flagged (`alert` = 1 in the log, and one printed line) on collapse (diversity under half the
teacher's), saturation (saturated share 0.2 above the teacher's, or mean drift over 0.25) or a non-finite
sample. `eval.select` keeps the best unflagged state by one metric (`best/`, `best.json`), which the run then
exports as its student. `plot_monitor` draws each metric against the step (`monitor.png` of the run).
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dmd_dar.checkpoint import atomic_write_bytes
from dmd_dar.dmd.config import SELECTABLE, EvalConfig
from dmd_dar.spectral import high_frequency_ratio

COLLAPSE_DIVERSITY = 0.5  # diversity over the teacher's below this: mode collapse
SATURATION_MARGIN = 0.2  # saturated share above the teacher's by more than this: over-saturation
DRIFT_LIMIT = 0.25  # |mean - teacher mean| above this (images in [-1, 1]): colour drift
SATURATED = 0.98  # a pixel with |x| above this counts as saturated


def pixel_statistics(images: torch.Tensor) -> dict[str, float]:
    x = images.float()
    return {"pixel_mean": float(x.mean()), "pixel_std": float(x.std()),
            "saturated_share": float((x.abs() > SATURATED).float().mean()),
            "diversity": float(x.std(dim=0).mean()) if len(x) > 1 else 0.0}


@dataclass
class Best:
    step: int
    value: float


class Monitor:
    """Measures a batch of student samples against the teacher's samples of the same noises and conditions."""

    def __init__(self, cfg: EvalConfig, teacher_images: torch.Tensor, labels: torch.Tensor | None, reference: Any = None):
        self.cfg, self.labels, self.reference = cfg, labels, reference
        self.teacher = pixel_statistics(teacher_images)
        self.teacher_hf_ratio = high_frequency_ratio(teacher_images)

    def measure(self, images: torch.Tensor) -> dict[str, float]:
        if not torch.isfinite(images).all():
            return {"alert": 1.0, "alert_nonfinite": 1.0}
        stats = pixel_statistics(images)
        hf = high_frequency_ratio(images)
        out = {**stats, "pixel_mean_drift": stats["pixel_mean"] - self.teacher["pixel_mean"],
               "pixel_std_ratio": stats["pixel_std"] / max(self.teacher["pixel_std"], 1e-12),
               "diversity_vs_teacher": stats["diversity"] / max(self.teacher["diversity"], 1e-12),
               "student_hf_ratio": hf, "hf_ratio_vs_teacher": hf / max(self.teacher_hf_ratio, 1e-12)}
        if self.cfg.quality:
            from dmd_dar.metrics.quality import evaluate_quality  # loads the classifier / Inception once

            quality = evaluate_quality(images, self.labels, self.reference if self.reference is not None else "mnist")
            out.update({k: float(v) for k, v in quality.items() if k in SELECTABLE or k in ("fd_to_floor", "kid_std")})
        alerts = {"alert_collapse": out["diversity_vs_teacher"] < COLLAPSE_DIVERSITY,
                  "alert_saturation": (stats["saturated_share"] > self.teacher["saturated_share"] + SATURATION_MARGIN
                                       or abs(out["pixel_mean_drift"]) > DRIFT_LIMIT)}
        out.update({k: float(v) for k, v in alerts.items()})
        out["alert"] = float(any(alerts.values()))
        return out

    @staticmethod
    def describe(step: int, metrics: dict[str, float]) -> str | None:
        """One line for a flagged step, None for a healthy one."""
        if not metrics.get("alert"):
            return None
        if metrics.get("alert_nonfinite"):
            return f"monitor: step {step}: non-finite student samples"
        names = [name for name, key in (("mode collapse", "alert_collapse"), ("over-saturation / colour drift", "alert_saturation"))
                 if metrics.get(key)]
        return (f"monitor: step {step}: possible {' and '.join(names)} (diversity {metrics['diversity_vs_teacher']:.2f}x "
                f"the teacher's, mean drift {metrics['pixel_mean_drift']:+.2f}, saturated {metrics['saturated_share']:.2f})")

    def improves(self, metrics: dict[str, float], best: Best | None) -> bool:
        """Whether this (unflagged) evaluation beats the best so far by `eval.select`."""
        name = self.cfg.select
        value = metrics.get(name)
        if not name or metrics.get("alert") or value is None or not math.isfinite(value):
            return False
        if best is None:
            return True
        return value > best.value if SELECTABLE[name] else value < best.value


PLOTTED = ("fd", "kid", "accuracy", "recall", "diversity_vs_teacher", "pixel_mean_drift", "saturated_share", "hf_ratio_vs_teacher")


def plot_monitor(logs: dict[str, Path], path: Path) -> Path | None:
    """One panel per monitored metric against the step, one line per arm (from each arm's log.csv), flagged
    evaluations marked; written atomically as a PNG. None when no arm logged a monitored metric."""
    import csv

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series: dict[str, dict[str, list[tuple[int, float, bool]]]] = {}
    for arm, log in logs.items():
        with open(log) as f:
            for row in csv.DictReader(f):
                for name in PLOTTED:
                    if row.get(name) not in (None, ""):
                        series.setdefault(name, {}).setdefault(arm, []).append(
                            (int(row["step"]), float(row[name]), row.get("alert") == "1.0"))
    if not series:
        return None
    fig = Figure(figsize=(3.2 * len(series), 2.8), dpi=100)
    FigureCanvasAgg(fig)
    for ax, (name, arms) in zip(fig.subplots(1, len(series), squeeze=False)[0], series.items()):
        for arm, points in arms.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=arm)
            flagged = [p for p in points if p[2]]
            ax.scatter([p[0] for p in flagged], [p[1] for p in flagged], color="red", marker="x", zorder=3)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())
