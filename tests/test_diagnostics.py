"""Cross-layer diagnostics (dmd_dar/metrics/diagnostics.py, scripts/diagnose.py): known answers and invariants.

Known answers come from a network whose sublayers output constants (every block state is the embedding plus
a known sum, and every residual state has the gradient of the head input); gradients are checked against
central finite differences of the loss on a tiny float64 DiT; the probe against features that do / do not
contain t linearly; the bookkeeping against the model's state before and after.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dmd_dar.metrics import diagnostics as D
from dmd_dar.models import DiT
from dmd_dar.routing import DepthRouter, RoutingConfig

REPO = Path(__file__).resolve().parents[1]


def tiny_dit(mode="residual", dtype=torch.float64, seed=0, **routing):
    """Depth-2 DiT on 8x8x1 images (4 tokens), weights perturbed so that no block is the identity."""
    torch.manual_seed(seed)
    model = DiT(input_size=8, patch_size=4, in_channels=1, hidden_size=16, depth=2, num_heads=2, num_classes=3,
                routing=RoutingConfig(mode=mode, **routing)).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("router."):
                p.add_(0.3 * torch.randn_like(p))
    return model


def batch(n=3, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x0 = (torch.rand(n, 1, 8, 8, generator=g) * 2 - 1).to(dtype)
    eps = torch.randn(n, 1, 8, 8, generator=g).to(dtype)
    t = torch.tensor([0.2, 0.5, 0.9][:n] + [0.7] * max(0, n - 3), dtype=dtype)
    y = torch.tensor([0, 1, 3][:n] + [2] * max(0, n - 3))  # 3 = the null class
    return x0, eps, t, y


@contextlib.contextmanager
def shadow(obj, name, fn):
    """Temporarily replace a bound method on one instance (reference computations for the FD checks)."""
    obj.__dict__[name] = fn
    try:
        yield
    finally:
        obj.__dict__.pop(name)


# ----------------------------------------------------------------------------------- known answers
class ConstantSublayerNet(nn.Module):
    """Router-protocol network on 2x2x1 images: token j of h0 is pixel_j * e; sublayer l outputs the
    constant c_l whatever it reads; the head maps h_final to pixels with w. Block states are known exactly."""

    def __init__(self, num_sublayers=4, dim=3):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.embed = nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64))
        self.consts = nn.Parameter(torch.randn(num_sublayers, dim, generator=g, dtype=torch.float64))
        self.head = nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64))
        self.router = DepthRouter(RoutingConfig(mode="residual"), num_sublayers, dim)

    def forward(self, x_t, t, cond):
        tokens = x_t.flatten(1).unsqueeze(-1)  # [B, 4, 1]
        state = self.router.start(tokens * self.embed)
        for l in range(1, self.router.num_sublayers + 1):
            x = self.router.read(state, l)
            self.router.write(state, l, self.consts[l - 1].expand_as(x))
        return (self.router.read_final(state) @ self.head).view_as(x_t)


class ConstantAdapter:
    sublayers_per_block = 2

    def __init__(self, net):
        self.module, self.router = net, net.router

    def predict(self, x_t, t, cond):
        return self.module(x_t, t, cond)

    def target(self, x0, eps):
        return eps - x0

    def condition(self, labels, batch_size, device):
        return None

    def source_name(self, index):
        return f"s{index}"


def test_known_answers_on_constant_sublayers():
    net = ConstantSublayerNet()
    g = torch.Generator().manual_seed(5)
    images = torch.rand(6, 1, 2, 2, generator=g, dtype=torch.float64) * 2 - 1
    ts = [0.0, 0.5, 1.0]
    result = D.diagnose(ConstantAdapter(net), images, t_grid=ts, batch_size=4, seed=7)
    assert json.loads(json.dumps(result)) == result

    # The same pairs diagnose() draws (same seed, same order of draws).
    gen = torch.Generator().manual_seed(7)
    order = torch.randperm(6, generator=gen)
    x0 = images[order]
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float32).double()
    with torch.no_grad():
        e, c, w = net.embed, net.consts, net.head
        for j, t in enumerate(ts):
            x_t = (1 - t) * x0 + t * eps
            h0 = x_t.flatten(1).unsqueeze(-1) * e  # [6, 4, 3]
            states = [h0 + c[: 2 * k].sum(0) for k in (1, 2)]  # z_1, z_2
            for k, z in enumerate(states):
                assert result["rms"][k][j] == pytest.approx(z.pow(2).mean().sqrt().item(), rel=1e-12)
            cos = F.cosine_similarity(states[0], states[1], dim=-1).mean().item()
            assert result["cosine"][0][j] == pytest.approx(cos, rel=1e-12)
            # Constant sublayers pass no gradient, so every residual state gets dL/dh_final.
            residual = (states[1] @ w).view_as(x0) - (eps - x0)  # prediction - target
            grad = (2 / 4 * residual).flatten(1).unsqueeze(-1) * w  # d (mean over 4 pixels) / d h_final
            for k in range(2):
                assert result["grad_rms"][k][j] == pytest.approx(grad.pow(2).mean().sqrt().item(), rel=1e-12)
            assert result["loss"][j] == pytest.approx(residual.pow(2).flatten(1).mean(1).mean().item(), rel=1e-12)
            # Importance of source i (a gate shared by every reader) = <dL/dh_final, v_i>, averaged over samples.
            sources = [h0] + [c[i].expand_as(h0) for i in range(4)]
            for i, v in enumerate(sources):
                per_sample = (grad * v).sum((1, 2))
                assert result["importance"]["gate_grad"][i][j] == pytest.approx(per_sample.mean().item(), rel=1e-10, abs=1e-14)
                assert result["importance"]["gate_grad_abs"][i][j] == pytest.approx(per_sample.abs().mean().item(), rel=1e-10, abs=1e-14)
    assert result["blocks"] == [1, 2] and result["cosine_pairs"] == [[1, 2]]
    assert result["importance"]["sublayers"]["3"]["sources"] == ["s0", "s1", "s2"]


# ----------------------------------------------------------------------------------- forward parity
@pytest.mark.parametrize("routing", [
    dict(mode="residual"),
    dict(mode="dar", query="static_t"),
    dict(mode="dar", query="dynamic", chunk_size=2, summary="sum"),
])
def test_instrumented_forward_is_bit_identical(routing):
    model = tiny_dit(dtype=torch.float32, **routing)
    if routing["mode"] == "dar":
        with torch.no_grad():  # non-uniform routing, so the DAR path is really exercised
            for p in model.router.parameters():
                p.add_(0.5 * torch.randn_like(p))
    x0, eps, t, y = batch(dtype=torch.float32)
    with torch.no_grad():
        reference = model(x0, t, y)
    with D.instrument_router(model.router) as traces, torch.no_grad():
        instrumented = model(x0, t, y)
    assert torch.equal(reference, instrumented)
    assert len(traces) == 1 and set(traces[0].reads) == {1, 2, 3, 4, "final"}


# ----------------------------------------------------------------------------------- gradients vs finite differences
def test_gate_gradients_match_finite_differences():
    model = tiny_dit("residual")
    adapter = D.DiTAdapter(model)
    x0, eps, t, y = batch()
    with D.preserved_module_state(model):
        out = D.diagnose_batch(adapter, x0, eps, t, y)
        L, delta = model.router.num_sublayers, 1e-5
        # (sample, reader row, source): row l-1 = sublayer l, row L = the head.
        for b, row, source in [(0, 2, 1), (1, L, 0), (2, L, L), (1, 3, 2), (0, 1, 0)]:
            losses = []
            for sign in (1, -1):
                gates = torch.ones(3, L + 1, L + 1, dtype=torch.float64)
                gates[b, row, source] += sign * delta
                losses.append(D.diagnose_batch(adapter, x0, eps, t, y, gate_values=gates).loss[b])
            fd = (losses[0] - losses[1]).item() / (2 * delta)
            assert out.gate_grads[b, row, source].item() == pytest.approx(fd, rel=1e-6, abs=1e-10)
            assert abs(fd) > 1e-6  # the check is not vacuous


def _loss_sum(model, x0, eps, t, y):
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    with torch.no_grad():
        return (model(x_t, t, y) - (eps - x0)).pow(2).flatten(1).mean(1).sum().item()


@pytest.mark.parametrize("routing", [dict(mode="residual"), dict(mode="dar", query="static_t")])
def test_state_gradients_match_finite_differences(routing):
    """dL/dz_k against a perturbation of the state the block passes on: the residual stream after block
    k (seen by every later reader) or, for DAR, the aggregate block k+1 reads. Also dL/d(block output)."""
    model = tiny_dit(**routing)
    if routing["mode"] == "dar":
        with torch.no_grad():
            for p in model.router.parameters():
                p.add_(0.5 * torch.randn_like(p))
    router = model.router
    x0, eps, t, y = batch()
    with D.preserved_module_state(model):
        out = D.diagnose_batch(D.DiTAdapter(model), x0, eps, t, y)
    u = torch.randn(out.states[0].shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    stock_read, stock_write, stock_final = router.read, router.write, router.read_final
    # DAR routing maths run in fp32 even in a float64 model, so a tiny step drowns in rounding: there a
    # larger step with Richardson extrapolation (error O(step^4)) and a looser tolerance.
    residual = routing["mode"] == "residual"
    step, rel = (1e-6, 1e-5) if residual else (2e-2, 1e-3)

    def central(patch_name, patched, h):
        values = []
        for sign in (1, -1):
            with shadow(router, patch_name, patched(sign * h)):
                values.append(_loss_sum(model, x0, eps, t, y))
        return (values[0] - values[1]) / (2 * h)

    def directional(patch_name, patched):
        if residual:
            return central(patch_name, patched, step)
        return (4 * central(patch_name, patched, step / 2) - central(patch_name, patched, step)) / 3

    for k in (1, 2):  # z_1 (read by sublayer 3) and z_2 (read by the head)
        if residual:  # perturb the stream right after block k's last write
            fd = directional("write", lambda d: lambda s, l, v: stock_write(s, l, v + d * u if l == 2 * k else v))
        elif k == 1:
            fd = directional("read", lambda d: lambda s, l: stock_read(s, l) + (d * u if l == 3 else 0))
        else:
            fd = directional("read_final", lambda d: lambda s: stock_final(s) + d * u)
        assert (out.state_grads[k] * u).sum().item() == pytest.approx(fd, rel=rel)
        # the raw output of block k's MLP sublayer, seen by every later reader in both modes
        fd = directional("write", lambda d: lambda s, l, v: stock_write(s, l, v + d * u if l == 2 * k else v))
        assert (out.output_grads[k - 1] * u).sum().item() == pytest.approx(fd, rel=rel)


# ----------------------------------------------------------------------------------- DAR maps
@pytest.mark.parametrize("routing", [
    dict(query="static_t"),
    dict(query="static", chunk_size=2, summary="last"),
    dict(query="dynamic", chunk_size=3, summary="sum"),
])
def test_fresh_dar_router_gives_uniform_maps(routing):
    model = tiny_dit("dar", dtype=torch.float32, **routing)  # backbone perturbed, router at its zero init
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    result = D.diagnose(model, images, t_grid=3)
    maps = result["routing_maps"]
    assert set(maps) == {"1", "2", "3", "4", "final"}
    for key, entry in maps.items():
        expected = model.router.sources_final() if key == "final" else model.router.sources(int(key))
        assert len(entry["sources"]) == len(expected) and len(entry["weights"]) == len(expected)
        for row in entry["weights"]:
            assert row == pytest.approx([1 / len(expected)] * 3, abs=1e-6)
    if routing.get("summary") == "sum":
        assert maps["4"]["sources"] == ["emb", "sum(b1.attn..b2.attn)"]
    # shapes and axis labels of the whole result
    K, G = 2, 3
    assert result["t_grid"] == [0.0, 0.5, 1.0] and result["blocks"] == [1, 2]
    assert [len(result[k]) for k in ("rms", "grad_rms", "output_grad_rms", "cosine")] == [K, K, K, K - 1]
    assert all(len(row) == G for k in ("rms", "grad_rms", "output_grad_rms", "cosine") for row in result[k])
    assert len(result["probe"]["r2"]) == K and "importance" not in result


# ----------------------------------------------------------------------------------- probe
def test_probe_recovers_linear_t_and_not_noise():
    g = torch.Generator().manual_seed(0)
    pairs, grid = 24, torch.linspace(0, 1, 11)
    t = grid.repeat(pairs)
    groups = torch.arange(pairs).repeat_interleave(11)
    noise = torch.randn(len(t), 16, generator=g)
    mixing = torch.randn(16, 16, generator=g)
    linear = torch.cat([t[:, None], noise[:, :15]], 1) @ mixing  # t hidden in a linear mixture
    assert D.ridge_probe(linear, t, groups)["r2"] > 0.999
    r2_noise = D.ridge_probe(noise, t, groups)["r2"]
    assert -0.2 < r2_noise < 0.1


def test_probe_splits_by_pair():
    """A per-pair target read from a one-hot pair id: predictable only if a pair's rows leak into training."""
    g = torch.Generator().manual_seed(1)
    pairs = 20
    groups = torch.arange(pairs).repeat_interleave(5)
    target = torch.randn(pairs, generator=g)[groups]
    features = F.one_hot(groups, pairs).double()
    fit = D.ridge_probe(features, target, groups)
    assert fit["r2"] < 0.1 and fit["test_pairs"] == 5 and fit["train_pairs"] == 15


# ----------------------------------------------------------------------------------- model left as it was
@pytest.mark.parametrize("mode", ["residual", "dar"])
def test_diagnosis_leaves_the_model_unchanged(mode):
    model = tiny_dit(mode, dtype=torch.float32)
    model.train()
    model.blocks[0].attn.eval()  # mixed modes must come back as they were
    model.gradient_checkpointing = True
    model.y_embedder.weight.requires_grad_(False)
    sentinel = torch.full_like(model.final_layer.linear.weight, 7.0)
    model.final_layer.linear.weight.grad = sentinel.clone()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1

    with torch.no_grad():  # the caller's grad mode must not matter
        D.diagnose(model, images, torch.tensor([0, 1, 2, 5]), t_grid=3)
    with pytest.raises(ValueError):  # a forward that fails half-way restores everything too
        D.diagnose(model, images[:, :, :4, :4], t_grid=3)

    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert model.gradient_checkpointing
    assert torch.equal(model.final_layer.linear.weight.grad, sentinel)
    assert all(p.grad is None for n, p in model.named_parameters() if n != "final_layer.linear.weight")
    assert not {"start", "read", "write", "read_final"} & set(model.router.__dict__)


def test_user_mistakes_are_user_errors():
    from dmd_dar.errors import UserError

    images = torch.zeros(4, 1, 8, 8)
    with pytest.raises(UserError, match="DiagnosisAdapter"):
        D.diagnose(nn.Linear(2, 2), images)
    model = tiny_dit(dtype=torch.float32)
    for kwargs in (dict(t_grid=1), dict(t_grid=[0.5, 0.5]), dict(t_grid=[0.0, 1.5]), dict(num_samples=9),
                   dict(sublayers=[0])):
        with pytest.raises(UserError):
            D.diagnose(model, images, **kwargs)


# ----------------------------------------------------------------------------------- the script
def _script():
    spec = importlib.util.spec_from_file_location("diagnose_script", REPO / "scripts" / "diagnose.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_writes_json_and_plots(tmp_path):
    tiny_dit("residual", dtype=torch.float32).save_pretrained(tmp_path / "residual")
    tiny_dit("dar", dtype=torch.float32, query="static_t").save_pretrained(tmp_path / "dar")
    out = tmp_path / "diag"
    _script().main(["--checkpoint", str(tmp_path / "residual"), "--compare", str(tmp_path / "dar"), "--out", str(out),
                    "--dataset", "gaussian", "--n", "6", "--t-grid", "3", "--sublayers", "2,final"])
    expected = {"diagnostics.json", "diagnostics_compare.json", "heatmaps.png", "depth_curves.png", "maps.png",
                "maps_compare.png", "probe.png"}
    assert {p.name for p in out.iterdir()} == expected
    main = json.loads((out / "diagnostics.json").read_text())
    compare = json.loads((out / "diagnostics_compare.json").read_text())
    assert main["routing"]["mode"] == "residual" and set(main["importance"]["sublayers"]) == {"2", "final"}
    assert compare["routing"]["mode"] == "dar" and set(compare["routing_maps"]) == {"2", "final"}
    assert main["num_samples"] == 6 and main["run"]["dataset"] == "gaussian"


@pytest.mark.parametrize("checkpoint", ["missing", "bundled"])
def test_script_missing_checkpoint_is_one_line_exit_2(tmp_path, capsys, checkpoint):
    script = _script()
    if checkpoint == "bundled" and (script.BUNDLED_TEACHER / "config.json").is_file():
        pytest.skip("the bundled teacher is present")
    target = str(tmp_path / "nope") if checkpoint == "missing" else "bundled"
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--checkpoint", target, "--out", str(tmp_path / "out"), "--dataset", "gaussian"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_script_refuses_a_foreign_out_folder_before_any_work(tmp_path, capsys):
    tiny_dit("residual", dtype=torch.float32).save_pretrained(tmp_path / "model")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        _script().main(["--checkpoint", str(tmp_path / "model"), "--out", str(out), "--dataset", "gaussian"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out") and "\n" not in err and "notes.txt" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
