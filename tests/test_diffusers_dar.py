"""convert_to_dar on tiny diffusers transformers (offline, random jittered weights)."""
from __future__ import annotations

import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from dmd_dar.errors import UserError  # noqa: E402
from dmd_dar.models.diffusers_dar import (  # noqa: E402
    SUPPORTED_CLASSES,
    convert_to_dar,
    load_dar_pretrained,
    save_dar_pretrained,
)
from dmd_dar.routing import RoutingConfig  # noqa: E402

B = 2


def jitter(model, scale=0.1, seed=1):
    """Noise on every parameter: the adaLN / gate / output layers diffusers zero-inits must not make parity trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def tiny(name):
    """(model, inputs) for a tiny config of each supported class."""
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    if name == "DiTTransformer2DModel":
        m = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                            num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
        x = dict(hidden_states=torch.randn(B, 4, 8, 8), timestep=torch.tensor([3, 7]), class_labels=torch.tensor([1, 10]))
    elif name == "PixArtTransformer2DModel":
        m = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                               num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=12)
        x = dict(hidden_states=torch.randn(B, 4, 8, 8), encoder_hidden_states=torch.randn(B, 5, 12), timestep=torch.tensor([3, 700]),
                 added_cond_kwargs={"resolution": None, "aspect_ratio": None}, encoder_attention_mask=mask)
    elif name == "SD3Transformer2DModel":  # layer 0 has SD3.5 dual attention, the last layer is context_pre_only
        m = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                            num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                            pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8,
                                            dual_attention_layers=(0,), qk_norm="rms_norm")
        x = dict(hidden_states=torch.randn(B, 4, 8, 8), encoder_hidden_states=torch.randn(B, 5, 16),
                 pooled_projections=torch.randn(B, 8), timestep=torch.tensor([300.0, 900.0]))
    elif name == "FluxTransformer2DModel":
        m = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=8,
                                             num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                                             guidance_embeds=True, axes_dims_rope=(2, 2, 4))
        x = dict(hidden_states=torch.randn(B, 16, 8), encoder_hidden_states=torch.randn(B, 5, 16), pooled_projections=torch.randn(B, 8),
                 timestep=torch.tensor([0.3, 0.9]), img_ids=torch.randn(16, 3), txt_ids=torch.zeros(5, 3), guidance=torch.tensor([3.5, 3.5]))
    elif name == "QwenImageTransformer2DModel":
        m = diffusers.QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8,
                                                  num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4))
        x = dict(hidden_states=torch.randn(B, 16, 16), encoder_hidden_states=torch.randn(B, 5, 16), encoder_hidden_states_mask=mask,
                 timestep=torch.tensor([0.3, 0.9]), img_shapes=[[(1, 4, 4)]] * B)
    else:
        raise KeyError(name)
    return jitter(m), x


MM_DIT = {"SD3Transformer2DModel", "FluxTransformer2DModel", "QwenImageTransformer2DModel"}
EXPECTED_SUBLAYERS = {  # (image, text) sublayers of the tiny configs above
    "DiTTransformer2DModel": (4, None),  # 2 blocks x (attn, ff)
    "PixArtTransformer2DModel": (6, None),  # 2 blocks x (self-attn, cross-attn, ff)
    "SD3Transformer2DModel": (5, 2),  # block 0: attn, attn2, ff; block 1: attn, ff | text: block 0 only
    "FluxTransformer2DModel": (4, 4),  # double: attn, ff; 2 single blocks: 1 each | text likewise
    "QwenImageTransformer2DModel": (4, 4),
}


def router_parameters(model):
    """The image router's parameters, and the text router's where it routes."""
    return [p for name, p in model.named_parameters() if name.startswith(("router.", "text_router."))]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module", params=SUPPORTED_CLASSES)
def case(request):
    model, inputs = tiny(request.param)
    with torch.no_grad():
        reference = model(**inputs).sample
    return request.param, model, inputs, reference


def test_supported_classes_listed():
    assert set(SUPPORTED_CLASSES) == set(EXPECTED_SUBLAYERS)


def test_residual_mode_is_bit_exact_and_keeps_modules(case):
    name, model, inputs, reference = case
    stock = copy.deepcopy(model)
    modules_before = {n: id(m) for n, m in stock.named_modules()}
    converted = convert_to_dar(stock, RoutingConfig(mode="residual"), route_text=name in MM_DIT)
    assert converted is stock and isinstance(converted, type(model))
    assert all(id(converted.get_submodule(n)) == i for n, i in modules_before.items() if n)  # same objects, no copies
    assert list(converted.router.parameters()) == []  # residual routing adds no weights
    with torch.no_grad():
        out = converted(**inputs).sample
        out_tuple = converted(**inputs, return_dict=False)[0]
    assert torch.equal(out, reference) and torch.equal(out_tuple, reference)


@pytest.mark.parametrize("routing", [dict(mode="dar"), dict(mode="dar", chunk_size=2, summary="sum")], ids=["dense", "chunk2-sum"])
def test_zero_init_dar_matches_stock(case, routing):
    name, model, inputs, reference = case
    for route_text in ([False, True] if name in MM_DIT else [False]):
        converted = convert_to_dar(copy.deepcopy(model), RoutingConfig(**routing), route_text=route_text)
        image, text = EXPECTED_SUBLAYERS[name]
        assert converted.router.num_sublayers == image
        if route_text:
            assert converted.text_router.num_sublayers == text and converted.text_router.config.mode == "dar"
        with torch.no_grad():
            out = converted(**inputs).sample
        assert not torch.equal(out, reference)  # it really took the DAR path (float rounding differs)
        # The only gap is the LayerNorm eps seeing a stream scaled by 1/(number of sources): ~3e-5 here.
        assert rel_err(out, reference) < 1e-4, (name, route_text)


def test_zero_init_gap_is_only_the_norm_eps(case):
    """With the norms' eps ~ 0 the zero-initialised DAR model equals the stock one to fp32 rounding."""
    name, model, inputs, _ = case
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(getattr(module, "eps", None), float):
            module.eps = 1e-30
    with torch.no_grad():
        reference = model(**inputs).sample
        out = convert_to_dar(model, RoutingConfig(mode="dar"), route_text=name in MM_DIT)(**inputs).sample
    assert rel_err(out, reference) < 2e-6


def test_router_gets_gradients_and_changes_output(case):
    name, model, inputs, reference = case
    converted = convert_to_dar(copy.deepcopy(model), RoutingConfig(mode="dar", query="static_t"), route_text=name in MM_DIT)
    params = router_parameters(converted)
    assert params and all(p.dtype == torch.float32 for p in params)
    converted.train()
    converted(**inputs).sample.square().mean().backward()
    # (key norms get no gradient while every query is zero: the logits q.k are all 0)
    assert converted.router.query_static.grad.abs().sum() > 0
    assert converted.router.query_time.grad.abs().sum() > 0  # the static_t embedding path is wired
    if name in MM_DIT:
        assert converted.text_router.query_static.grad.abs().sum() > 0
    with torch.no_grad():  # a non-uniform router must change the function (the test can fail)
        converted.router.query_static.normal_(0.0, 1.0)
        converted.eval()
        assert rel_err(converted(**inputs).sample, reference) > 1e-3


def test_gradient_checkpointing_same_result(case):
    name, model, inputs, _ = case
    converted = convert_to_dar(copy.deepcopy(model), RoutingConfig(mode="dar", query="dynamic"))
    with torch.no_grad():
        converted.router.query_dynamic.normal_(0.0, 0.1)
    # eval(): DiT's label embedding drops labels at random in train mode; checkpointing does not need train()
    converted(**inputs).sample.sum().backward()
    grad = converted.router.query_dynamic.grad.clone()
    converted.zero_grad()
    converted.enable_gradient_checkpointing()
    converted(**inputs).sample.sum().backward()
    torch.testing.assert_close(converted.router.query_dynamic.grad, grad, rtol=1e-4, atol=1e-7)


def test_save_load_round_trip(case, tmp_path):
    name, model, inputs, _ = case
    converted = convert_to_dar(copy.deepcopy(model), RoutingConfig(mode="dar", chunk_size=2, summary="sum"), route_text=name in MM_DIT)
    with torch.no_grad():
        for p in router_parameters(converted):
            p.normal_(0.0, 0.3)
        expected = converted(**inputs).sample
    folder = tmp_path / "student"
    save_dar_pretrained(converted, folder)
    assert {p.name for p in folder.iterdir()} == {"config.json", "diffusion_pytorch_model.dar.safetensors", "routing.json", "router.safetensors"}
    loaded = load_dar_pretrained(folder)
    assert type(loaded) is type(converted)
    assert loaded.router.config == converted.router.config
    assert loaded.config["dar_routing"] == converted.router.config.to_dict()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, expected)
    converted.save_pretrained(tmp_path / "again")  # diffusers' name routes to the same export
    assert (tmp_path / "again" / "routing.json").is_file()


def test_deepcopy_of_converted_model(case):
    name, model, inputs, _ = case
    converted = convert_to_dar(copy.deepcopy(model), RoutingConfig(mode="dar"))
    with torch.no_grad():
        converted.router.query_static.normal_()
        twin = copy.deepcopy(converted)  # the DMD trainer copies the student into the fake score
        assert type(twin) is type(converted)
        assert torch.equal(twin(**inputs).sample, converted(**inputs).sample)


def test_unsupported_class_and_double_conversion():
    with pytest.raises(TypeError, match="supported diffusers classes: .*SD3Transformer2DModel"):
        convert_to_dar(torch.nn.Linear(2, 2), RoutingConfig(mode="dar"))
    model, _ = tiny("DiTTransformer2DModel")
    with pytest.raises(UserError, match="no text stream"):
        convert_to_dar(copy.deepcopy(model), RoutingConfig(mode="dar"), route_text=True)
    converted = convert_to_dar(model, RoutingConfig(mode="dar"))
    with pytest.raises(UserError, match="already converted"):
        convert_to_dar(converted, RoutingConfig(mode="dar"))


def test_unsupported_forward_features_fail_clearly():
    model, inputs = tiny("SD3Transformer2DModel")
    converted = convert_to_dar(model, RoutingConfig(mode="dar"))
    with pytest.raises(UserError, match="skip_layers"):
        converted(**inputs, skip_layers=[0])


def test_load_missing_folder_is_user_error(tmp_path):
    with pytest.raises(UserError, match="routing.json"):
        load_dar_pretrained(tmp_path)


def test_models_package_reexport():
    from dmd_dar.models import convert_to_dar as lazy

    model, inputs = tiny("DiTTransformer2DModel")
    assert lazy(model, RoutingConfig(mode="dar")).router.num_sublayers == 4


def exported(tmp_path, name="SD3Transformer2DModel"):
    """A tiny DAR student with trained-looking (non-zero) router weights, exported; (folder, model, inputs, output)."""
    model, inputs = tiny(name)
    converted = convert_to_dar(jitter(model), RoutingConfig(mode="dar", query="static_t"))
    with torch.no_grad():
        for p in router_parameters(converted):
            p.normal_(0.0, 0.3)
        expected = converted(**inputs).sample
    save_dar_pretrained(converted, tmp_path / "student")
    return tmp_path / "student", converted, inputs, expected


def test_the_stock_class_cannot_load_a_dar_student_without_its_router(tmp_path):
    """The stock from_pretrained would return the backbone alone, a different function: it finds no weights and
    raises. The DAR class's own from_pretrained loads the whole student."""
    from dmd_dar.models.diffusers_dar import DARSD3Transformer2DModel

    folder, converted, inputs, expected = exported(tmp_path)
    with pytest.raises(OSError, match="diffusion_pytorch_model"):
        diffusers.SD3Transformer2DModel.from_pretrained(folder)
    loaded = DARSD3Transformer2DModel.from_pretrained(folder)
    assert type(loaded) is DARSD3Transformer2DModel and loaded.router.config == converted.router.config
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, expected)
    with pytest.raises(UserError, match="not a DARFluxTransformer2DModel"):
        type(convert_to_dar(tiny("FluxTransformer2DModel")[0], RoutingConfig(mode="dar"))).from_pretrained(folder)


def test_a_stock_pipeline_saves_and_loads_a_dar_student(tmp_path):
    """A stock pipeline holding a DAR transformer records it as ["dmd_dar.models.diffusers_dar", "DARSD3..."] in
    model_index.json; DiffusionPipeline.from_pretrained (with that module imported) loads it router and all."""
    import json

    folder, converted, inputs, expected = exported(tmp_path)
    absent = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
    pipe = diffusers.StableDiffusion3Pipeline(transformer=converted, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
                                              **dict.fromkeys(absent))
    pipe.save_pretrained(tmp_path / "pipeline")
    index = json.loads((tmp_path / "pipeline" / "model_index.json").read_text())
    assert index["transformer"] == ["dmd_dar.models.diffusers_dar", "DARSD3Transformer2DModel"]
    loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "pipeline", **dict.fromkeys(absent))
    assert type(loaded.transformer).__name__ == "DARSD3Transformer2DModel"
    with torch.no_grad():
        assert torch.equal(loaded.transformer(**inputs).sample, expected)


def test_exports_follow_the_umask_and_format_1_folders_still_load(tmp_path):
    import os
    import stat

    from dmd_dar.models.diffusers_dar import BACKBONE_WEIGHTS, LEGACY_BACKBONE_WEIGHTS

    mask = os.umask(0o022)
    try:
        folder, converted, inputs, expected = exported(tmp_path)
    finally:
        os.umask(mask)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == dict.fromkeys(
        ("config.json", BACKBONE_WEIGHTS, "routing.json", "router.safetensors"), 0o644)
    (folder / BACKBONE_WEIGHTS).rename(folder / LEGACY_BACKBONE_WEIGHTS)  # how format 1 named the backbone
    with torch.no_grad():
        assert torch.equal(load_dar_pretrained(folder)(**inputs).sample, expected)


def test_non_finite_students_are_never_exported(tmp_path):
    model, _ = tiny("DiTTransformer2DModel")
    converted = convert_to_dar(model, RoutingConfig(mode="dar"))
    with torch.no_grad():
        converted.router.query_static.fill_(float("nan"))
    with pytest.raises(UserError, match="non-finite"):
        save_dar_pretrained(converted, tmp_path / "student")
    assert not (tmp_path / "student").exists()
