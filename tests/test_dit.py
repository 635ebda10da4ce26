import pytest
import torch

from dmd_dar.errors import UserError
from dmd_dar.models import DiT
from dmd_dar.models.dit import PRESETS, modulate
from dmd_dar.routing import RoutingConfig

SMALL = dict(input_size=16, patch_size=4, in_channels=3, hidden_size=64, depth=3, num_heads=4, num_classes=10)


def jittered(model: DiT, seed=0, scale=0.1) -> DiT:
    """Random non-trivial weights everywhere (adaLN gates and final layer included; router left alone)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("router."):
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def inputs(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    t = torch.rand(n, generator=g)
    y = torch.randint(0, 11, (n,), generator=g)
    return x, t, y


def reference_forward(m: DiT, x, t, y):
    """A straightforward pre-norm DiT forward with an explicit residual stream."""
    h = m.x_embedder(x).flatten(2).transpose(1, 2) + m.pos_embed
    c = m.t_embedder(t) + m.y_embedder(y)
    for blk in m.blocks:
        sa, ca, ga, sm, cm, gm = blk.adaLN_modulation(c).chunk(6, dim=-1)
        h = h + ga.unsqueeze(1) * blk.attn(modulate(blk.norm1(h), sa, ca))
        h = h + gm.unsqueeze(1) * blk.mlp(modulate(blk.norm2(h), sm, cm))
    return m.unpatchify(m.final_layer(h, c))


def test_residual_mode_equals_reference_forward_exactly():
    m = jittered(DiT(**SMALL))
    x, t, y = inputs()
    out = m(x, t, y)
    assert torch.equal(out, reference_forward(m, x, t, y))
    assert out.shape == x.shape


def test_fresh_model_gates_are_zero_but_test_weights_are_not():
    fresh = DiT(**SMALL)
    assert fresh.blocks[0].adaLN_modulation[-1].weight.abs().sum() == 0  # adaLN-Zero
    m = jittered(DiT(**SMALL))
    _, _, ga, _, _, _ = m.blocks[0].modulation(m.t_embedder(torch.rand(2)))
    assert ga.abs().min() > 0  # gates open: a DAR/residual mismatch would show


@pytest.mark.parametrize(
    "routing",
    [
        dict(mode="dar", query="static"),
        dict(mode="dar", query="static_t"),
        dict(mode="dar", query="dynamic"),
        dict(mode="dar", query="static_t", chunk_size=4, summary="sum"),
        dict(mode="dar", query="dynamic", chunk_size=2, summary="sum", final_aggregator=False),
    ],
)
def test_zero_init_dar_reproduces_residual_model(routing):
    residual = jittered(DiT(**SMALL))
    dar = DiT(**SMALL, routing=routing)
    dar.load_backbone_state(residual.state_dict())
    x, t, y = inputs()
    ref, out = residual(x, t, y), dar(x, t, y)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 1e-4, rel


def test_summary_last_is_not_function_preserving():
    residual = jittered(DiT(**SMALL))
    dar = DiT(**SMALL, routing=dict(mode="dar", chunk_size=4, summary="last"))
    dar.load_backbone_state(residual.state_dict())
    assert not dar.routing.function_preserving
    x, t, y = inputs()
    ref = residual(x, t, y)
    assert ((dar(x, t, y) - ref).norm() / ref.norm()) > 1e-2


def test_residual_checkpoint_loads_into_dar_model(tmp_path):
    residual = jittered(DiT(**SMALL))
    residual.save_pretrained(tmp_path / "teacher")
    dar = DiT.from_pretrained(tmp_path / "teacher", routing=RoutingConfig(mode="dar", query="dynamic"))
    new_keys = set(dar.state_dict()) - set(residual.state_dict())
    assert new_keys and all(k.startswith("router.") for k in new_keys)
    assert set(residual.state_dict()) <= set(dar.state_dict())
    x, t, y = inputs()
    ref = residual(x, t, y)
    assert ((dar(x, t, y) - ref).norm() / ref.norm()).item() < 1e-4
    # and back: a DAR checkpoint round-trips with its router weights
    with torch.no_grad():
        dar.router.query_dynamic.normal_()
    dar.save_pretrained(tmp_path / "student")
    again = DiT.from_pretrained(tmp_path / "student")
    assert again.routing.query == "dynamic"
    assert torch.equal(again(x, t, y), dar(x, t, y))


def test_mismatched_checkpoint_is_a_user_error(tmp_path):
    DiT(**SMALL).save_pretrained(tmp_path / "m")
    with pytest.raises(UserError, match="do not fit"):
        DiT.from_pretrained(tmp_path / "m", hidden_size=32, num_heads=4)
    with pytest.raises(UserError, match="not found"):
        DiT.from_pretrained(tmp_path / "missing")


def test_presets_match_the_paper_sizes():
    assert PRESETS["XL"] == dict(depth=28, hidden_size=1152, num_heads=16)
    m = DiT.from_preset("S/8", input_size=16, in_channels=3, num_classes=10)
    assert (m.patch_size, len(m.blocks), m.router.num_sublayers) == (8, 12, 24)
    with pytest.raises(UserError, match="preset"):
        DiT.from_preset("XXL/2")


def test_repa_tap_and_gradient_checkpointing():
    m = jittered(DiT(**SMALL, repa_depth=2, repa_dim=24, routing=dict(mode="dar", query="static_t")))
    x, t, y = inputs()
    out = m(x, t, y, return_repa=True)
    assert out.repa_features.shape == (4, (16 // 4) ** 2, 24)
    torch.testing.assert_close(out.sample, m(x, t, y))
    loss = out.sample.pow(2).mean() + out.repa_features.pow(2).mean()
    grads = torch.autograd.grad(loss, list(m.parameters()), allow_unused=True)
    m.gradient_checkpointing = True
    m.train()
    out2 = m(x, t, y, return_repa=True)
    grads2 = torch.autograd.grad(out2.sample.pow(2).mean() + out2.repa_features.pow(2).mean(), list(m.parameters()), allow_unused=True)
    for a, b in zip(grads, grads2):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_label_dropout_uses_only_the_given_generator():
    m = DiT(**SMALL)
    y = torch.arange(10).repeat(100)
    a = m.drop_labels(y, torch.Generator().manual_seed(0), prob=0.3)
    b = m.drop_labels(y, torch.Generator().manual_seed(0), prob=0.3)
    assert torch.equal(a, b)
    frac = (a == m.null_class).float().mean().item()
    assert 0.25 < frac < 0.35
    assert torch.equal(m.drop_labels(y, prob=0.0), y)


def test_wrong_input_shape_is_a_clear_error():
    m = DiT(**SMALL)
    with pytest.raises(ValueError, match="expects"):
        m(torch.randn(2, 1, 16, 16), torch.rand(2), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("field,value,needle", [("hidden_size", "big", "hidden_size='big'"), ("wings", 2, "wings"),
                                                ("qk_norm", 1, "qk_norm")])
def test_a_damaged_config_json_is_one_user_error_naming_the_field(tmp_path, field, value, needle):
    import json

    DiT(input_size=8, patch_size=4, in_channels=1, hidden_size=16, depth=1, num_heads=2, num_classes=2).save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(UserError, match=needle):
        DiT.from_pretrained(tmp_path / "m")
