"""Teacher adapters (x0 interface), TextCondition, prompt cache, LoRA targets. Tiny random models, offline."""
from __future__ import annotations

import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from dmd_dar.diffusion import cfg_denoiser, flow_t_to_vp, interpolate, vp_to_flow_t  # noqa: E402
from dmd_dar.errors import UserError  # noqa: E402
from dmd_dar.models.diffusers_dar import convert_to_dar, load_dar_pretrained, save_dar_pretrained  # noqa: E402
from dmd_dar.models.lora import apply_lora, lora_targets, merge_lora, trainable_parameters  # noqa: E402
from dmd_dar.routing import RoutingConfig  # noqa: E402
from dmd_dar.t2i import (  # noqa: E402
    DiffusersDenoiser,
    TextCondition,
    ddpm_linear_alphas_cumprod,
    flux_image_ids,
    load_teacher,
    pack_latents,
    unpack_latents,
)

B, C, H, W = 2, 4, 8, 8


def jitter(model, scale=0.1):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def build(family):
    torch.manual_seed(0)
    if family == "sd3":
        return diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=C, num_layers=2, attention_head_dim=8,
                                               num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                               pooled_projection_dim=8, out_channels=C, pos_embed_max_size=8)
    if family == "flux":
        return diffusers.FluxTransformer2DModel(patch_size=1, in_channels=4 * C, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                                num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                                                guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    if family == "qwen":
        return diffusers.QwenImageTransformer2DModel(patch_size=2, in_channels=4 * C, out_channels=C, num_layers=1, attention_head_dim=8,
                                                     num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4))
    if family == "pixart":  # learned sigma: 2C output channels, like the real checkpoints
        return diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=C, out_channels=2 * C,
                                                  num_layers=1, sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=12)
    if family == "dit":
        return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=C, out_channels=2 * C,
                                               num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    raise KeyError(family)


def condition(family, batch=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    if family == "dit":
        return torch.tensor([1, 10][:batch])
    if family == "pixart":
        return TextCondition(torch.randn(batch, 5, 12, generator=g), attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1] * 5][:batch]))
    if family == "qwen":
        return TextCondition(torch.randn(batch, 5, 16, generator=g), attention_mask=torch.ones(batch, 5, dtype=torch.long))
    return TextCondition(torch.randn(batch, 5, 16, generator=g), torch.randn(batch, 8, generator=g))


def known_sample(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(B, C, H, W, generator=g), torch.randn(B, C, H, W, generator=g)
    t = torch.tensor([0.3, 0.85])
    return x0, eps, t, interpolate(x0, eps, t)


# ------------------------------------------------------------------------------------------ flow adapters
@pytest.mark.parametrize("family,timestep_scale", [("sd3", 1000.0), ("flux", 1.0), ("qwen", 1.0)])
def test_flow_adapter_recovers_x0_from_exact_velocity(monkeypatch, family, timestep_scale):
    x0, eps, t, x_t = known_sample()
    model = build(family)
    seen = {}

    def exact_velocity(hidden_states, timestep=None, return_dict=True, **kwargs):
        seen["timestep"], seen["kwargs"] = timestep, kwargs
        v = eps - x0
        out = v if family == "sd3" else pack_latents(v)
        assert out.shape == hidden_states.shape  # the adapter feeds the model's own layout
        return (out,)

    monkeypatch.setattr(model, "forward", exact_velocity)
    teacher = DiffusersDenoiser(model)
    torch.testing.assert_close(teacher(x_t, t, condition(family)), x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(seen["timestep"], timestep_scale * t)
    if family == "flux":  # guidance-distilled: the scale goes to the guidance embedding
        torch.testing.assert_close(seen["kwargs"]["guidance"], torch.full((B,), 3.5))
        assert seen["kwargs"]["img_ids"].shape == (H // 2 * W // 2, 3)


@pytest.mark.parametrize("family", ["sd3", "flux", "qwen"])
def test_flow_adapter_on_real_tiny_model_matches_hand_conversion(family):
    model = jitter(build(family))
    _, _, t, x_t = known_sample(1)
    cond = condition(family)
    with torch.no_grad():
        x0 = DiffusersDenoiser(model)(x_t, t, cond)
        if family == "sd3":
            v = model(x_t, encoder_hidden_states=cond.prompt_embeds, pooled_projections=cond.pooled_prompt_embeds, timestep=1000 * t).sample
        elif family == "flux":
            v = unpack_latents(model(pack_latents(x_t), encoder_hidden_states=cond.prompt_embeds, pooled_projections=cond.pooled_prompt_embeds,
                                     timestep=t, img_ids=flux_image_ids(H, W), txt_ids=torch.zeros(5, 3), guidance=torch.full((B,), 3.5)).sample, H, W)
        else:
            v = unpack_latents(model(pack_latents(x_t), encoder_hidden_states=cond.prompt_embeds, encoder_hidden_states_mask=cond.attention_mask,
                                     timestep=t, img_shapes=[[(1, H // 2, W // 2)]] * B).sample, H, W)
    torch.testing.assert_close(x0, x_t - t.view(-1, 1, 1, 1) * v)


def test_pack_unpack_round_trip_and_layout():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    tokens = pack_latents(x)
    assert tokens.shape == (2, 6, 12)
    assert torch.equal(tokens[0, 0], torch.stack([x[0, c, i, j] for c in range(3) for i in range(2) for j in range(2)]))
    assert torch.equal(unpack_latents(tokens, 4, 6), x)


# ------------------------------------------------------------------------------------------ VP adapters
@pytest.mark.parametrize("family", ["dit", "pixart"])
@pytest.mark.parametrize("prediction", ["vp_eps", "vp_v"])
def test_vp_adapter_recovers_x0(monkeypatch, family, prediction):
    x0, eps, t, x_t = known_sample(2)
    model = build(family)
    ac = ddpm_linear_alphas_cumprod()
    seen = {}

    def exact_prediction(hidden_states, timestep=None, return_dict=True, **kwargs):
        seen["x_vp"], seen["timestep"] = hidden_states, timestep
        ab = flow_t_to_vp(t).view(-1, 1, 1, 1)
        pred = eps if prediction == "vp_eps" else ab.sqrt() * eps - (1 - ab).sqrt() * x0
        return (torch.cat([pred, torch.full_like(pred, 1e3)], dim=1),)  # + a learned-variance half to drop

    monkeypatch.setattr(model, "forward", exact_prediction)
    teacher = DiffusersDenoiser(model, prediction=prediction, alphas_cumprod=ac)
    torch.testing.assert_close(teacher(x_t, t, condition(family)), x0, rtol=0, atol=1e-4)
    # the VP input has the same SNR: sqrt(ab) x0 + sqrt(1 - ab) eps
    ab = flow_t_to_vp(t).view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["x_vp"], ab.sqrt() * x0 + (1 - ab).sqrt() * eps)
    # the discrete timestep is the fractional index of that alpha_bar in the schedule
    k = seen["timestep"].double()
    lo = k.floor().long()
    log_snr = lambda a: torch.log(a) - torch.log1p(-a)  # noqa: E731
    interp = log_snr(ac[lo]) + (k - lo) * (log_snr(ac[lo + 1]) - log_snr(ac[lo]))
    torch.testing.assert_close(interp, log_snr(flow_t_to_vp(t).double()), rtol=0, atol=1e-6)


def test_vp_timestep_round_trip_and_clamp():
    teacher = DiffusersDenoiser(build("dit"))
    ac = teacher.alphas_cumprod
    k = torch.tensor([0.0, 10.0, 499.0, 999.0], dtype=torch.float64)
    t = vp_to_flow_t(ac[k.long()])
    torch.testing.assert_close(teacher.vp_timestep(t).double(), k, rtol=0, atol=1e-3)
    torch.testing.assert_close(flow_t_to_vp(vp_to_flow_t(ac)), ac)
    ends = teacher.vp_timestep(torch.tensor([0.0, 1.0]))  # outside the schedule's SNR range: its ends
    torch.testing.assert_close(ends.double(), torch.tensor([0.0, 999.0], dtype=torch.float64))


def test_vp_adapter_on_real_tiny_dit_matches_hand_conversion():
    model = jitter(build("dit"))
    _, _, t, x_t = known_sample(3)
    labels = condition("dit")
    teacher = DiffusersDenoiser(model)
    with torch.no_grad():
        x0 = teacher(x_t, t, labels)
        ab = flow_t_to_vp(t).view(-1, 1, 1, 1)
        x_vp = x_t / ((1 - t) ** 2 + t**2).sqrt().view(-1, 1, 1, 1)
        eps = model(x_vp, timestep=teacher.vp_timestep(t), class_labels=labels).sample[:, :C]
    torch.testing.assert_close(x0, (x_vp - (1 - ab).sqrt() * eps) / ab.sqrt())


def test_prediction_mismatch_is_user_error():
    with pytest.raises(UserError, match="does not fit"):
        DiffusersDenoiser(build("dit"), prediction="flow")


# ------------------------------------------------------------------------------------------ conditions and CFG
def test_text_condition_cat_and_cfg():
    model = jitter(build("sd3"))
    teacher = DiffusersDenoiser(model)
    cond, null = condition("sd3"), condition("sd3", batch=1, seed=5)
    both = cond.cat(null)
    assert both.batch_size == 2 * B and torch.equal(both.prompt_embeds[B:], null.prompt_embeds.expand(B, -1, -1))
    _, _, t, x_t = known_sample(4)
    with torch.no_grad():
        guided = cfg_denoiser(teacher, 4.0, null.to_dict())(x_t, t, cond.to_dict())
        x_c, x_u = teacher(x_t, t, cond), teacher(x_t, t, null.expand(B))
    torch.testing.assert_close(guided, x_u + 4.0 * (x_c - x_u), rtol=1e-5, atol=1e-5)
    masked = condition("pixart")
    no_mask = TextCondition(torch.zeros(1, 5, 12))
    assert masked.cat(no_mask).attention_mask[B:].eq(1).all()
    with pytest.raises(ValueError, match="max_sequence_length"):
        cond.cat(TextCondition(torch.zeros(1, 7, 16), torch.zeros(1, 8)))


# ------------------------------------------------------------------------------------------ loading
def test_missing_local_path_is_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_teacher(tmp_path / "nope", arch="sd3")
    with pytest.raises(UserError, match="unknown"):
        load_teacher(tmp_path, arch="sdxl")


def test_offline_hub_id_is_user_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="not available offline.*local path"):
        load_teacher("black-forest-labs/FLUX.1-dev", arch="flux")


def test_load_teacher_from_local_pipeline_folder(tmp_path):
    model = jitter(build("qwen"))
    model.save_pretrained(tmp_path / "pipe" / "transformer")
    teacher = load_teacher(tmp_path / "pipe", arch="qwen_image")
    assert teacher.prediction == "flow" and not any(p.requires_grad for p in teacher.parameters())
    for a, b in zip(teacher.transformer.parameters(), model.parameters()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------ LoRA
@pytest.mark.parametrize("family", ["sd3", "flux", "qwen", "pixart", "dit"])
def test_lora_targets_apply_to_converted_models(family, tmp_path):
    pytest.importorskip("peft")
    model = jitter(build(family))
    student = convert_to_dar(copy.deepcopy(model), RoutingConfig(mode="dar"), route_text=family in ("sd3", "flux", "qwen"))
    targets = lora_targets(student)
    assert targets and all(not name.startswith(("router", "text_router")) for name in targets)
    assert any(name.endswith("to_q") for name in targets)
    if family in ("sd3", "flux", "qwen"):
        assert any(name.endswith("add_q_proj") for name in targets)
    teacher, adapter = DiffusersDenoiser(model), DiffusersDenoiser(student)
    _, _, t, x_t = known_sample(5)
    cond = condition(family)
    with torch.no_grad():
        before = adapter(x_t, t, cond)
    apply_lora(student, rank=2)
    wrapped = [n for n, m in student.named_modules() if hasattr(m, "lora_A")]
    assert sorted(wrapped) == targets
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith(("router.", "text_router.")) for n in trainable)
    with torch.no_grad():  # LoRA starts at zero: same function
        torch.testing.assert_close(adapter(x_t, t, cond), before)
    adapter(x_t, t, cond).square().mean().backward()
    assert len(trainable_parameters(student)) == len(trainable)
    no_grad = [n for n, p in student.named_parameters() if p.requires_grad and p.grad is None]
    # only Qwen-Image's last text output projection is dead (its text stream is discarded, as in the stock model)
    assert all(".to_add_out." in n for n in no_grad), no_grad
    assert student.router.query_static.grad.abs().sum() > 0
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
        tuned = adapter(x_t, t, cond)
        assert (tuned - teacher(x_t, t, cond)).abs().max() > 1e-4
        tuned64 = DiffusersDenoiser(copy.deepcopy(student).double())(x_t.double(), t.double(), cond.to(dtype=torch.float64))
    with pytest.raises(UserError, match="merge_lora"):
        save_dar_pretrained(student, tmp_path / "s")
    merge_lora(student)
    save_dar_pretrained(student, tmp_path / "s")
    # Compared in float64 (issue 15: float32 sums differ between CPUs and thread counts): the forwards' own reductions
    # then add ~1e-16, and what is left is the float32 rounding of the merged weights W + BA (relative 2^-24 ~ 6e-8 per
    # weight), which this tiny network turns into ~1e-6 at most: 1e-5 keeps a 10x margin.
    with torch.no_grad():
        merged = DiffusersDenoiser(load_dar_pretrained(tmp_path / "s").double())
        torch.testing.assert_close(merged(x_t.double(), t.double(), cond.to(dtype=torch.float64)), tuned64, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ prompt cache
def _tiny_clip():
    """A word-level tokenizer built in code + a tiny random CLIP text encoder (no downloads)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]", "a", "red", "cat", "blue", "dog", "on", "the", "moon"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    config = transformers.CLIPTextConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=8, projection_dim=8, eos_token_id=1)
    torch.manual_seed(0)
    return tokenizer, transformers.CLIPTextModel(config).eval()


def test_prompt_cache_built_once(tmp_path):
    from dmd_dar.t2i import build_prompt_cache, load_prompt_cache, transformers_prompt_encoder

    tokenizer, encoder = _tiny_clip()
    base = transformers_prompt_encoder(tokenizer, encoder, max_length=6, with_mask=True)
    calls = []

    def encode(prompts):
        calls.append(list(prompts))
        return base(prompts)

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n\n the blue dog on the moon \n")
    cache = build_prompt_cache(prompts, tmp_path / "cache.safetensors", encode, batch_size=1)
    assert cache.prompts == ["a red cat", "the blue dog on the moon"]
    assert cache.condition.prompt_embeds.shape == (2, 6, 16) and cache.condition.pooled_prompt_embeds.shape == (2, 16)
    assert cache.null is not None and cache.null.batch_size == 1
    with torch.no_grad():
        direct = base(["the blue dog on the moon"])
    torch.testing.assert_close(cache[1:2].prompt_embeds, direct.prompt_embeds)
    assert cache[0:1].attention_mask.tolist() == [[1, 1, 1, 0, 0, 0]]
    n_calls = len(calls)
    again = build_prompt_cache(prompts, tmp_path / "cache.safetensors", encode)
    assert len(calls) == n_calls and torch.equal(again.condition.prompt_embeds, cache.condition.prompt_embeds)
    prompts.write_text("a dog\n")  # changed prompts: recomputed
    assert build_prompt_cache(prompts, tmp_path / "cache.safetensors", encode).prompts == ["a dog"]
    assert len(calls) > n_calls
    assert load_prompt_cache(tmp_path / "cache.safetensors").prompts == ["a dog"]


def test_prompt_file_errors(tmp_path):
    from dmd_dar.t2i import load_prompt_cache, read_prompts

    with pytest.raises(UserError, match="not found"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(UserError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(UserError, match="prompt cache"):
        load_prompt_cache(tmp_path / "bad.safetensors")
