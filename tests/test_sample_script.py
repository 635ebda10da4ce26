"""scripts/sample.py on tiny checkpoints: DiT teacher (multi-step, CFG), DiT student (1 and 2 steps), an exported
diffusers student; outputs, known answers, determinism by seed, one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dmd_dar.diffusion import VelocityDenoiser, cfg_denoiser, sample
from dmd_dar.errors import UserError
from dmd_dar.image_io import to_uint8_nhwc
from dmd_dar.models import DiT
from dmd_dar.routing import RoutingConfig
from dmd_dar.sampling import load_sampler_model, sample_checkpoint, write_samples

REPO = Path(__file__).resolve().parents[1]
SIZE, CLASSES = 8, 3


def run_sample(*args):
    return subprocess.run([sys.executable, "scripts/sample.py", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def npz(folder: Path) -> np.ndarray:
    with np.load(folder / "samples.npz") as f:
        return f["arr_0"]


def noise_of(indices, seed, shape):
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in indices])


@pytest.fixture(scope="module")
def dit_folders(tmp_path_factory):
    """A tiny pixel-space DiT teacher and a DAR student of it (router moved off zero)."""
    tmp = tmp_path_factory.mktemp("sample")
    torch.manual_seed(0)
    teacher = DiT(input_size=SIZE, patch_size=4, in_channels=1, hidden_size=16, depth=1, num_heads=2, num_classes=CLASSES)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    teacher.save_pretrained(tmp / "teacher")
    student = DiT.from_pretrained(tmp / "teacher", routing=RoutingConfig(mode="dar"))
    with torch.no_grad():
        for p in student.router.parameters():
            p.add_(0.1 * torch.randn_like(p))
    student.save_pretrained(tmp / "student")
    return tmp


def test_teacher_multistep_with_cfg_matches_the_library_sampler(dit_folders, tmp_path):
    out = tmp_path / "teacher"
    r = run_sample(dit_folders / "teacher", "--labels", "all", "--n", 5, "--sampler", "heun", "--steps", 3,
                   "--cfg-scale", 2.0, "--seed", 7, "--out", out)
    assert r.returncode == 0, r.stderr
    arr = npz(out)
    assert arr.shape == (5, SIZE, SIZE, 1) and arr.dtype == np.uint8
    assert (out / "grid.png").is_file()
    meta = json.loads((out / "sample.json").read_text())
    assert meta["labels"] == [0, 1, 2, 0, 1] and meta["steps"] == 3
    # known answer: image i from noise seeded 7 + i, CFG against the null class, heun 3 steps
    model = DiT.from_pretrained(dit_folders / "teacher").eval()
    with torch.no_grad():
        x = sample(cfg_denoiser(VelocityDenoiser(model), 2.0, model.null_class), noise_of(range(5), 7, (1, SIZE, SIZE)),
                   torch.tensor([0, 1, 2, 0, 1]), sampler="heun", steps=3)
    diff = np.abs(arr.astype(int) - to_uint8_nhwc(x.clamp(-1, 1)).astype(int))
    assert diff.max() <= 1  # float rounding across processes may flip a uint8 step


def test_student_one_step_is_the_x0_prediction_at_t1(dit_folders, tmp_path):
    out = tmp_path / "s1"
    r = run_sample(dit_folders / "student", "--student-steps", 1, "--labels", "2,0", "--out", out)
    assert r.returncode == 0, r.stderr
    arr = npz(out)
    assert arr.shape == (2, SIZE, SIZE, 1)
    model = DiT.from_pretrained(dit_folders / "student").eval()
    with torch.no_grad():
        x0 = VelocityDenoiser(model)(noise_of(range(2), 0, (1, SIZE, SIZE)), torch.ones(2), torch.tensor([2, 0]))
    assert np.abs(arr.astype(int) - to_uint8_nhwc(x0.clamp(-1, 1)).astype(int)).max() <= 1


def test_student_two_steps_deterministic_by_seed_and_independent_of_batch(dit_folders, tmp_path):
    out = tmp_path / "s2"
    r = run_sample(dit_folders / "student", "--timesteps", "1.0,0.5", "--n", 4, "--seed", 3, "--out", out)
    assert r.returncode == 0, r.stderr
    arr = npz(out)
    assert arr.shape == (4, SIZE, SIZE, 1) and arr.dtype == np.uint8
    loaded = load_sampler_model(dit_folders / "student", "cpu")
    same = sample_checkpoint(loaded, n=4, timesteps=[1.0, 0.5], seed=3, batch_size=1).images  # one image per batch
    assert np.abs(to_uint8_nhwc(same).astype(int) - arr.astype(int)).max() <= 1
    other = sample_checkpoint(loaded, n=4, timesteps=[1.0, 0.5], seed=4).images
    assert not torch.allclose(other, same)
    one_step = sample_checkpoint(loaded, n=4, timesteps=[1.0], seed=3).images
    assert not torch.allclose(one_step, same)
    # rewriting the same output folder replaces it; a folder holding other files is refused
    write_samples(sample_checkpoint(loaded, n=2, timesteps=[1.0]), out)
    assert npz(out).shape[0] == 2
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="other files"):
        write_samples(sample_checkpoint(loaded, n=1, timesteps=[1.0]), tmp_path / "busy")


def test_bad_input_is_one_line_and_exit_2(dit_folders, tmp_path):
    r = run_sample(tmp_path / "no_such_model", "--out", tmp_path / "o")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "not found" in r.stderr
    assert not (tmp_path / "o").exists()
    loaded = load_sampler_model(dit_folders / "teacher", "cpu")
    with pytest.raises(UserError, match="labels"):
        sample_checkpoint(loaded, labels="0,7")
    with pytest.raises(UserError, match="timesteps"):
        from dmd_dar.sampling import parse_timesteps

        parse_timesteps("0.5,1.0", None)


def test_exported_diffusers_student_samples_from_cached_prompt_embeddings(tmp_path):
    pytest.importorskip("diffusers")
    from dmd_dar.models.diffusers_dar import convert_to_dar, save_dar_pretrained
    from dmd_dar.t2i import DiffusersDenoiser, build_tiny_transformer, latent_preview, save_prompt_cache, tiny_prompt_encoder

    model = convert_to_dar(build_tiny_transformer("SD3Transformer2DModel"), RoutingConfig(mode="dar"))
    save_dar_pretrained(model, tmp_path / "student")
    prompts = ["a red cube", "a blue sphere", "a green cone"]
    encode = tiny_prompt_encoder(model)
    save_prompt_cache(tmp_path / "cache.safetensors", prompts, encode(prompts), encode([""]))
    (tmp_path / "prompts.txt").write_text("a blue sphere\na red cube\n")

    out = tmp_path / "t2i"
    r = run_sample(tmp_path / "student", "--student-steps", 2, "--prompts", tmp_path / "prompts.txt", "--embeddings",
                   tmp_path / "cache.safetensors", "--vae", "tiny", "--resolution", 64, "--n", 3, "--out", out)
    assert r.returncode == 0, r.stderr
    arr = npz(out)
    assert arr.shape == (3, 64, 64, 3) and arr.dtype == np.uint8
    assert json.loads((out / "sample.json").read_text())["prompts"] == ["a blue sphere", "a red cube", "a blue sphere"]

    # in process, known answer: one step, latent preview of the x0 prediction for prompt "a red cube"
    loaded = load_sampler_model(tmp_path / "student", "cpu")
    got = sample_checkpoint(loaded, prompts=["a red cube"], embeddings=str(tmp_path / "cache.safetensors"), resolution=64,
                            timesteps=[1.0], seed=5).images
    with torch.no_grad():
        x0 = DiffusersDenoiser(loaded.model)(noise_of([0], 5, (4, 8, 8)), torch.ones(1), encode(["a red cube"]))
    torch.testing.assert_close(got, latent_preview(x0), rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="not in the embedding cache"):
        sample_checkpoint(loaded, prompts=["a prompt nobody cached"], embeddings=str(tmp_path / "cache.safetensors"),
                          resolution=64, timesteps=[1.0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_machine_lacks_is_one_line_and_writes_nothing(tmp_path):
    res = run_sample("bundled", "--labels", "all", "--n", 4, "--out", tmp_path / "s", "--device", "cuda")
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and "device 'cuda' is not available" in lines[0], res.stderr[-2000:]
    assert not (tmp_path / "s").exists()
