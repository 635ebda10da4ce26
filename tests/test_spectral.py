"""Known-answer tests for dmd_dar.spectral (and the image_io boundary helpers)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dmd_dar.errors import UserError
from dmd_dar.image_io import from_uint8_nhwc, load_images, save_images, to_uint8_nhwc
from dmd_dar.spectral import (
    bootstrap_hf_retention,
    compare_spectra,
    high_frequency_ratio,
    high_pass,
    radial_power_spectrum,
    spectral_slope,
    spectral_statistics,
)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny tensors: on the shared 2-core machine, OpenMP threads waiting on each other cost more than
    they save (20x slower under load), so these tests use one thread and restore the setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def power_law_images(n: int, height: int, width: int, beta: float, seed: int = 0) -> torch.Tensor:
    """Random-phase images whose expected power falls as f^-beta, scaled into [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    fy = torch.fft.fftfreq(height, dtype=torch.float64)
    fx = torch.fft.fftfreq(width, dtype=torch.float64)
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    amplitude = radius.clamp_min(1e-9) ** (-beta / 2)
    amplitude[0, 0] = 0.0
    white = torch.randn(n, 1, height, width, generator=generator, dtype=torch.float64)
    images = torch.fft.ifft2(torch.fft.fft2(white) * amplitude).real
    return images / images.abs().amax(dim=(-2, -1), keepdim=True)


def uniform_noise(n: int, channels: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, height, width, generator=generator, dtype=torch.float64) * 2 - 1


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma == 0:
        return images
    radius = int(math.ceil(3 * sigma))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=images.dtype) / sigma) ** 2)
    taps = taps / taps.sum()
    c = images.shape[1]
    x = F.pad(images, (radius, radius, radius, radius), mode="circular")
    x = F.conv2d(x, taps.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, taps.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def grid_fraction_above(height: int, width: int, cutoff: float) -> float:
    fy, fx = torch.fft.fftfreq(height, dtype=torch.float64), torch.fft.fftfreq(width, dtype=torch.float64)
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    return float((radius > cutoff).sum()) / (height * width - 1)  # the DC point carries no energy


@pytest.mark.parametrize("window", ["hann", "none"])
@pytest.mark.parametrize("shape", [(32, 32), (48, 64)])
@pytest.mark.parametrize("beta", [1.0, 2.0, 3.0])
def test_power_law_slope_is_recovered(beta, shape, window):
    images = power_law_images(48, *shape, beta=beta)
    freqs, power = radial_power_spectrum(images, window=window)
    assert spectral_slope(freqs, power) == pytest.approx(-beta, abs=0.1)


@pytest.mark.parametrize("shape", [(32, 32), (24, 40)])
def test_white_noise_is_flat_and_hf_share_matches_geometry(shape):
    images = uniform_noise(128, 3, *shape).float()
    variance = 1.0 / 3.0  # uniform on [-1, 1]
    spectrum = radial_power_spectrum(images, window="none")
    assert spectrum.freqs.shape == spectrum.power.shape == (min(shape) // 2,)
    assert float(spectrum.freqs.min()) > 0 and float(spectrum.freqs.max()) <= 0.5
    assert torch.allclose(spectrum.power, torch.full_like(spectrum.power, variance), rtol=0.08)
    # The Hann window only disturbs the bins next to DC (its main lobe); the rest stays flat.
    hann_power = radial_power_spectrum(images).power
    assert torch.allclose(hann_power[2:], torch.full_like(hann_power[2:], variance), rtol=0.08)
    for cutoff in (0.125, 0.25, 0.375):
        expected = grid_fraction_above(*shape, cutoff)
        assert high_frequency_ratio(images, cutoff, window="none") == pytest.approx(expected, abs=0.01)
        assert high_frequency_ratio(images, cutoff) == pytest.approx(expected, abs=0.02)


@pytest.mark.parametrize("window", ["hann", "none"])
def test_blur_lowers_hf_ratio_monotonically(window):
    images = uniform_noise(16, 3, 32, 32) * 0.5 + power_law_images(16, 32, 32, 2.0) * 0.5
    ratios = [high_frequency_ratio(gaussian_blur(images, s), 0.25, window=window) for s in (0, 0.5, 1.0, 1.5, 2.5)]
    assert all(a > b for a, b in zip(ratios, ratios[1:])), ratios
    retention = compare_spectra(images, gaussian_blur(images, 1.0), window=window)["hf_retention"]
    values = [retention[k] for k in ("0.125", "0.25", "0.375")]
    assert 1 > values[0] > values[1] > values[2] > 0  # blur removes more the higher the frequency


def test_compare_identical_sets():
    images = power_law_images(8, 32, 32, 2.0).float().repeat(1, 3, 1, 1)
    result = compare_spectra(images, images.clone())
    json.dumps(result, allow_nan=False)  # plain JSON values
    assert result["log_spectral_distance_db"] == pytest.approx(0.0, abs=1e-9)
    assert all(v == pytest.approx(0.0, abs=1e-9) for v in result["log_spectral_distance_db_per_band"])
    for key in ("hf_retention", "hf_ratio_retention"):
        assert all(v == pytest.approx(1.0, abs=1e-9) for v in result[key].values())
    assert all(v == pytest.approx(1.0, abs=1e-9) for v in result["band_energy_ratio"])
    assert result["reference_spectral_slope"] == pytest.approx(result["candidate_spectral_slope"])
    assert result["band_labels"] == ["0-0.125", "0.125-0.25", "0.25-0.375", "0.375-0.5"]
    # Extra noise is extra high-frequency energy.
    noisy = (images + 0.2 * uniform_noise(8, 3, 32, 32).float()).clamp(-1, 1)
    assert compare_spectra(images, noisy)["hf_retention"]["0.375"] > 1.0


@pytest.mark.parametrize("shape", [(16, 16), (12, 20), (15, 9)])
def test_parseval_energy_is_pixel_variance(shape):
    images = uniform_noise(6, 3, *shape, seed=3) * 0.7
    plain = spectral_statistics(images, window="none")
    expected = images.var(dim=(-2, -1), unbiased=False).mean(1)  # mean over channels
    assert torch.allclose(plain.energy, expected, rtol=1e-10)
    # Hann: the window-weighted variance, normalised by the window's energy sum(w^2).
    h, w = shape
    win = torch.outer(torch.hann_window(h, dtype=torch.float64), torch.hann_window(w, dtype=torch.float64))
    weighted_mean = (images * win).sum((-2, -1), keepdim=True) / win.sum()
    expected_hann = (((images - weighted_mean) * win) ** 2).sum((-2, -1)).mean(1) / (win**2).sum()
    hann = spectral_statistics(images, window="hann")
    assert torch.allclose(hann.energy, expected_hann, rtol=1e-10)
    # Energy above a cutoff is the energy of the ideal high-pass image (no window).
    detail = high_pass(images, 0.25)
    assert torch.allclose(plain.energy_above[:, 1], detail.var(dim=(-2, -1), unbiased=False).mean(1), rtol=1e-8)


def test_per_image_ratio_and_options():
    images = torch.cat([uniform_noise(3, 3, 16, 16), gaussian_blur(uniform_noise(3, 3, 16, 16, seed=1), 1.5)])
    per_image = high_frequency_ratio(images, per_image=True)
    assert per_image.shape == (6,) and bool(((per_image >= 0) & (per_image <= 1)).all())
    assert float(per_image[:3].min()) > float(per_image[3:].max())  # noise has more detail than blur
    stats = spectral_statistics(images, cutoffs=(0.25,))
    pooled = float((per_image * stats.energy).sum() / stats.energy.sum())
    assert high_frequency_ratio(images) == pytest.approx(pooled, rel=1e-9)
    # numpy input, float32 input and torch float64 input agree.
    assert high_frequency_ratio(images.numpy()) == pytest.approx(high_frequency_ratio(images), rel=1e-12)
    assert high_frequency_ratio(images.float()) == pytest.approx(high_frequency_ratio(images), rel=1e-4)
    # Luminance of a grey image (equal channels) is the grey image itself.
    grey = uniform_noise(4, 1, 16, 16)
    lum = radial_power_spectrum(grey.repeat(1, 3, 1, 1), channels="luminance").power
    assert torch.allclose(lum, radial_power_spectrum(grey).power, rtol=1e-9)
    assert high_frequency_ratio(torch.zeros(2, 3, 8, 8)) == 0.0  # constant images: no energy, share 0


def test_bootstrap_interval_brackets_estimate():
    ref = spectral_statistics(uniform_noise(40, 1, 16, 16))
    cand = spectral_statistics(gaussian_blur(uniform_noise(40, 1, 16, 16, seed=1), 0.7))
    ci = bootstrap_hf_retention(ref, cand, num_resamples=200, seed=0)
    for key, value in ci.items():
        assert value["low"] <= value["estimate"] <= value["high"] < 1.0
    assert bootstrap_hf_retention(ref, cand, num_resamples=200, seed=0) == ci  # seeded


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.full((2, 3, 8, 8), float("nan")), "NaN"),
        (torch.full((2, 3, 8, 8), float("inf")), "NaN or inf"),
        (torch.zeros(3, 8, 8), "rank 4"),
        (torch.full((2, 3, 8, 8), 1.5), "[-1, 1]"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "from_uint8_nhwc"),
        (np.zeros((2, 8, 8, 3), dtype=np.uint8), "from_uint8_nhwc"),
        (torch.zeros(2, 8, 8, 3), "NCHW"),
        (torch.zeros(0, 3, 8, 8), "empty"),
        ([[0.0]], "torch tensor or numpy array"),
    ],
)
def test_bad_images_raise_value_error(images, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        high_frequency_ratio(images)


def test_bad_comparisons_and_options_raise_value_error():
    with pytest.raises(ValueError, match="mismatched sizes"):
        compare_spectra(torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 16, 24))
    with pytest.raises(ValueError, match="mismatched sizes"):
        compare_spectra(torch.zeros(2, 3, 16, 16), torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="window"):
        radial_power_spectrum(torch.zeros(2, 3, 16, 16), window="hamming")
    with pytest.raises(ValueError, match="cutoffs"):
        high_frequency_ratio(torch.zeros(2, 3, 16, 16), cutoff=0.7)


def test_image_io_round_trip(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, size=(5, 12, 10, 3), dtype=np.uint8)
    images = from_uint8_nhwc(array)
    assert images.shape == (5, 3, 12, 10) and float(images.min()) >= -1 and float(images.max()) <= 1
    assert np.array_equal(to_uint8_nhwc(images), array)
    for target in (tmp_path / "set.npz", tmp_path / "pngs"):
        save_images(images, target)
        assert torch.equal(load_images(target), images)
    with pytest.raises(UserError, match="no such file"):
        load_images(tmp_path / "missing")
    np.savez(tmp_path / "bad.npz", arr_0=array[..., 0])
    with pytest.raises(UserError, match="shape"):
        load_images(tmp_path / "bad.npz")
    with pytest.raises(UserError, match="uint8"):
        from_uint8_nhwc(array.astype(np.float32))
