"""In-domain quality metrics (dmd_dar/metrics/quality.py, eval/quality.py): known answers on real MNIST
digits with the bundled classifier, the Fréchet distance against the closed form for Gaussians, the
Inception fallback, and the command line end to end (subprocess) with a bad input."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dmd_dar.data import load_dataset
from dmd_dar.errors import UserError
from dmd_dar.image_io import to_uint8_nhwc
from dmd_dar.metrics import (
    BUNDLED_CLASSIFIER,
    class_accuracy,
    classifier_outputs,
    evaluate_quality,
    frechet_distance,
    kid_from_features,
    load_classifier,
    load_reference,
    precision_recall,
)

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "eval" / "quality.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def heldout():
    return load_dataset("mnist", split="heldout")


@pytest.fixture(scope="module")
def heldout_features(heldout):
    """Classifier features of the 10,000 held-out digits (the cached MNIST reference's own)."""
    return load_reference("mnist").classifier_features(load_classifier())


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = math.ceil(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    padded = F.pad(images, (radius,) * 4, mode="replicate")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(rows, kernel.view(1, 1, -1, 1))


def test_frechet_distance_of_a_set_with_itself_is_zero(heldout_features):
    features = heldout_features[:3000]
    assert abs(frechet_distance(features, features)) < 1e-6 * float(features.double().var(0).sum())
    assert frechet_distance(features, heldout_features[3000:6000]) > 0


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    # samples whitened to have exactly the mean and covariance asked for: FD is then the closed form
    g = torch.Generator().manual_seed(0)
    d, n = 16, 400
    rotation = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]

    def exact_samples(mean, variances):
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        x = x - x.mean(0)
        x = x @ torch.linalg.inv(torch.linalg.cholesky(x.T @ x / (n - 1))).T  # sample covariance = I
        return mean + x @ (rotation * variances.sqrt()).T  # covariance R diag(v) R^T

    mean_a, mean_b = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    var_a, var_b = torch.rand(d, generator=g, dtype=torch.float64) + 0.1, 3 * torch.rand(d, generator=g, dtype=torch.float64)
    expected = float((mean_a - mean_b).square().sum() + (var_a.sqrt() - var_b.sqrt()).square().sum())
    got = frechet_distance(exact_samples(mean_a, var_a), exact_samples(mean_b, var_b))
    assert got == pytest.approx(expected, rel=1e-9)


def test_bundled_classifier_classifies_heldout_digits_at_99_percent(heldout):
    classifier = load_classifier()
    assert load_classifier() is classifier  # loaded once per process
    _, logits = classifier_outputs(heldout.images, classifier)
    accuracy = class_accuracy(logits, heldout.labels)
    assert accuracy >= 0.99
    assert accuracy == pytest.approx(classifier.record["heldout_accuracy"], abs=1e-4)  # what config.json records
    assert sum(p.stat().st_size for p in BUNDLED_CLASSIFIER.iterdir()) < 2_000_000


def test_two_halves_of_real_data_have_precision_and_recall_near_one(heldout_features):
    # a random split: MNIST's test set is ordered (its two halves come from different writers)
    order = torch.randperm(10000, generator=torch.Generator().manual_seed(0))
    precision, recall = precision_recall(heldout_features[order[:5000]], heldout_features[order[5000:]])
    assert precision > 0.85 and recall > 0.85  # k = 3 k-NN balls cover ~90% of a same-size real set
    noisy, _ = precision_recall(heldout_features[order[:5000]], heldout_features[order[5000:]] + 8 * torch.randn(5000, 128))
    assert noisy < 0.5


def test_one_digit_repeated_has_recall_near_zero(heldout, heldout_features):
    one = heldout.images[:1].repeat(1000, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    nearly_one = (one + 0.05 * torch.randn(one.shape, generator=g)).clamp(-1, 1)  # a collapsed generator's jitter
    for collapsed in (one, nearly_one):
        precision, recall = precision_recall(heldout_features[1000:2000], classifier_outputs(collapsed)[0])
        assert recall < 0.05
    assert precision > 0.5  # the digit itself is a real one


def test_fd_grows_monotonically_with_noise_and_with_blur(heldout, heldout_features):
    order = torch.randperm(10000, generator=torch.Generator().manual_seed(0))
    real, clean = heldout_features[order[:5000]], heldout.images[order[5000:6000]]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(clean.shape, generator=g)
    by_noise = [frechet_distance(real, classifier_outputs((clean + s * noise).clamp(-1, 1))[0]) for s in (0, 0.1, 0.2, 0.4, 0.8)]
    by_blur = [frechet_distance(real, classifier_outputs(blur(clean, s) if s else clean)[0]) for s in (0, 0.5, 0.8, 1.2, 2.0)]
    assert all(a < b for a, b in zip(by_noise, by_noise[1:])), by_noise
    assert all(a < b for a, b in zip(by_blur, by_blur[1:])), by_blur


def test_evaluate_quality_on_digits_reports_the_floor_and_the_class_accuracy(heldout):
    train = load_dataset("mnist", split="train")
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:1000]  # not the floor's digits
    images, labels = train.images[pick], train.labels[pick]
    result = evaluate_quality(images, labels)
    assert result["space"] == "classifier" and result["n"] == 1000 and result["n_reference"] == 10000
    assert result["accuracy"] >= 0.99
    assert 0 < result["fd_floor"] and result["fd_to_floor"] == pytest.approx(result["fd"] / result["fd_floor"])
    assert 0.75 < result["fd_to_floor"] < 1.33  # other training digits: at the floor
    wrong = evaluate_quality(images, (labels + 1) % 10)
    assert wrong["accuracy"] < 0.05 and wrong["fd"] == result["fd"]
    with pytest.raises(UserError, match="labels"):
        evaluate_quality(images, labels[:10])
    with pytest.raises(UserError, match=r"\[-1, 1\]"):
        evaluate_quality((images + 1) * 127.5)


def test_other_image_sets_fall_back_to_inception_fid_kid_precision_recall():
    g = torch.Generator().manual_seed(0)
    colour = torch.rand(10, 3, 16, 16, generator=g) * 2 - 1  # Inception costs ~0.13 s an image on a CPU
    result = evaluate_quality(colour[:5], reference=colour[5:])
    assert result["space"] == "inception"
    assert {"fid", "kid", "precision", "recall"} <= result.keys() and "fd" not in result
    assert "kid_std" not in result  # 5 images: one KID subset, no spread to report
    real = torch.randn(400, 8, generator=g)
    same = kid_from_features(real, torch.randn(400, 8, generator=g), subset_size=100, subsets=20)
    shifted = kid_from_features(real, torch.randn(400, 8, generator=g) + 0.5, subset_size=100, subsets=20)
    assert abs(same[0]) < 0.2 * shifted[0] and same[1] is not None and same[1] > 0


def write_run_folder(folder: Path, images: torch.Tensor, labels: list[int]) -> Path:
    folder.mkdir(parents=True)
    np.savez(folder / "samples.npz", arr_0=to_uint8_nhwc(images))
    (folder / "sample.json").write_text(json.dumps({"labels": labels}))
    return folder


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLI), *args], capture_output=True, text=True, env=ENV, timeout=240)


def test_cli_end_to_end_and_bad_input(heldout, tmp_path):
    run = write_run_folder(tmp_path / "run", heldout.images[:400], heldout.labels[:400].tolist())
    noisy = tmp_path / "noisy.npz"
    np.savez(noisy, arr_0=to_uint8_nhwc((heldout.images[400:800] + 0.5 * torch.randn(400, 1, 32, 32)).clamp(-1, 1)))
    out = tmp_path / "quality.json"
    ok = run_cli(str(run), f"noisy={noisy}", "--out", str(out))
    assert ok.returncode == 0, ok.stderr
    lines = [line for line in ok.stdout.splitlines() if line.startswith((str(run), "noisy"))]
    assert len(lines) == 2 and "FD" in lines[0] and "floor" in lines[0] and "accuracy" in lines[0]
    results = json.loads(out.read_text())["sets"]
    assert results[str(run)]["accuracy"] >= 0.99 and "accuracy" not in results["noisy"]
    assert results["noisy"]["fd"] > 3 * results[str(run)]["fd"]

    bad = write_run_folder(tmp_path / "bad", heldout.images[:50], heldout.labels[:49].tolist())
    failed = run_cli(str(run), str(bad), "--out", str(tmp_path / "bad.json"))
    assert failed.returncode == 2
    assert failed.stderr.count("\n") == 1 and "labels" in failed.stderr and "49" in failed.stderr
    assert not (tmp_path / "bad.json").exists()


def test_background_speckle_counts_faint_pixels_away_from_the_strokes_only(heldout):
    from dmd_dar.metrics.quality import background_speckle

    x = torch.zeros(2, 1, 16, 16)  # in [0, 1]; a 4x4 stroke in the corner of each image
    x[:, :, :4, :4] = 1.0
    # background: pixels more than 2 px (Chebyshev) from the stroke = 256 - 6 * 6 = 220 per image
    x[0, 0, 10, 10] = x[0, 0, 12, 3] = x[1, 0, 15, 15] = 0.1  # three faint dots in the background: counted
    x[1, 0, 5, 5] = 0.1  # next to the stroke (distance 2): not background
    x[1, 0, 9, 9] = 4 / 255  # background, but below 8/255
    share = background_speckle(x * 2 - 1)
    assert share == pytest.approx(3 / 440, rel=1e-6)
    assert background_speckle(torch.full((1, 1, 8, 8), -1.0)) == 0.0
    assert background_speckle(heldout.images[:2000]) < 1e-4  # real digits: black backgrounds (2e-6 measured)
    with pytest.raises(UserError, match=r"expected \[-1, 1\]"):
        background_speckle(x * 255)


def test_speckle_cli_writes_the_shares_and_refuses_a_missing_set_with_one_line(tmp_path):
    images = torch.full((3, 1, 8, 8), -1.0)
    images[0, 0, 7, 7] = -0.8  # one faint pixel (0.1 of [0, 1]): 1 of 192 background pixels
    np.savez(tmp_path / "set.npz", to_uint8_nhwc(images))
    script = REPO / "eval" / "speckle.py"
    ok = subprocess.run([sys.executable, script, f"s={tmp_path / 'set.npz'}", "--out", tmp_path / "out.json"],
                        capture_output=True, text=True, env=ENV, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "out.json").read_text())["s"] == pytest.approx(1 / 192)
    bad = subprocess.run([sys.executable, script, str(tmp_path / "missing.npz"), "--out", tmp_path / "bad.json"],
                         capture_output=True, text=True, env=ENV, timeout=300)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), bad.stderr
    assert not (tmp_path / "bad.json").exists()
