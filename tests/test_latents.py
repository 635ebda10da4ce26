"""Latent space: the SD-VAE loader (tiny random VAE offline; a hub id offline is one line), scripts/extract_latents.py
(ADM centre crop, flips, shards, resume, labels) read back by load_dataset, DiTFamily decoding latents, and the
ImageNet recipes (configs/dmd_sit_xl2_in256*.yaml) run end to end on a tiny imported SiT with the tiny VAE."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from dmd_dar.config import load_config  # noqa: E402
from dmd_dar.data import LatentDataset, load_dataset  # noqa: E402
from dmd_dar.dmd.config import DistillConfig  # noqa: E402
from dmd_dar.dmd.family import DiTFamily  # noqa: E402
from dmd_dar.errors import UserError  # noqa: E402
from dmd_dar.image_io import from_uint8_nhwc  # noqa: E402
from dmd_dar.models import DiT  # noqa: E402
from dmd_dar.t2i.vae import SD_VAE_SCALE, build_tiny_sd_vae, decode_latents_to_images, encode_images, load_sd_vae  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_class_folder(root: Path, per_class=(3, 2, 2), seed=0) -> Path:
    """An ImageNet-style folder: one sub-folder per class, images of assorted sizes and aspect ratios."""
    rng = np.random.default_rng(seed)
    sizes = [(40, 30), (70, 90), (33, 33), (100, 64)]
    for k, n in enumerate(per_class):
        (root / f"n0{k}").mkdir(parents=True)
        for i in range(n):
            w, h = sizes[(k + i) % len(sizes)]
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"n0{k}" / f"img_{i}.png")
    return root


def reference_crop(img: Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop, written independently: box-halve while the short side >= 2 size, bicubic, centre."""
    while min(img.size) >= 2 * size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), Image.Resampling.BOX)
    s = size / min(img.size)
    img = img.resize((round(img.size[0] * s), round(img.size[1] * s)), Image.Resampling.BICUBIC)
    a = np.asarray(img)
    y, x = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[y : y + size, x : x + size]


# ------------------------------------------------------------------------------------------------ the VAE
def test_tiny_vae_has_the_sd_vae_interface_and_round_trips_shapes():
    vae = load_sd_vae("tiny")
    assert vae.config.scaling_factor == SD_VAE_SCALE and vae.config.latent_channels == 4
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = encode_images(vae, images)
        mean = vae.encode(images).latent_dist.mean
        back = decode_latents_to_images(vae, z)
    torch.testing.assert_close(z, mean * SD_VAE_SCALE)  # scaled posterior mean
    assert z.shape == (2, 4, 2, 2) and back.shape == (2, 3, 16, 16) and back.abs().max() <= 1
    assert torch.equal(build_tiny_sd_vae().encoder.conv_in.weight, vae.encoder.conv_in.weight)  # seeded: repeatable


def test_a_vae_hub_id_offline_and_a_missing_folder_are_one_line(tmp_path):
    with pytest.raises(UserError, match="not available offline"):
        load_sd_vae("stabilityai/sd-vae-ft-ema")
    with pytest.raises(UserError, match="not found"):
        load_sd_vae(str(tmp_path / "nowhere"))


# ------------------------------------------------------------------------------------------------ extraction
def test_extract_latents_crops_encodes_flips_shards_and_resumes(tmp_path, capsys):
    data = write_class_folder(tmp_path / "train")
    out = tmp_path / "latents"
    argv = ["--data", str(data), "--out", str(out), "--vae", "tiny", "--image-size", "16", "--flip", "--shard-size", "3",
            "--batch-size", "2", "--dtype", "float32"]
    module = _script("extract_latents")
    module.main(argv)
    index = json.loads((out / "latents.json").read_text())
    assert (index["count"], index["num_classes"], index["latent_shape"], len(index["shards"])) == (14, 3, [4, 2, 2], 3)
    assert index["class_names"] == ["n00", "n01", "n02"] and index["scaling_factor"] == SD_VAE_SCALE

    ds = load_dataset(out, split="all")
    assert isinstance(ds, LatentDataset) and ds.images.shape == (14, 4, 2, 2)
    # the first shard: images 0..2 (class 0), then their mirrored copies
    files = sorted((data / "n00").glob("*.png"))
    pixels = from_uint8_nhwc(np.stack([reference_crop(Image.open(f).convert("RGB"), 16) for f in files]))
    vae = load_sd_vae("tiny")
    with torch.no_grad():
        want = torch.cat([encode_images(vae, pixels), encode_images(vae, pixels.flip(-1))])
    torch.testing.assert_close(ds.images[:6], want)
    assert ds.labels.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 2, 1, 1, 2, 2, 2]  # shard 2: images 3,4,5 (+ flips); shard 3: 6

    # resume: a lost shard (and the index) is re-encoded, the others are not touched
    before = (out / "part-00000.npz").stat().st_mtime_ns
    (out / "part-00001.npz").unlink()
    (out / "latents.json").unlink()
    capsys.readouterr()
    module.main(argv)
    assert "1 to encode here" in capsys.readouterr().out
    assert (out / "part-00000.npz").stat().st_mtime_ns == before
    torch.testing.assert_close(load_dataset(out, split="all").images, ds.images)

    # other settings into the same folder: refused; an unfinished folder (no index) is not a dataset
    with pytest.raises(SystemExit):
        module.main([*argv[:-2], "--dtype", "float16"])
    assert "other settings" in capsys.readouterr().err
    (out / "latents.json").unlink()
    with pytest.raises(UserError):
        LatentDataset(out)


def test_a_flat_folder_gives_unlabelled_latents_and_heldout_splits_stay_latent(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(np.full((20, 24, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    _script("extract_latents").main(["--data", str(folder), "--out", str(tmp_path / "z"), "--vae", "tiny", "--image-size", "8"])
    full = load_dataset(tmp_path / "z", split="all")
    held = load_dataset(tmp_path / "z", split="heldout")
    assert full.labels is None and full.images.dtype == torch.float16 and len(full) == 5
    assert isinstance(held, LatentDataset) and len(held) == 1


def test_the_dit_family_decodes_latents_with_the_recorded_vae(tmp_path):
    model = DiT(input_size=2, patch_size=1, in_channels=4, hidden_size=16, depth=1, num_heads=2, num_classes=3, vae="tiny")
    model.save_pretrained(tmp_path / "m")
    family = DiTFamily(str(tmp_path / "m"), torch.device("cpu"))
    assert family.sample_shape == (4, 2, 2)
    with torch.no_grad():
        images = family.to_images(torch.randn(2, 4, 2, 2))
    assert images.shape == (2, 3, 16, 16)
    copy = family.trainable(model.routing, 0)
    assert copy.config["vae"] == "tiny"  # students carry the latent space
    preview = DiTFamily(str(tmp_path / "m"), torch.device("cpu"), vae="none")
    assert preview.to_images(torch.randn(2, 4, 2, 2)).shape == (2, 3, 2, 2)  # the latent preview
    with pytest.raises(UserError, match="pixel-space"):
        DiTFamily("bundled", torch.device("cpu"), vae="tiny")


# ------------------------------------------------------------------------------------------------ the recipes
def tiny_sit_teacher(tmp: Path) -> Path:
    """A random tiny SiT checkpoint (official layout, learn_sigma) imported by the contract command line."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_import_checkpoint import official_state

    sd = official_state("sit", learn_sigma=True, input_size=4, hidden_size=32, depth=2, num_classes=3, seed=3)
    sd = {k: v * 0.5 if k.startswith("final_layer.linear") else v for k, v in sd.items()}
    torch.save({"ema": sd, "model": sd}, tmp / "sit_tiny.pt")
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "import_checkpoint.py"), "--format", "sit", "--checkpoint",
                           str(tmp / "sit_tiny.pt"), "--out", str(tmp / "teacher"), "--num-heads", "4", "--vae", "tiny"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return tmp / "teacher"


@pytest.mark.parametrize("recipe", ["dmd_sit_xl2_in256.yaml", "dmd_sit_xl2_in256_4step.yaml"])
def test_imagenet_recipe_runs_end_to_end_on_a_tiny_imported_sit(tmp_path, recipe):
    teacher = tiny_sit_teacher(tmp_path)
    latents = tmp_path / "latents"
    _script("extract_latents").main(["--data", str(write_class_folder(tmp_path / "imgs", per_class=(4, 4, 4))), "--out",
                                     str(latents), "--vae", "tiny", "--image-size", "32", "--flip"])
    overrides = [f"teacher={teacher}", f"out_dir={tmp_path / 'run'}", "mixed_precision='no'", "steps=2", "batch_size=2",
                 "fake.updates_per_student_step=1", "log_every=1", "sample_every=2", "checkpoint_every=2",
                 f"gan.dataset={latents}", f"eval.reference={latents}", "eval.grid_images=2", "eval.teacher_steps=2",
                 "eval.every=2", "eval.batch=2", "eval.quality=false", "eval.report_samples=2"]
    cfg = load_config(REPO / "configs" / recipe, overrides, DistillConfig)
    assert cfg.gan.enabled and cfg.student.routing.chunk_size == 4 and cfg.dm.guidance_scale == 1.5
    from dmd_dar.dmd.trainer import run_distillation

    summary = run_distillation(cfg)
    arm = cfg.student.routing.mode
    student = DiT.from_pretrained(Path(summary["arms"][arm]["student"]))
    assert student.config["vae"] == "tiny" and student.config["time_input"] == "1-t" and student.routing.chunk_size == 4
    assert (tmp_path / "run" / arm / "student_grid.png").is_file() and (tmp_path / "run" / "report" / "metrics.json").is_file()
    samples = np.load(tmp_path / "run" / "samples" / f"student_{arm}_{len(cfg.student.timesteps)}step.npz")["arr_0"]
    assert samples.shape == (2, 32, 32, 3)  # decoded by the tiny VAE: pixels, not latents
    log = (tmp_path / "run" / arm / "log.csv").read_text()
    assert "gan_loss" in log and "disc_loss" in log
