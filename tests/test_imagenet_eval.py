"""The ImageNet evaluation protocol: scripts/sample.py's sharded, resumable, multi-process sampling into one ADM-format
.npz, and eval/fid.py on ADM reference batches (precomputed mu/sigma and/or images; FID, sFID, precision, recall)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from test_fid import needs_inception  # the one definition of the skip (tests/ is on sys.path under pytest)

from dmd_dar.errors import UserError
from dmd_dar.image_io import to_uint8_nhwc
from dmd_dar.metrics import fid as FID
from dmd_dar.models import DiT
from dmd_dar.sampling import load_sampler_model, plan_sampling, sample_checkpoint, sample_sharded

REPO = Path(__file__).resolve().parents[1]


def _script(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module



@pytest.fixture(scope="module")
def latent_model(tmp_path_factory) -> Path:
    """A tiny latent DiT (4 x 2 x 2 latents, 3 classes) decoded by the tiny VAE into 16 x 16 images."""
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = DiT(input_size=2, patch_size=1, in_channels=4, hidden_size=16, depth=1, num_heads=2, num_classes=3, vae="tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("eval") / "model"
    model.save_pretrained(folder)
    return folder


def run_sample_cli(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["sample.py", *map(str, argv)])
    _script("scripts/sample.py", "sample_script").main()


# --------------------------------------------------------------------------------------------- sampling
def test_sharded_sampling_matches_one_pass_resumes_and_refuses_other_runs(latent_model, tmp_path, monkeypatch, capsys):
    out = tmp_path / "s"
    common = ["--student-steps", "1", "--labels", "all", "--per-class", "3", "--batch-size", "2"]
    run_sample_cli(monkeypatch, latent_model, *common, "--shard-size", "4", "--out", out)
    with np.load(out / "samples.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    meta = json.loads((out / "sample.json").read_text())
    assert images.shape == (9, 16, 16, 3) and images.dtype == np.uint8 and not (out / "shards").exists()
    assert labels.tolist() == [0, 1, 2] * 3 == meta["labels"] and meta["vae"] == "tiny" and meta["shape"] == [3, 16, 16]
    assert (out / "grid.png").is_file()
    # the same images as one in-memory pass (image i from seed + i, whatever the shards or the batch)
    loaded = load_sampler_model(latent_model, "cpu")
    want = to_uint8_nhwc(sample_checkpoint(loaded, n=9, labels="all", timesteps=[1.0], batch_size=5).images)
    np.testing.assert_array_equal(images, want)

    # interrupted: rank 0 of 2 made its shards (0 and 2), rank 1 never ran; the plain command finishes the job
    plan = plan_sampling(loaded, n=9, labels="all", timesteps=[1.0], batch_size=2)
    again = tmp_path / "again"
    with pytest.raises(UserError, match="1 shard"):
        sample_sharded(plan, again, shard_size=4, rank=0, world=2)
    assert sorted(p.name for p in (again / "shards").iterdir()) == ["part-00000.npz", "part-00002.npz", "plan.json"]
    capsys.readouterr()
    run_sample_cli(monkeypatch, latent_model, *common, "--shard-size", "4", "--out", again)
    assert "1 to make here" in capsys.readouterr().out
    with np.load(again / "samples.npz") as f:
        np.testing.assert_array_equal(f["arr_0"], images)

    # shards of another run (another seed) are refused, not mixed in
    mix = tmp_path / "mix"
    other = plan_sampling(loaded, n=9, labels="all", timesteps=[1.0], batch_size=2, seed=1)
    with pytest.raises(UserError, match="1 shard"):
        sample_sharded(other, mix, shard_size=4, rank=0, world=2)
    with pytest.raises(UserError, match="another sampling run"):
        sample_sharded(plan, mix, shard_size=4)

@pytest.mark.slow  # two fresh Python processes importing torch and diffusers: about a minute on 2 busy cores
def test_two_processes_share_the_shards_and_give_the_one_process_result(latent_model, tmp_path):
    """torchrun (as accelerate launch does): rank k makes shards k, k + 2, ...; rank 0 merges after a gloo barrier.
    (--per-class, not --n: torchrun's own parser would take --n for one of its options.)"""
    pytest.importorskip("torch.distributed.run")
    out = tmp_path / "two"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                           "scripts/sample.py", str(latent_model), "--student-steps", "1", "--labels", "all", "--per-class", "4",
                           "--shard-size", "5", "--device", "cpu", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[0/2]" in done.stdout and "[1/2]" in done.stdout
    loaded = load_sampler_model(latent_model, "cpu")
    with np.load(out / "samples.npz") as f:
        np.testing.assert_array_equal(f["arr_0"], to_uint8_nhwc(sample_checkpoint(loaded, n=12, labels="all", timesteps=[1.0]).images))


# --------------------------------------------------------------------------------------------- the Frechet maths
def test_frechet_distance_from_precomputed_statistics_equals_the_one_from_features():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(30, 6)) * 1.5 + 0.3
    mu, sigma = FID.gaussian_statistics(torch.from_numpy(a))
    np.testing.assert_allclose(sigma, np.cov(a, rowvar=False))
    from_features = FID.frechet_distance(torch.from_numpy(a), torch.from_numpy(b))
    from_stats = FID.frechet_distance((mu, sigma), torch.from_numpy(b))
    covmean = scipy.linalg.sqrtm(sigma @ np.cov(b, rowvar=False)).real  # the ADM evaluator's formula
    textbook = ((mu - b.mean(0)) ** 2).sum() + np.trace(sigma) + np.trace(np.cov(b, rowvar=False)) - 2 * np.trace(covmean)
    # float64 throughout; sqrtm and the eigen-decompositions agree to ~1e-12 relative on a 6-d problem: 1e-9 is loose
    assert from_stats == pytest.approx(from_features, rel=1e-9) == pytest.approx(textbook, rel=1e-9)
    assert FID.frechet_distance((mu, sigma), (mu, sigma)) == pytest.approx(0.0, abs=1e-9)


def test_uint8_batches_stream_an_npz_without_loading_it(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (11, 5, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", arr_0=array)
    parts = list(FID.iter_uint8_batches(tmp_path / "x.npz", batch_size=4))
    assert [len(p) for p in parts] == [4, 4, 3]
    np.testing.assert_array_equal(np.concatenate(parts), array)
    np.testing.assert_array_equal(np.concatenate(list(FID.iter_uint8_batches(tmp_path / "x.npz", 4, limit=6))), array[:6])
    np.savez(tmp_path / "f.npz", arr_0=array.astype(np.float32))
    with pytest.raises(UserError, match="uint8"):
        list(FID.iter_uint8_batches(tmp_path / "f.npz"))


# --------------------------------------------------------------------------------------------- the Inception port
def blobs(n: int, seed: int, size: int = 32) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    x = torch.tanh(1.5 * F.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=(size, size), mode="bicubic"))
    return to_uint8_nhwc(x)


@pytest.fixture(scope="module")
def inception():
    return FID.load_inception()


@needs_inception
def test_the_port_exposes_adm_sfid_features_and_the_same_pool3(inception):
    images = torch.from_numpy(blobs(2, 0)).permute(0, 3, 1, 2).float() / 127.5 - 1
    pool, spatial = inception.pool_and_spatial(images)
    torch.testing.assert_close(pool, inception(images), rtol=0, atol=0)  # the same layers in the same order
    assert spatial.shape == (2, FID.SPATIAL_FEATURES) and bool((spatial >= 0).all())  # ReLU outputs, 17 x 17 x 7


@needs_inception
def test_eval_fid_on_an_adm_reference_batch(inception, tmp_path, capsys):
    ref_images, fake_images = blobs(7, 1), blobs(6, 2)
    pool, spatial = FID.uint8_features(ref_images, inception, spatial=True)
    mu, sigma = FID.gaussian_statistics(pool)
    mu_s, sigma_s = FID.gaussian_statistics(spatial)
    np.savez(tmp_path / "ref.npz", arr_0=ref_images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    np.savez(tmp_path / "stats_only.npz", mu=mu, sigma=sigma)
    np.savez(tmp_path / "fake.npz", arr_0=fake_images, arr_1=np.zeros(6, dtype=np.int64))
    cli = _script("eval/fid.py", "fid_script")
    cli.main(["--real", str(tmp_path / "ref.npz"), "--fake", f"student={tmp_path / 'fake.npz'}", "--ref-stats", "both",
              "--metrics", "fid,sfid,precision,recall,is", "--json", str(tmp_path / "m.json"), "--batch-size", "4"])
    printed = capsys.readouterr().out
    got = json.loads((tmp_path / "m.json").read_text())["sets"]["student"]
    fake_pool, fake_spatial = FID.uint8_features(fake_images, inception, spatial=True)
    # precomputed statistics and the images they came from give the same distance (float64 decompositions of a
    # 2048-d covariance of rank 6: rounding ~1e-10 relative to the traces)
    assert got["fid"] == pytest.approx(got["fid_images"], rel=1e-6)
    assert got["fid"] == pytest.approx(FID.frechet_distance(pool, fake_pool), rel=1e-6)
    assert got["sfid"] == pytest.approx(FID.frechet_distance(spatial, fake_spatial), rel=1e-6)
    from dmd_dar.metrics.quality import precision_recall

    assert (got["precision"], got["recall"]) == precision_recall(pool, fake_pool, k=3)
    assert got["is"] is None and "IS not available" in printed and "FID " in printed and "sFID " in printed

    # the default metrics of an ADM batch include precision/recall, which a statistics-only batch cannot give
    with pytest.raises(SystemExit) as stop:
        cli.main(["--real", str(tmp_path / "stats_only.npz"), "--fake", str(tmp_path / "fake.npz")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "no images" in err
