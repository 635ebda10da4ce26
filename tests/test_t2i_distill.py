"""Text-to-image DMD through the same trainer: the four real recipes (configs/dmd_*.yaml) with their model swapped
for a tiny random one of the same class, run end to end offline; plus the family's objective and guidance."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from dmd_dar.checkpoint import load_model_files  # noqa: E402
from dmd_dar.config import load_config  # noqa: E402
from dmd_dar.dmd.config import DistillConfig
from dmd_dar.dmd.trainer import run_distillation  # noqa: E402
from dmd_dar.errors import UserError  # noqa: E402
from dmd_dar.models.diffusers_dar import load_dar_pretrained  # noqa: E402
from dmd_dar.routing import RoutingConfig  # noqa: E402
from dmd_dar.t2i import DiffusersDenoiser, DiffusersFamily, T2IConfig, latent_preview  # noqa: E402
from dmd_dar.training import latest_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cube", "a cat in the snow", "a city at night"]

# (config, VAE for the tiny run): two recipes decode with a tiny random VAE, two use the latent preview
RECIPES = [("dmd_qwen_image.yaml", "tiny"), ("dmd_sd3.yaml", "null"), ("dmd_flux.yaml", "null"), ("dmd_pixart.yaml", "tiny")]


def write_prompts(tmp: Path) -> Path:
    path = tmp / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def tiny_overrides(tmp: Path, vae: str) -> list[str]:
    """Keep every recipe setting (routing, LoRA rank, timesteps, guidance, optimiser) but swap the model for a tiny
    random one and shrink the run: 8x8 latents, batch 2, 2 student steps, one fake update each."""
    return [
        "teacher=tiny", "t2i.tiny=true", f"t2i.vae={vae}", "t2i.resolution=64", "t2i.dtype=float32", "mixed_precision='no'",  # quoted: YAML reads a bare no as false
        f"t2i.prompts={write_prompts(tmp)}", f"t2i.embeddings_cache={tmp / 'prompts.safetensors'}", f"out_dir={tmp / 'run'}",
        "steps=2", "batch_size=2", "fake.updates_per_student_step=1", "log_every=1", "sample_every=2", "checkpoint_every=2",
        "eval.grid_images=2", "eval.teacher_steps=2", "eval.every=2", "eval.batch=2", "eval.quality=false", "eval.report_samples=0",
    ]


@pytest.mark.parametrize("recipe,vae", RECIPES, ids=[r[0].removesuffix(".yaml") for r in RECIPES])
def test_recipe_runs_end_to_end_on_a_tiny_model_and_exports_a_loadable_student(tmp_path, recipe, vae):
    report = ["eval.report_samples=2"] if recipe == "dmd_qwen_image.yaml" else []  # the spectral report once, tiny
    cfg = load_config(REPO / "configs" / recipe, tiny_overrides(tmp_path, vae) + report, DistillConfig)
    assert cfg.backbone == "diffusers" and cfg.student.lora_rank == 64 and len(cfg.student.timesteps) == 4
    summary = run_distillation(cfg)
    arm = cfg.student.routing.mode
    folder = Path(summary["arms"][arm]["student"])
    assert (tmp_path / "run" / "teacher_grid.png").is_file() and (tmp_path / "run" / arm / "student_grid.png").is_file()
    assert (tmp_path / "run" / "report" / "metrics.json").is_file() == bool(report)

    exported = load_dar_pretrained(folder)  # one call
    assert exported.routing == cfg.student.routing
    assert not any("lora_" in n for n, _ in exported.named_parameters())
    assert any(p.abs().max() > 0 for p in exported.router.parameters())  # the router was trained (starts at zero)

    # the in-memory student at the last step (LoRA not merged), rebuilt from the run checkpoint
    family = DiffusersFamily("tiny", cfg.t2i, "cpu")
    student = family.trainable(cfg.student.routing, cfg.student.lora_rank).eval()
    student.load_state_dict(load_model_files(latest_checkpoint(tmp_path / "run" / arm) / "student").state_dict)
    x = torch.randn(2, *family.sample_shape, generator=torch.Generator().manual_seed(0))
    t, cond = torch.tensor([1.0, 0.5]), family.conditions(torch.tensor([0, 2]))
    # Compared in float64, so the forward's own reductions add ~1e-16 whatever the CPU or thread count; what is
    # left is the float32 rounding of the merged weights (W + BA stored in float32: relative 2^-24 ~ 6e-8 per
    # weight), which a network of this depth turns into ~1e-6 at most: 1e-5 keeps a 10x margin.
    with torch.no_grad():
        want = family.denoiser(student.double())(x.double(), t.double(), cond.to(dtype=torch.float64))
        got = family.denoiser(exported.double())(x.double(), t.double(), cond.to(dtype=torch.float64))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got = got.float()
    images = family.to_images(got)
    side = 64 if vae == "tiny" else 8  # decoded pixels, or the latent preview (first 3 of 4 channels)
    assert images.shape == (2, 3, side, side)
    assert images.min() >= -1 and images.max() <= 1


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("t2i")
    prompts = write_prompts(tmp)
    out = {}
    for cls in ("SD3Transformer2DModel", "FluxTransformer2DModel", "PixArtTransformer2DModel"):
        cfg = T2IConfig(model_class=cls, tiny=True, prompts=str(prompts), embeddings_cache=str(tmp / f"{cls}.safetensors"), resolution=64)
        out[cls] = DiffusersFamily("tiny", cfg, "cpu")
    return out


def loss_minimiser(family, model, x0, noise, t, cond, prediction):
    """The model output that makes the denoising loss zero, read off the loss's gradient (MSE: grad = 2 (P - target) / N)."""
    p = torch.zeros_like(x0, requires_grad=True)
    real = DiffusersDenoiser.model_output
    DiffusersDenoiser.model_output = lambda self, *a: p
    try:
        family.cfg.prediction = prediction
        family.denoising_loss(model, x0, noise, t, cond).backward()
    finally:
        DiffusersDenoiser.model_output = real
    return (-p.grad * p.numel() / 2).detach()


@pytest.mark.parametrize("cls,prediction", [("SD3Transformer2DModel", "flow"), ("PixArtTransformer2DModel", "vp_eps"),
                                      ("PixArtTransformer2DModel", "vp_v")])
def test_denoising_loss_is_the_teachers_objective_in_its_own_parameterisation(families, monkeypatch, cls, prediction):
    """The output that minimises the loss is exactly the one the x0 adapter turns into the true x0."""
    family = families[cls]
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, *family.sample_shape, generator=g), torch.randn(2, *family.sample_shape, generator=g)
    t = torch.tensor([0.3, 0.8])
    cond = family.conditions(torch.tensor([0, 1]))
    model = family.teacher()
    try:
        target = loss_minimiser(family, model, x0, noise, t, cond, prediction)
        monkeypatch.setattr(DiffusersDenoiser, "model_output", lambda self, *a: target)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        torch.testing.assert_close(family.denoiser(model)(x_t, t, cond), x0, rtol=1e-4, atol=1e-4)
    finally:
        family.cfg.prediction = None


def test_real_score_uses_cfg_against_the_empty_prompt_or_flux_guidance_embedding(families):
    g = torch.Generator().manual_seed(2)
    ids = torch.tensor([0, 2])
    sd3 = families["SD3Transformer2DModel"]
    x, t = torch.randn(2, *sd3.sample_shape, generator=g), torch.tensor([0.4, 0.9])
    with torch.no_grad():
        cond = sd3.conditions(ids)
        guided = sd3.real_score(sd3.teacher(), 4.0)(x, t, cond)
        x_c = sd3.denoiser(sd3.teacher())(x, t, cond)
        x_u = sd3.denoiser(sd3.teacher())(x, t, sd3.null.expand(2))
    torch.testing.assert_close(guided, x_u + 4.0 * (x_c - x_u), rtol=1e-4, atol=1e-4)

    flux = families["FluxTransformer2DModel"]
    assert flux.has_guidance_embed
    with torch.no_grad():
        cond = flux.conditions(ids)
        real = flux.real_score(flux.teacher(), 5.0)(x, t, cond)
        by_embedding = DiffusersDenoiser(flux.teacher(), guidance=5.0)(x, t, cond)
        student_view = flux.denoiser(flux.teacher())(x, t, cond)  # guidance_embed = 3.5
    torch.testing.assert_close(real, by_embedding)
    assert not torch.allclose(real, student_view)


def test_family_shapes_conditions_and_user_errors(families, tmp_path):
    pixart = families["PixArtTransformer2DModel"]
    assert pixart.sample_shape == (4, 8, 8) and pixart.num_conditions == len(PROMPTS)
    cond = pixart.conditions(torch.tensor([2, 0]))
    torch.testing.assert_close(cond.prompt_embeds[1], pixart.prompts.condition.prompt_embeds[0])
    assert cond.attention_mask is not None and pixart.null.batch_size == 1
    # fake score: residual routing is the stock function bit for bit; LoRA leaves only LoRA + router trainable
    fake = pixart.trainable(RoutingConfig(), lora_rank=4)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.2, 0.7])
    with torch.no_grad():
        assert torch.equal(pixart.denoiser(fake)(x, t, cond), pixart.denoiser(pixart.teacher())(x, t, cond))
    assert all(("lora_" in n or n.startswith("router.")) == p.requires_grad for n, p in fake.named_parameters())
    # latent preview: a fixed map of the first 3 channels
    z = torch.tensor([6.0, -1.5, 0.0, 9.0]).view(1, 4, 1, 1)
    assert latent_preview(z).flatten().tolist() == [1.0, -0.5, 0.0]
    with pytest.raises(UserError, match="gan.enabled"):
        pixart.hidden_features(fake, x, t, cond)
    with pytest.raises(UserError, match="not found"):
        DiffusersFamily(str(tmp_path / "missing"), dataclasses.replace(pixart.cfg, tiny=False), "cpu")
    with pytest.raises(UserError, match="family: dit"):
        DiffusersFamily("tiny", T2IConfig(model_class="DiTTransformer2DModel", tiny=True), "cpu")
    with pytest.raises(UserError, match="multiple of"):
        DiffusersFamily("tiny", dataclasses.replace(pixart.cfg, resolution=60), "cpu")


def test_real_loading_path_local_folder_offline_errors_and_precomputed_cache(tmp_path):
    """Not tiny: the teacher comes from a local diffusers folder; text encoders that are not there (a model folder is
    no pipeline root, a hub id offline) are one UserError line; a precomputed cache needs no text encoder."""
    from dmd_dar.t2i import build_tiny_transformer, save_prompt_cache, tiny_prompt_encoder

    model = build_tiny_transformer("SD3Transformer2DModel")
    model.save_pretrained(tmp_path / "sd3" / "transformer")  # a pipeline-root layout without text encoders
    prompts = write_prompts(tmp_path)
    cfg = T2IConfig(model_class="SD3Transformer2DModel", prompts=str(prompts), embeddings_cache=str(tmp_path / "c.safetensors"), resolution=64)
    with pytest.raises(UserError, match="model_index.json") as err:
        DiffusersFamily(str(tmp_path / "sd3"), cfg, "cpu")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="not available offline"):
        DiffusersFamily("stabilityai/stable-diffusion-3.5-medium", cfg, "cpu")

    encode = tiny_prompt_encoder(model)
    save_prompt_cache(tmp_path / "c.safetensors", PROMPTS, encode(PROMPTS), encode([""]))
    family = DiffusersFamily(str(tmp_path / "sd3"), cfg, "cpu")  # the cache holds exactly the prompts: no encoder needed
    assert family.num_conditions == 3 and family.sample_shape == (4, 8, 8)
    with torch.no_grad():
        x = torch.randn(1, 4, 8, 8)
        torch.testing.assert_close(family.denoiser(family.teacher())(x, torch.ones(1), family.conditions(torch.tensor([1]))),
                                   DiffusersDenoiser(model.eval())(x, torch.ones(1), encode([PROMPTS[1]])))


def test_a_hub_teacher_offline_is_exactly_one_line_and_writes_nothing(tmp_path):
    import os
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "scripts/distill.py", "--config", "configs/dmd_sd3.yaml", f"out_dir={tmp_path / 'run'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and "not available offline" in lines[0], res.stderr[-2000:]
    assert not (tmp_path / "run").exists()
