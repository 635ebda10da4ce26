"""High-frequency spectral metrics: how much fine detail a set of images carries, and how much of a
reference set's detail a candidate set keeps.

Everything here works on float images NCHW in [-1, 1] (torch tensors or numpy arrays). Per image:

1. remove the mean (the window-weighted mean, so the DC term of the windowed image is exactly 0);
2. multiply by a 2-D window (default: periodic Hann, see `DEFAULT_WINDOW`);
3. power P(k) = |FFT(x)|^2 / sum(w^2), so that the mean of P over the whole frequency grid equals the
   (window-weighted) pixel variance (Parseval) and white noise of variance s^2 has a flat P = s^2;
4. average P over the channels (or use the luminance only);
5. radial statistics: frequencies are radii r = sqrt(fx^2 + fy^2) in cycles/pixel.

Radial bins have width 1/min(H, W) and centres k/min(H, W), k = 1 .. min(H, W)//2, so they cover
(0, 0.5]; the corners of the grid (r > 0.5, diagonal frequencies above Nyquist along both axes) are not
in the radial spectrum or the bands, but they are energy and count in "energy above a cutoff".

"Energy" of an image = mean of P over the frequency grid = its variance; "energy above c" = the part of
that mean contributed by frequencies with r > c (strictly). Set-level numbers pool the images: the ratio
of summed energies (equivalently, of the mean spectrum), not the mean of per-image ratios.

Only pure functions of the image shape are cached (the frequency-grid layout), nothing else is kept.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from dmd_dar.errors import UserError

# Periodic Hann, because the FFT treats an image as one tile of a periodic pattern: without a window the
# jump between the left and right (top and bottom) edges is a sharp artificial edge whose spectrum falls
# only as f^-2 along the axes, which adds high-frequency energy that depends on the image borders rather
# than on the detail inside. The periodic Hann's DFT has just three taps per axis, so its leakage is
# small and known (power is smeared by about one bin); the cost is that low-frequency bins are smoothed.
# "none" (rectangular) is exact for periodic signals and is what the Parseval / white-noise checks use.
DEFAULT_WINDOW = "hann"
WINDOWS = ("hann", "none")
CHANNEL_MODES = ("mean", "luminance")
DEFAULT_CUTOFFS = (0.125, 0.25, 0.375)
DEFAULT_BAND_EDGES = (0.0, 0.125, 0.25, 0.375, 0.5)
# The spectral slope is fitted in log-log over bins with centres in this range (cycles/pixel): the
# lowest bins are dominated by image layout and by the window's smoothing, not by texture statistics.
DEFAULT_SLOPE_FIT_RANGE = (0.05, 0.5)
# Values may exceed [-1, 1] by this much (float round-off from decoding / resizing).
RANGE_TOLERANCE = 1e-3
# ITU-R BT.601 luma weights, the ones PIL's "L" conversion uses.
LUMINANCE_WEIGHTS = (0.299, 0.587, 0.114)
# Added to energies / powers before taking ratios and logs, so empty spectra compare as equal instead
# of 0/0. Far below any real signal: one uint8 level has a variance of about 6e-5 in [-1, 1] units.
ENERGY_FLOOR = 1e-12
MIN_SIZE = 4
# Pixels per FFT batch: bounds the temporary memory to a few hundred MB whatever the image count.
_CHUNK_PIXELS = 1 << 23


class SpectralInputError(UserError, ValueError):
    """Images that cannot be analysed (NaN, wrong rank, out of range, mismatched sizes).

    A ValueError (the public contract) and a UserError (so scripts print one line and exit 2).
    """


class RadialSpectrum(NamedTuple):
    freqs: torch.Tensor  # [B] bin centres in cycles/pixel, in (0, 0.5]
    power: torch.Tensor  # [B] mean power per bin, averaged over channels and images (float64)


class SpectralStatistics(NamedTuple):
    """Per-image spectral sums of one image set (all float64, on the CPU)."""

    freqs: torch.Tensor  # [B] radial bin centres
    radial_power: torch.Tensor  # [N, B] mean power per radial bin
    energy: torch.Tensor  # [N] total energy (= window-weighted pixel variance)
    cutoffs: tuple[float, ...]
    energy_above: torch.Tensor  # [N, K] energy at radii > cutoffs[k]
    band_edges: tuple[float, ...]
    band_energy: torch.Tensor  # [N, len(band_edges) - 1] energy at radii in (edge[j], edge[j + 1]]
    image_shape: tuple[int, int, int]  # (C, H, W)
    window: str
    channels: str

    @property
    def num_images(self) -> int:
        return int(self.energy.shape[0])

    def mean_radial_power(self) -> torch.Tensor:
        return self.radial_power.mean(0)


# ------------------------------------------------------------------------------------- Input checks


def validate_images(images: Any, name: str = "images") -> torch.Tensor:
    """Check float NCHW in [-1, 1] without NaN/inf; return a detached floating torch tensor."""
    if isinstance(images, np.ndarray):
        if not np.issubdtype(images.dtype, np.floating):
            raise SpectralInputError(
                f"{name}: expected float images in [-1, 1], got a numpy array of dtype {images.dtype}; "
                "convert uint8 NHWC with dmd_dar.image_io.from_uint8_nhwc"
            )
        images = torch.from_numpy(np.ascontiguousarray(images))
    elif not isinstance(images, torch.Tensor):
        raise SpectralInputError(
            f"{name}: expected a torch tensor or numpy array (float NCHW in [-1, 1]), got {type(images).__name__}"
        )
    if not images.is_floating_point():
        raise SpectralInputError(
            f"{name}: expected float images in [-1, 1], got dtype {images.dtype}; "
            "convert uint8 NHWC with dmd_dar.image_io.from_uint8_nhwc"
        )
    if images.dim() != 4:
        raise SpectralInputError(
            f"{name}: expected rank 4 (N, C, H, W), got rank {images.dim()} with shape {tuple(images.shape)}"
        )
    n, c, h, w = images.shape
    if n == 0:
        raise SpectralInputError(f"{name}: the image set is empty (shape {tuple(images.shape)})")
    if c > 4 or h < MIN_SIZE or w < MIN_SIZE:
        raise SpectralInputError(
            f"{name}: shape {tuple(images.shape)} does not look like NCHW images (at most 4 channels, "
            f"H and W at least {MIN_SIZE}); NHWC arrays must be permuted first"
        )
    images = images.detach()
    if images.dtype not in (torch.float32, torch.float64):
        images = images.float()
    low, high = (float(v) for v in torch.aminmax(images))  # NaN propagates into min/max: one pass checks all
    if not (math.isfinite(low) and math.isfinite(high)):
        raise SpectralInputError(f"{name}: contains NaN or inf values")
    if low < -1 - RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        raise SpectralInputError(
            f"{name}: values must lie in [-1, 1], found min {low:.4g} and max {high:.4g} "
            "(rescale uint8 with dmd_dar.image_io.from_uint8_nhwc, or clamp model outputs)"
        )
    return images


def _check_options(window: str, channels: str, num_channels: int | None = None) -> None:
    if window not in WINDOWS:
        raise SpectralInputError(f"window must be one of {WINDOWS}, got {window!r}")
    if channels not in CHANNEL_MODES:
        raise SpectralInputError(f"channels must be one of {CHANNEL_MODES}, got {channels!r}")
    if channels == "luminance" and num_channels not in (None, 1, 3):
        raise SpectralInputError(f"channels='luminance' needs 1 or 3 channels, got {num_channels}")


def _check_frequencies(values: Sequence[float], what: str, allow_zero: bool) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    for v in values:
        above_low = v >= 0.0 if allow_zero else v > 0.0
        if not (math.isfinite(v) and above_low and v <= 0.5):
            interval = "[0, 0.5]" if allow_zero else "(0, 0.5]"
            raise SpectralInputError(f"{what} must be in {interval} cycles/pixel, got {v}")
    return values


# ---------------------------------------------------------------------------- Frequency-grid layout
# Cached: a pure function of the shape and the requested boundaries.


class _Layout(NamedTuple):
    freqs: torch.Tensor  # [B] radial bin centres
    # Each rfft2 point's accumulator: its radius segment, plus num_segments for points that stand for two
    # full-grid points (see below), so the doubling is applied to S sums instead of H * W powers.
    point_index: torch.Tensor  # [H * (W//2 + 1)] long
    accumulator_to_outputs: torch.Tensor  # [2 S, B + 1 + K + J] float64, includes 1 / sum(w^2)
    window: torch.Tensor | None  # [H, W] float64, or None for "none"
    window_dc_leak: torch.Tensor | None  # rfft2(window)[low corner]: removes the weighted mean after the FFT


def _radial_bin_edges(size: int) -> list[float]:
    """Edges of the radial bins for a grid whose shorter side is `size`: (0, 1.5/n], ..., (.., 0.5]."""
    num_bins = size // 2
    inner = [(k + 0.5) / size for k in range(1, num_bins)]
    return [0.0] + inner + [0.5]


@functools.lru_cache(maxsize=32)
def _layout(height: int, width: int, window: str, cutoffs: tuple[float, ...], band_edges: tuple[float, ...]) -> _Layout:
    fy = torch.fft.fftfreq(height, dtype=torch.float64)
    fx = torch.fft.rfftfreq(width, dtype=torch.float64)
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)  # [H, W//2+1]
    # An rfft2 column stands for itself and its mirror (-ky, -kx), which has the same radius and power,
    # except column 0 and, for even W, the Nyquist column, which hold both halves already.
    doubled = torch.ones_like(radius, dtype=torch.bool)
    doubled[:, 0] = False
    if width % 2 == 0:
        doubled[:, -1] = False

    short = min(height, width)
    bin_edges = _radial_bin_edges(short)
    boundaries = sorted(set([0.0] + bin_edges + list(cutoffs) + list(band_edges) + [math.inf]))
    bounds = torch.tensor(boundaries, dtype=torch.float64)
    # Segment j holds radii in (bounds[j-1], bounds[j]]; segment 0 is the DC point (r = 0).
    segment = torch.bucketize(radius, bounds, right=False)
    seg_low = torch.cat([torch.tensor([-math.inf], dtype=torch.float64), bounds])
    seg_high = torch.cat([bounds, torch.tensor([math.inf], dtype=torch.float64)])
    num_segments = len(boundaries) + 1
    multiplicity = 1.0 + doubled.to(torch.float64)
    seg_points = torch.zeros(num_segments, dtype=torch.float64).index_add_(0, segment.flatten(), multiplicity.flatten())
    grid_points = float(height * width)

    def member(lo: float, hi: float) -> torch.Tensor:  # segments inside (lo, hi]
        return ((seg_low >= lo) & (seg_high <= hi)).to(torch.float64)

    columns = []
    for k in range(len(bin_edges) - 1):  # radial bins: mean power over the full-grid points in the bin
        inside = member(bin_edges[k], bin_edges[k + 1])
        columns.append(inside / (inside * seg_points).sum().clamp_min(1.0))
    columns.append(torch.ones(num_segments, dtype=torch.float64) / grid_points)  # total energy
    for c in cutoffs:
        columns.append(member(c, math.inf) / grid_points)
    for lo, hi in zip(band_edges[:-1], band_edges[1:]):
        columns.append(member(lo, hi) / grid_points)
    per_segment = torch.stack(columns, dim=1)

    freqs = torch.arange(1, short // 2 + 1, dtype=torch.float64) / short
    if window == "hann":
        win = torch.outer(torch.hann_window(height, dtype=torch.float64), torch.hann_window(width, dtype=torch.float64))
        window_power = float((win**2).sum())
        # The periodic Hann's DFT is exactly three taps per axis (k = 0, +-1): rows 0, 1, H-1, columns 0, 1.
        dc_leak = torch.fft.rfft2(win)[[0, 1, height - 1]][:, :2]
    else:
        win, window_power, dc_leak = None, grid_points, None
    accumulator_to_outputs = torch.cat([per_segment, 2.0 * per_segment]) / window_power
    point_index = (segment + num_segments * doubled.long()).flatten()
    return _Layout(freqs, point_index, accumulator_to_outputs, win, dc_leak)


# --------------------------------------------------------------------------------- Core computation


def _to_analysed_channels(images: torch.Tensor, channels: str) -> torch.Tensor:
    if channels == "luminance" and images.shape[1] == 3:
        weights = images.new_tensor(LUMINANCE_WEIGHTS).view(1, 3, 1, 1)
        return (images * weights).sum(1, keepdim=True)
    return images


def _mean_removed_spectrum(chunk: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """rfft2 of (x - weighted mean) * window, computed as rfft2(x * window) - mean * rfft2(window).

    The mean is read off the DC term (sum(x w) / sum(w)), so the image is only traversed once.
    """
    if layout.window is None:
        spectrum = torch.fft.rfft2(chunk)
        spectrum[..., 0, 0] = 0
        return spectrum
    window = layout.window.to(device=chunk.device, dtype=chunk.dtype)
    spectrum = torch.fft.rfft2(chunk * window)
    leak = layout.window_dc_leak.to(device=chunk.device, dtype=spectrum.dtype)
    mean = (spectrum[..., 0, 0] / leak[0, 0])[..., None, None]  # leak[0, 0] = sum(w)
    spectrum[..., :2, :2] -= mean * leak[:2]
    spectrum[..., -1:, :2] -= mean * leak[2:]
    return spectrum


def spectral_statistics(
    images: Any,
    *,
    cutoffs: Sequence[float] = DEFAULT_CUTOFFS,
    band_edges: Sequence[float] = DEFAULT_BAND_EDGES,
    window: str = DEFAULT_WINDOW,
    channels: str = "mean",
    name: str = "images",
) -> SpectralStatistics:
    """Per-image radial spectra, energies, energies above each cutoff and per-band energies."""
    x = validate_images(images, name)
    _check_options(window, channels, x.shape[1])
    cutoffs = _check_frequencies(cutoffs, "cutoffs", allow_zero=False)
    band_edges = _check_frequencies(band_edges, "band_edges", allow_zero=True)
    if len(band_edges) < 2 or any(b <= a for a, b in zip(band_edges[:-1], band_edges[1:])):
        raise SpectralInputError(f"band_edges must be increasing with at least two entries, got {band_edges}")
    n, c, h, w = x.shape
    layout = _layout(h, w, window, cutoffs, band_edges)
    analysed_channels = 1 if channels == "luminance" else c
    # Channels are summed by the accumulation itself: the point index is repeated once per channel.
    point_index = layout.point_index.to(x.device).repeat(analysed_channels)
    num_accumulators = layout.accumulator_to_outputs.shape[0]
    chunk_size = max(1, _CHUNK_PIXELS // (c * h * w))
    outputs = []
    for start in range(0, n, chunk_size):
        spectrum = _mean_removed_spectrum(_to_analysed_channels(x[start : start + chunk_size], channels), layout)
        power = spectrum.real.square().addcmul_(spectrum.imag, spectrum.imag).flatten(1)
        sums = power.new_zeros(power.shape[0], num_accumulators).index_add_(1, point_index, power)
        outputs.append(sums.double().cpu() @ layout.accumulator_to_outputs / analysed_channels)
    out = torch.cat(outputs)
    num_bins = layout.freqs.numel()
    k, j = len(cutoffs), len(band_edges) - 1
    return SpectralStatistics(
        freqs=layout.freqs.clone(),
        radial_power=out[:, :num_bins],
        energy=out[:, num_bins],
        cutoffs=cutoffs,
        energy_above=out[:, num_bins + 1 : num_bins + 1 + k],
        band_edges=band_edges,
        band_energy=out[:, num_bins + 1 + k : num_bins + 1 + k + j],
        image_shape=(c, h, w),
        window=window,
        channels=channels,
    )


# ----------------------------------------------------------------------------------- Public metrics


def radial_power_spectrum(images: Any, *, window: str = DEFAULT_WINDOW, channels: str = "mean") -> RadialSpectrum:
    """Radially averaged power spectrum of an image set.

    Returns (freqs, power): bin centres in cycles/pixel in (0, 0.5] and the mean power per bin, averaged
    over channels (or the luminance, `channels="luminance"`) and images. Works for any H x W.
    """
    stats = spectral_statistics(images, cutoffs=(), band_edges=(0.0, 0.5), window=window, channels=channels)
    return RadialSpectrum(stats.freqs, stats.mean_radial_power())


def high_frequency_ratio(
    images: Any,
    cutoff: float = 0.25,
    *,
    window: str = DEFAULT_WINDOW,
    channels: str = "mean",
    per_image: bool = False,
) -> float | torch.Tensor:
    """Share of the (mean-removed) spectral energy at radii above `cutoff` cycles/pixel, in [0, 1].

    Pooled over the set (summed energies) by default; `per_image=True` returns a float64 tensor [N] of
    each image's own share (for bootstrap intervals and training logs). A constant image has share 0.
    """
    stats = spectral_statistics(images, cutoffs=(cutoff,), band_edges=(0.0, 0.5), window=window, channels=channels)
    above, total = stats.energy_above[:, 0], stats.energy
    if per_image:
        return torch.where(total > 0, above / total.clamp_min(ENERGY_FLOOR), torch.zeros_like(total)).clamp(0, 1)
    total_sum = float(total.sum())
    return min(max(float(above.sum()) / total_sum, 0.0), 1.0) if total_sum > 0 else 0.0


def spectral_slope(freqs: torch.Tensor, power: torch.Tensor, fit_range: Sequence[float] = DEFAULT_SLOPE_FIT_RANGE) -> float | None:
    """Least-squares slope of log10(power) against log10(freq) over bins with centres in fit_range.

    Natural images fall roughly as f^-2 (slope -2); a steeper slope means less fine detail. None when
    fewer than three bins lie in the range.
    """
    lo, hi = float(fit_range[0]), float(fit_range[1])
    keep = (freqs >= lo) & (freqs <= hi)
    if int(keep.sum()) < 3:
        return None
    log_f = torch.log10(freqs[keep].double())
    log_p = torch.log10(power[keep].double() + ENERGY_FLOOR)
    log_f_centred = log_f - log_f.mean()
    return float((log_f_centred * (log_p - log_p.mean())).sum() / log_f_centred.square().sum())


def _cutoff_key(cutoff: float) -> str:
    return f"{cutoff:g}"


def _band_label(lo: float, hi: float) -> str:
    return f"{lo:g}-{hi:g}"


def _ratio(numerator: float, denominator: float) -> float:
    return (numerator + ENERGY_FLOOR) / (denominator + ENERGY_FLOOR)


def compare_statistics(
    reference: SpectralStatistics,
    candidate: SpectralStatistics,
    *,
    slope_fit_range: Sequence[float] = DEFAULT_SLOPE_FIT_RANGE,
) -> dict[str, Any]:
    """compare_spectra on precomputed statistics (compute the reference once, compare many candidates)."""
    if reference.image_shape != candidate.image_shape:
        raise SpectralInputError(
            f"mismatched sizes: reference images are CxHxW {reference.image_shape}, "
            f"candidate images {candidate.image_shape}; compare sets of the same size"
        )
    for field in ("cutoffs", "band_edges", "window", "channels"):
        if getattr(reference, field) != getattr(candidate, field):
            raise SpectralInputError(f"reference and candidate statistics were computed with different {field}")

    ref_power, cand_power = reference.mean_radial_power(), candidate.mean_radial_power()
    freqs = reference.freqs
    log_ratio_db = 10.0 * torch.log10((cand_power + ENERGY_FLOOR) / (ref_power + ENERGY_FLOOR))

    ref_above, cand_above = reference.energy_above.mean(0), candidate.energy_above.mean(0)
    ref_energy, cand_energy = float(reference.energy.mean()), float(candidate.energy.mean())
    ref_share = [_ratio(float(a), ref_energy) if ref_energy > 0 else 0.0 for a in ref_above]
    cand_share = [_ratio(float(a), cand_energy) if cand_energy > 0 else 0.0 for a in cand_above]
    ref_bands, cand_bands = reference.band_energy.mean(0), candidate.band_energy.mean(0)

    bands = list(zip(reference.band_edges[:-1], reference.band_edges[1:]))
    lsd_per_band: list[float | None] = []
    for lo, hi in bands:
        inside = (freqs > lo) & (freqs <= hi)
        lsd_per_band.append(float(log_ratio_db[inside].square().mean().sqrt()) if bool(inside.any()) else None)

    cut_keys = [_cutoff_key(c) for c in reference.cutoffs]
    c, h, w = reference.image_shape
    return {
        "image_shape_chw": [c, h, w],
        "num_reference_images": reference.num_images,
        "num_candidate_images": candidate.num_images,
        "window": reference.window,
        "channels": reference.channels,
        "cutoffs_cycles_per_pixel": list(reference.cutoffs),
        # Candidate's mean energy above the cutoff over the reference's: 1.0 = all detail kept.
        "hf_retention": {k: _ratio(float(cv), float(rv)) for k, cv, rv in zip(cut_keys, cand_above, ref_above)},
        # Shares of each set's own energy above the cutoff, and their ratio (insensitive to overall contrast).
        "reference_hf_ratio": dict(zip(cut_keys, ref_share)),
        "candidate_hf_ratio": dict(zip(cut_keys, cand_share)),
        "hf_ratio_retention": {k: _ratio(cs, rs) for k, cs, rs in zip(cut_keys, cand_share, ref_share)},
        "reference_energy": ref_energy,
        "candidate_energy": cand_energy,
        "band_edges_cycles_per_pixel": list(reference.band_edges),
        "band_labels": [_band_label(lo, hi) for lo, hi in bands],
        "band_energy_ratio": [_ratio(float(cb), float(rb)) for cb, rb in zip(cand_bands, ref_bands)],
        # RMS over radial bins of 10 log10(candidate / reference power); 0 = identical spectra.
        "log_spectral_distance_db": float(log_ratio_db.square().mean().sqrt()),
        "log_spectral_distance_db_per_band": lsd_per_band,
        # Signed mean of the same log ratio: negative = candidate has less power on average.
        "mean_log_spectral_ratio_db": float(log_ratio_db.mean()),
        "spectral_slope_fit_range_cycles_per_pixel": [float(v) for v in slope_fit_range],
        "reference_spectral_slope": spectral_slope(freqs, ref_power, slope_fit_range),
        "candidate_spectral_slope": spectral_slope(freqs, cand_power, slope_fit_range),
        "radial_frequencies_cycles_per_pixel": freqs.tolist(),
        "reference_radial_power": ref_power.tolist(),
        "candidate_radial_power": cand_power.tolist(),
    }


def compare_spectra(
    reference: Any,
    candidate: Any,
    *,
    cutoffs: Sequence[float] = DEFAULT_CUTOFFS,
    band_edges: Sequence[float] = DEFAULT_BAND_EDGES,
    window: str = DEFAULT_WINDOW,
    channels: str = "mean",
    slope_fit_range: Sequence[float] = DEFAULT_SLOPE_FIT_RANGE,
) -> dict[str, Any]:
    """Compare a candidate image set's spectrum with a reference set's (same C x H x W; N may differ).

    Returns plain JSON-serialisable values: "hf_retention" (per cutoff; candidate HF energy over the
    reference's, 1.0 = all detail kept), "hf_ratio_retention", "reference_hf_ratio" /
    "candidate_hf_ratio", "band_energy_ratio" (per band in "band_labels"), "log_spectral_distance_db"
    (overall and "..._per_band"), "reference_spectral_slope" / "candidate_spectral_slope", and the mean
    radial spectra themselves.
    """
    ref = validate_images(reference, "reference")
    cand = validate_images(candidate, "candidate")
    if tuple(ref.shape[1:]) != tuple(cand.shape[1:]):
        raise SpectralInputError(
            f"mismatched sizes: reference images are CxHxW {tuple(ref.shape[1:])}, candidate images "
            f"{tuple(cand.shape[1:])}; compare sets of the same size"
        )
    options = dict(cutoffs=cutoffs, band_edges=band_edges, window=window, channels=channels)
    return compare_statistics(
        spectral_statistics(ref, name="reference", **options),
        spectral_statistics(cand, name="candidate", **options),
        slope_fit_range=slope_fit_range,
    )


def bootstrap_hf_retention(
    reference: SpectralStatistics,
    candidate: SpectralStatistics,
    *,
    num_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Percentile bootstrap interval of hf_retention per cutoff, resampling the images of each set.

    Returns {cutoff: {"estimate", "low", "high"}}; the two sets are resampled independently.
    """
    if num_resamples < 1:
        raise SpectralInputError(f"num_resamples must be at least 1, got {num_resamples}")
    generator = torch.Generator().manual_seed(seed)
    ref_idx = torch.randint(reference.num_images, (num_resamples, reference.num_images), generator=generator)
    cand_idx = torch.randint(candidate.num_images, (num_resamples, candidate.num_images), generator=generator)
    alpha = (1.0 - confidence) / 2.0
    result = {}
    for k, cutoff in enumerate(reference.cutoffs):
        ref_hf = reference.energy_above[:, k][ref_idx].mean(1)
        cand_hf = candidate.energy_above[:, k][cand_idx].mean(1)
        ratios = (cand_hf + ENERGY_FLOOR) / (ref_hf + ENERGY_FLOOR)
        low, high = torch.quantile(ratios, torch.tensor([alpha, 1.0 - alpha], dtype=ratios.dtype)).tolist()
        estimate = _ratio(float(candidate.energy_above[:, k].mean()), float(reference.energy_above[:, k].mean()))
        result[_cutoff_key(cutoff)] = {"estimate": estimate, "low": low, "high": high}
    return result


def high_pass(images: Any, cutoff: float = 0.25) -> torch.Tensor:
    """The part of each image at radii above `cutoff` (ideal FFT high-pass, no window), same shape."""
    x = validate_images(images)
    (cutoff,) = _check_frequencies((cutoff,), "cutoff", allow_zero=False)
    h, w = x.shape[-2:]
    fy = torch.fft.fftfreq(h, dtype=torch.float64, device=x.device)
    fx = torch.fft.rfftfreq(w, dtype=torch.float64, device=x.device)
    keep = (torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) > cutoff).to(x.dtype)
    return torch.fft.irfft2(torch.fft.rfft2(x) * keep, s=(h, w))
