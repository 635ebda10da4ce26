import pytest
import torch
from torch import nn

from dmd_dar.errors import ConfigError
from dmd_dar.routing import DepthRouter, RoutingConfig

B, T, D = 2, 5, 16


def run(router: DepthRouter, values, t_emb=None, record=False):
    """Drive the router protocol with fixed sublayer outputs; return (inputs per sublayer, final, state)."""
    state = router.start(values[0], t_emb, record_weights=record)
    inputs = []
    for l in range(1, router.num_sublayers + 1):
        inputs.append(router.read(state, l))
        router.write(state, l, values[l])
    return inputs, router.read_final(state), state


def randomize(router: DepthRouter, scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in router.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def make_values(L, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, D, generator=g) for _ in range(L + 1)]


def test_residual_mode_is_bit_exact_with_plain_addition():
    L = 6
    router = DepthRouter(RoutingConfig(mode="residual"), L, D)
    values = make_values(L)
    inputs, final, _ = run(router, values)
    h = values[0]
    for l in range(1, L + 1):
        assert torch.equal(inputs[l - 1], h)
        h = h + values[l]
    assert torch.equal(final, h)
    assert len(list(router.parameters())) == 0


@pytest.mark.parametrize(
    "L,S,summary,l,expected",
    [
        (8, 1, "last", 3, [(0,), (1,), (2,)]),
        (8, 4, "last", 1, [(0,)]),
        (8, 4, "last", 4, [(0,), (1,), (2,), (3,)]),
        (8, 4, "last", 5, [(0,), (4,)]),
        (8, 4, "last", 7, [(0,), (4,), (5,), (6,)]),
        (8, 4, "sum", 5, [(0,), (1, 2, 3, 4)]),
        (12, 4, "sum", 10, [(0,), (1, 2, 3, 4), (5, 6, 7, 8), (9,)]),
        (12, 4, "last", 10, [(0,), (4,), (8,), (9,)]),
    ],
)
def test_chunked_sources_follow_eq7(L, S, summary, l, expected):
    router = DepthRouter(RoutingConfig(mode="dar", query="static", chunk_size=S, summary=summary), L, D)
    assert router.sources(l) == expected


@pytest.mark.parametrize(
    "L,S,summary,expected",
    [
        (4, 1, "last", [(0,), (1,), (2,), (3,), (4,)]),
        (8, 4, "last", [(0,), (4,), (5,), (6,), (7,), (8,)]),  # summaries + raw outputs of the last chunk
        (8, 4, "sum", [(0,), (1, 2, 3, 4), (5,), (6,), (7,), (8,)]),
        (10, 4, "last", [(0,), (4,), (8,), (9,), (10,)]),  # partial last chunk
    ],
)
def test_final_aggregator_sources(L, S, summary, expected):
    router = DepthRouter(RoutingConfig(mode="dar", query="static", chunk_size=S, summary=summary), L, D)
    assert router.sources_final() == expected


@pytest.mark.parametrize("S,summary", [(1, "last"), (3, "last"), (3, "sum"), (4, "sum")])
def test_read_uses_exactly_the_listed_sources(S, summary):
    """A zero-initialised router reads the mean of the (summed) sources that sources(l) lists."""
    L = 10
    router = DepthRouter(RoutingConfig(mode="dar", query="static", chunk_size=S, summary=summary), L, D)
    values = make_values(L)
    inputs, final, state = run(router, values, record=True)
    for l in range(1, L + 1):
        srcs = router.sources(l)
        expected = torch.stack([sum(values[i] for i in group) for group in srcs]).mean(0)
        torch.testing.assert_close(inputs[l - 1], expected, rtol=1e-5, atol=1e-6)
        assert state.weights[l].shape == (B, T, len(srcs))
    expected = torch.stack([sum(values[i] for i in group) for group in router.sources_final()]).mean(0)
    torch.testing.assert_close(final, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("query", ["static", "static_t", "dynamic"])
def test_fresh_router_is_uniform_and_trained_router_is_convex(query):
    L = 6
    router = DepthRouter(RoutingConfig(mode="dar", query=query), L, D, time_dim=8)
    values = make_values(L)
    t_emb = torch.randn(B, 8)
    _, _, state = run(router, values, t_emb, record=True)
    for l in range(1, L + 1):
        torch.testing.assert_close(state.weights[l], torch.full((B, T, l), 1.0 / l))
    randomize(router, scale=2.0)
    _, _, state = run(router, values, t_emb, record=True)
    for key, w in state.weights.items():
        assert (w >= 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(B, T))
    # non-uniform now: the queries matter
    assert (state.weights[L] - 1.0 / L).abs().max() > 1e-3


@pytest.mark.parametrize("query,param", [("static", "query_static"), ("static_t", "query_time"), ("dynamic", "query_dynamic")])
def test_gradients_reach_query_parameters_and_key_norm(query, param):
    L = 4
    router = DepthRouter(RoutingConfig(mode="dar", query=query, chunk_size=2, summary="sum"), L, D, time_dim=8)
    randomize(router, scale=0.3)
    values = [v.requires_grad_() for v in make_values(L)]
    _, final, _ = run(router, values, torch.randn(B, 8))
    (final * torch.randn_like(final)).sum().backward()
    assert getattr(router, param).grad is not None and getattr(router, param).grad.abs().sum() > 0
    assert router.key_norm_weight.grad.abs().sum() > 0
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in values)


def test_static_t_query_depends_on_time():
    L = 4
    router = DepthRouter(RoutingConfig(mode="dar", query="static_t"), L, D, time_dim=8)
    randomize(router, scale=1.0)
    values = make_values(L)
    t_emb = torch.randn(1, 8).repeat(B, 1)
    _, same_a, _ = run(router, [v[:1].repeat(B, 1, 1) for v in values], t_emb)
    torch.testing.assert_close(same_a[0], same_a[1])
    t_emb[1] = torch.randn(8)
    _, diff, _ = run(router, [v[:1].repeat(B, 1, 1) for v in values], t_emb)
    assert (diff[0] - diff[1]).abs().max() > 1e-4


def test_bf16_autocast_keeps_routing_maths_in_fp32():
    L = 6
    router = DepthRouter(RoutingConfig(mode="dar", query="dynamic"), L, D)
    randomize(router)
    values = [v.to(torch.bfloat16) for v in make_values(L)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inputs, final, state = run(router, values, record=True)
    assert final.dtype == torch.float32 and all(x.dtype == torch.float32 for x in inputs)
    assert all(w.dtype == torch.float32 for w in state.weights.values())
    assert torch.isfinite(final).all()
    ref_inputs, ref_final, _ = run(router, [v.float() for v in values])
    torch.testing.assert_close(final, ref_final, rtol=1e-5, atol=1e-5)  # same fp32 maths on bf16 inputs


def test_router_is_reentrant_no_state_on_module():
    """Two interleaved forwards (as with CFG doubling or recomputation) equal two separate ones."""
    L = 4
    router = DepthRouter(RoutingConfig(mode="dar", query="dynamic", chunk_size=2), L, D)
    randomize(router)
    a, b = make_values(L, seed=1), make_values(L, seed=2)
    _, final_a, _ = run(router, a)
    _, final_b, _ = run(router, b)
    sa, sb = router.start(a[0]), router.start(b[0])
    for l in range(1, L + 1):
        router.read(sa, l), router.read(sb, l)
        router.write(sa, l, a[l]), router.write(sb, l, b[l])
    torch.testing.assert_close(router.read_final(sa), final_a)
    torch.testing.assert_close(router.read_final(sb), final_b)
    assert set(vars(router)) == set(vars(DepthRouter(router.config, L, D)))  # nothing was attached


def test_model_wide_linear_init_cannot_touch_the_router():
    model = nn.ModuleDict({"proj": nn.Linear(D, D), "router": DepthRouter(RoutingConfig(mode="dar", query="dynamic"), 4, D)})
    model.apply(lambda m: nn.init.xavier_uniform_(m.weight) if isinstance(m, nn.Linear) else None)
    assert model["router"].query_dynamic.abs().sum() == 0
    assert torch.equal(model["router"].key_norm_weight, torch.ones_like(model["router"].key_norm_weight))


def test_final_aggregator_off_reuses_last_sublayer_parameters():
    L = 4
    on = DepthRouter(RoutingConfig(mode="dar", query="static"), L, D)
    off = DepthRouter(RoutingConfig(mode="dar", query="static", final_aggregator=False), L, D)
    randomize(on)
    off.load_state_dict(on.state_dict())
    with torch.no_grad():
        on.query_static[L] = on.query_static[L - 1]
        on.key_norm_weight[L] = on.key_norm_weight[L - 1]
    values = make_values(L)
    torch.testing.assert_close(run(on, values)[1], run(off, values)[1])


@pytest.mark.parametrize("kwargs", [dict(mode="dense"), dict(query="learned"), dict(summary="mean"), dict(chunk_size=0)])
def test_bad_routing_config_names_the_key(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        RoutingConfig(**kwargs)


def test_out_of_order_read_is_an_error():
    router = DepthRouter(RoutingConfig(mode="dar", query="static"), 4, D)
    state = router.start(torch.randn(B, T, D))
    with pytest.raises(RuntimeError, match="in order"):
        router.read(state, 2)


# ---------------------------------------------------------------------------------- per-forward source cache
CACHE_CONFIGS = [dict(query="static"), dict(query="static_t"), dict(query="dynamic"), dict(query="static_t", chunk_size=3, summary="sum"),
                 dict(query="dynamic", chunk_size=2, summary="last"), dict(query="static", final_aggregator=False)]


def run_uncached(router: DepthRouter, values, t_emb=None):
    """The router protocol with the per-forward cache switched off: every aggregation computes each RMS itself."""
    state = router.start(values[0], t_emb)
    state.cache = None
    inputs = []
    for l in range(1, router.num_sublayers + 1):
        inputs.append(router.read(state, l))
        router.write(state, l, values[l])
    return inputs, router.read_final(state), state


def reference_reads(router: DepthRouter, values, t_emb=None):
    """Every read computed from `router.sources` with the stacked reference (no router code path, no cache)."""
    from dmd_dar.routing.kernels import aggregate_reference

    L, c = router.num_sublayers, router.config
    time_query = (t_emb @ router.query_time).unsqueeze(1) if c.query == "static_t" else None

    def read(groups, index, previous):
        if c.query == "dynamic":
            query = previous @ router.query_dynamic[index].t()
        else:
            query = router.query_static[index].view(1, 1, -1) + (time_query if time_query is not None else 0)
        stacked = torch.stack([sum(values[i] for i in group) for group in groups])
        return aggregate_reference(stacked, query, router.key_norm_weight[index], c.eps)

    inputs = [read(router.sources(l), l - 1, values[l - 1]) for l in range(1, L + 1)]
    return inputs, read(router.sources_final(), L if c.final_aggregator else L - 1, values[L])


@pytest.mark.parametrize("kwargs", CACHE_CONFIGS, ids=lambda k: "-".join(f"{v}" for v in k.values()))
def test_source_cache_same_outputs_and_gradients_float64(kwargs):
    """The cached forward equals the uncached one and the stacked reference, outputs and every gradient."""
    L = 6
    router = DepthRouter(RoutingConfig(mode="dar", **kwargs), L, D, time_dim=8).double()
    randomize(router, scale=0.7)
    t_emb = torch.randn(B, 8, dtype=torch.float64)
    upstream = [torch.randn(B, T, D, dtype=torch.float64) for _ in range(L + 1)]
    results = []
    for runner in (run, run_uncached, reference_reads):
        values = [v.double().requires_grad_() for v in make_values(L)]
        router.zero_grad(set_to_none=True)
        out = runner(router, values, t_emb)
        inputs, final = out[0], out[1]
        loss = sum((x * u).sum() for x, u in zip([*inputs, final], upstream))
        loss.backward()
        results.append(([*inputs, final], [v.grad for v in values], [p.grad.clone() for p in router.parameters()]))
    for other in results[1:]:
        for a, b in zip(results[0][0] + results[0][1] + results[0][2], other[0] + other[1] + other[2]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kwargs", CACHE_CONFIGS, ids=lambda k: "-".join(f"{v}" for v in k.values()))
def test_source_rms_is_computed_once_per_source(kwargs, monkeypatch):
    """One rsqrt per distinct source per forward (dense: L + 1), where the uncached path does one per read."""
    L = 6
    router = DepthRouter(RoutingConfig(mode="dar", **kwargs), L, D, time_dim=8)
    randomize(router)
    calls = []
    real_rsqrt = torch.rsqrt
    monkeypatch.setattr(torch, "rsqrt", lambda x, *a, **k: calls.append(1) or real_rsqrt(x, *a, **k))
    groups = [g for l in range(1, L + 1) for g in router.sources(l)] + router.sources_final()
    values = [v.requires_grad_() for v in make_values(L)]
    _, final, state = run(router, values, torch.randn(B, 8))
    final.sum().backward()
    assert len(calls) == len(set(groups)) == state.cache.rms_computations == len(state.cache)
    if kwargs.get("chunk_size", 1) == 1:
        assert len(calls) == L + 1
    calls.clear()
    run_uncached(router, values, torch.randn(B, 8))
    assert len(calls) == len(groups) > len(set(groups))


def test_cache_is_per_forward_and_off_on_the_fused_path():
    L = 4
    router = DepthRouter(RoutingConfig(mode="dar", query="static"), L, D)
    a, b = router.start(torch.randn(B, T, D)), router.start(torch.randn(B, T, D))
    assert a.cache is not None and b.cache is not None and a.cache is not b.cache
    assert DepthRouter(RoutingConfig(mode="dar", query="static", backend="triton"), L, D).start(torch.randn(B, T, D)).cache is None
    assert DepthRouter(RoutingConfig(mode="residual"), L, D).start(torch.randn(B, T, D)).cache is None
    assert set(vars(router)) == set(vars(DepthRouter(router.config, L, D)))  # nothing attached to the module


@pytest.mark.parametrize("query", ["static_t", "dynamic"])
def test_cache_under_gradient_checkpointing_float64(query, monkeypatch):
    """A DAR DiT with checkpointed sublayers: cached, uncached and checkpointed runs give the same loss and gradients."""
    from dmd_dar.models import DiT

    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=16, depth=2, num_heads=2, num_classes=3,
                routing=RoutingConfig(mode="dar", query=query)).double().train()
    with torch.no_grad():  # non-zero gates, head and queries, so every path carries gradient
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if name.startswith("router.") else 0.05))
    x, t, y = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.rand(3, dtype=torch.float64), torch.tensor([0, 1, 2])
    start = DepthRouter.start

    def grads(checkpointing: bool, cached: bool):
        model.gradient_checkpointing = checkpointing

        def patched(self, *args, **kwargs):
            state = start(self, *args, **kwargs)
            if not cached:
                state.cache = None
            return state

        monkeypatch.setattr(DepthRouter, "start", patched)
        model.zero_grad(set_to_none=True)
        loss = (model(x, t, y) ** 2).mean()
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters()]

    want = grads(checkpointing=False, cached=False)
    for checkpointing, cached in ((False, True), (True, True), (True, False)):
        for a, b in zip(grads(checkpointing, cached), want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
