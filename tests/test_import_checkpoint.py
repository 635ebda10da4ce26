"""scripts/import_checkpoint.py and dmd_dar/models/importers.py: tiny state dicts in the official SiT / REPA key layout,
imported, against an independent evaluation of the official forward pass written here (from the published
architecture); bad checkpoints get one line, exit 2 and nothing written."""
from __future__ import annotations

import argparse
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dmd_dar.models import DiT

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "import_checkpoint.py"
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=4, mlp_ratio=2.0, num_classes=5)


def _load_script():
    spec = importlib.util.spec_from_file_location("import_checkpoint_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ the official layout and forward pass, written here
def official_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """MAE / SiT fixed sin-cos embedding: the first half of the channels encodes the column (x), the second the row."""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    col, row = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))  # xy indexing
    emb = np.concatenate([one_axis(dim // 2, col), one_axis(dim // 2, row)], axis=1)
    return torch.from_numpy(emb).float()[None]


def official_state(fmt: str, learn_sigma: bool = False, seed: int = 0, z_dims=(6,), projector_dim=16, **sizes) -> dict:
    """Random weights (no zero gates, so every path matters) under the official key names and shapes."""
    s = {**TINY, **sizes}
    g = torch.Generator().manual_seed(seed)
    D, C, p, L = s["hidden_size"], s["in_channels"], s["patch_size"], s["depth"]
    H = int(D * s["mlp_ratio"])
    out = C * (2 if learn_sigma else 1)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    sd = {"x_embedder.proj.weight": r(D, C, p, p), "x_embedder.proj.bias": r(D),
          "pos_embed": official_pos_embed(D, s["input_size"] // p),
          "t_embedder.mlp.0.weight": r(D, 256), "t_embedder.mlp.0.bias": r(D),
          "t_embedder.mlp.2.weight": r(D, D), "t_embedder.mlp.2.bias": r(D),
          "y_embedder.embedding_table.weight": r(s["num_classes"] + 1, D, scale=1.0),
          "final_layer.linear.weight": r(p * p * out, D), "final_layer.linear.bias": r(p * p * out),
          "final_layer.adaLN_modulation.1.weight": r(2 * D, D), "final_layer.adaLN_modulation.1.bias": r(2 * D)}
    for i in range(L):
        b = f"blocks.{i}."
        sd.update({b + "attn.qkv.weight": r(3 * D, D), b + "attn.qkv.bias": r(3 * D), b + "attn.proj.weight": r(D, D),
                   b + "attn.proj.bias": r(D), b + "mlp.fc1.weight": r(H, D), b + "mlp.fc1.bias": r(H),
                   b + "mlp.fc2.weight": r(D, H), b + "mlp.fc2.bias": r(D),
                   b + "adaLN_modulation.1.weight": r(6 * D, D), b + "adaLN_modulation.1.bias": r(6 * D)})
    if fmt == "repa":
        for j, z in enumerate(z_dims):
            pre = f"projectors.{j}."
            sd.update({pre + "0.weight": r(projector_dim, D), pre + "0.bias": r(projector_dim),
                       pre + "2.weight": r(projector_dim, projector_dim), pre + "2.bias": r(projector_dim),
                       pre + "4.weight": r(z, projector_dim), pre + "4.bias": r(z)})
    return sd


def official_forward(sd: dict, x, t_own, y, num_heads: int, learn_sigma: bool = False, encoder_depth: int | None = None):
    """SiT / REPA forward in float64 from the state dict: t_own is the model's own time (SiT: 1 at the data)."""
    w = {k: v.double() for k, v in sd.items()}
    D = w["x_embedder.proj.bias"].shape[0]
    p = w["x_embedder.proj.weight"].shape[-1]
    x = x.double()
    h = F.conv2d(x, w["x_embedder.proj.weight"], w["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2) + w["pos_embed"]
    half = 128  # 256 frequencies, computed in float32 as the official embedder does
    freqs = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32) / half)
    args = t_own[:, None].float() * freqs[None]
    tf = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).double()
    temb = F.linear(F.silu(F.linear(tf, w["t_embedder.mlp.0.weight"], w["t_embedder.mlp.0.bias"])),
                    w["t_embedder.mlp.2.weight"], w["t_embedder.mlp.2.bias"])
    c = temb + w["y_embedder.embedding_table.weight"][y]

    def ln(v):
        return F.layer_norm(v, (D,), eps=1e-6)

    B, N, _ = h.shape
    hd = D // num_heads
    zs = None
    for i in range(len({k.split(".")[1] for k in w if k.startswith("blocks.")})):
        b = f"blocks.{i}."
        mods = F.linear(F.silu(c), w[b + "adaLN_modulation.1.weight"], w[b + "adaLN_modulation.1.bias"]).chunk(6, dim=1)
        a = ln(h) * (1 + mods[1][:, None]) + mods[0][:, None]
        qkv = F.linear(a, w[b + "attn.qkv.weight"], w[b + "attn.qkv.bias"]).reshape(B, N, 3, num_heads, hd).permute(2, 0, 3, 1, 4)
        att = torch.softmax(qkv[0] @ qkv[1].transpose(-2, -1) * hd ** -0.5, dim=-1) @ qkv[2]
        h = h + mods[2][:, None] * F.linear(att.transpose(1, 2).reshape(B, N, D), w[b + "attn.proj.weight"], w[b + "attn.proj.bias"])
        m = ln(h) * (1 + mods[4][:, None]) + mods[3][:, None]
        m = F.linear(F.gelu(F.linear(m, w[b + "mlp.fc1.weight"], w[b + "mlp.fc1.bias"]), approximate="tanh"),
                     w[b + "mlp.fc2.weight"], w[b + "mlp.fc2.bias"])
        h = h + mods[5][:, None] * m
        if encoder_depth is not None and i + 1 == encoder_depth:
            zs = F.linear(F.silu(F.linear(F.silu(F.linear(h, w["projectors.0.0.weight"], w["projectors.0.0.bias"])),
                                          w["projectors.0.2.weight"], w["projectors.0.2.bias"])),
                          w["projectors.0.4.weight"], w["projectors.0.4.bias"])
    shift, scale = F.linear(F.silu(c), w["final_layer.adaLN_modulation.1.weight"], w["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=1)
    out = F.linear(ln(h) * (1 + scale[:, None]) + shift[:, None], w["final_layer.linear.weight"], w["final_layer.linear.bias"])
    g = int(N ** 0.5)
    cout = out.shape[-1] // (p * p)
    img = torch.einsum("nhwpqc->nchpwq", out.reshape(B, g, g, p, p, cout)).reshape(B, cout, g * p, g * p)
    if learn_sigma:
        img = img[:, : cout // 2]
    return img, zs


def tolerance(out: torch.Tensor) -> float:
    # float64 all the way except the time features, which both sides compute identically in float32: what is left is
    # float64 rounding through a few layers, ~eps64 * sqrt(number of summands); 1e4 x that leaves a wide margin.
    return 1e4 * torch.finfo(torch.float64).eps * math.sqrt(out[0].numel())


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, TINY["in_channels"], TINY["input_size"], TINY["input_size"], generator=g)
    t = torch.tensor([0.9, 0.5, 0.05])
    y = torch.tensor([0, 3, TINY["num_classes"]])  # the last one is the null class
    return x, t, y


def run_cli(tmp_path, *argv):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, argv)], capture_output=True, text=True, cwd=tmp_path, timeout=300)


# --------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("container", ["bare", "training"])
def test_sit_import_predicts_our_velocity(tmp_path, learn_sigma, container):
    sd = official_state("sit", learn_sigma=learn_sigma)
    ckpt = tmp_path / "sit.pt"
    if container == "bare":
        torch.save(sd, ckpt)
    else:  # the training script's file: model + ema + optimiser + argparse args; the EMA must be the one taken
        decoy = {k: v + 1.0 for k, v in sd.items()}
        args = argparse.Namespace(model="SiT-S/2", path_type="Linear", prediction="velocity")
        torch.save({"model": decoy, "ema": sd, "opt": {"state": {}, "param_groups": []}, "args": args}, ckpt)
    _load_script().main(["--format", "sit", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--num-heads", "4"])
    model = DiT.from_pretrained(tmp_path / "out").double().eval()
    assert model.config["time_input"] == "1-t" and model.config["vae"] == "stabilityai/sd-vae-ft-ema"
    x, t, y = inputs()
    with torch.no_grad():
        ours = model(x.double(), t, y)
        u, _ = official_forward(sd, x, 1 - t, y, num_heads=4, learn_sigma=learn_sigma)
    want = -u
    assert ours.shape == want.shape == x.shape
    torch.testing.assert_close(ours, want, rtol=0, atol=tolerance(want) * float(want.abs().max()))
    assert float(want.abs().mean()) > 0.1  # a real function, not a zero output


def test_repa_import_predicts_its_velocity_and_keeps_the_projector_as_the_repa_tap(tmp_path, capsys):
    sd = official_state("repa", z_dims=(6, 5))
    ckpt = tmp_path / "repa.pt"
    torch.save({"ema": sd, "args": argparse.Namespace(model="SiT-XL/2", encoder_depth=2, path_type="linear", prediction="v",
                                                     qk_norm=False)}, ckpt)
    _load_script().main(["--format", "repa", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--num-heads", "4"])
    printed = capsys.readouterr().out
    assert "REPA tap after block 2" in printed and "dropped REPA projector heads 1..1" in printed
    model = DiT.from_pretrained(tmp_path / "out").double().eval()
    assert (model.repa_depth, model.config["repa_dim"], model.config["repa_hidden"]) == (2, 6, 16)
    x, t, y = inputs(2)
    with torch.no_grad():
        out = model(x.double(), t, y, return_repa=True)
        v, zs = official_forward(sd, x, t, y, num_heads=4, encoder_depth=2)
    torch.testing.assert_close(out.sample, v, rtol=0, atol=tolerance(v) * float(v.abs().max()))
    torch.testing.assert_close(out.repa_features, zs, rtol=0, atol=tolerance(zs) * float(zs.abs().max()))


def test_repa_projector_beyond_a_tiny_models_depth_is_dropped_with_a_note(tmp_path, capsys):
    ckpt = tmp_path / "repa.pt"
    torch.save(official_state("repa"), ckpt)  # bare: no args, REPA's default depth 8 > 3 blocks
    _load_script().main(["--format", "repa", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--num-heads", "4"])
    assert "dropped the REPA projector head" in capsys.readouterr().out
    model = DiT.from_pretrained(tmp_path / "out")
    assert model.repa_projector is None and model.config["time_input"] == "t"


def test_the_contract_command_line_on_an_official_width(tmp_path):
    """Exactly `--format sit --checkpoint FILE --out DIR`: heads from the official size of the width (S: 384 -> 6)."""
    sd = official_state("sit", learn_sigma=True, hidden_size=384, depth=1, input_size=4, num_classes=2, mlp_ratio=1.0)
    torch.save(sd, tmp_path / "SiT-S-2.pt")
    done = run_cli(tmp_path, "--format", "sit", "--checkpoint", "SiT-S-2.pt", "--out", "sit_s2")
    assert done.returncode == 0, done.stderr
    assert "heads 6 (the official model of width 384)" in done.stdout and "learn_sigma True" in done.stdout
    model = DiT.from_pretrained(tmp_path / "sit_s2")
    assert (model.config["num_heads"], model.config["in_channels"], model.num_classes) == (6, 4, 2)


# ------------------------------------------------------------------------------------------- bad checkpoints
def _bad_cases(tmp: Path) -> dict[str, tuple[Path, list[str], str]]:
    sd = official_state("sit")
    cases = {}

    def save(name, obj):
        torch.save(obj, tmp / f"{name}.pt")
        return tmp / f"{name}.pt"

    cases["missing key"] = (save("missing", {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}), [], "missing blocks.1.mlp.fc2.bias")
    cases["extra key"] = (save("extra", {**sd, "blocks.0.attn.q_norm.weight": torch.ones(8)}), [], "unexpected blocks.0.attn.q_norm.weight")
    wrong = dict(sd)
    wrong["blocks.2.attn.proj.weight"] = torch.zeros(32, 16)
    cases["wrong shape"] = (save("shape", wrong), [], "blocks.2.attn.proj.weight [32, 16]")
    cases["repa as sit"] = (save("repa", official_state("repa")), [], "use --format repa")
    cases["not a sit file"] = (save("other", {"conv.weight": torch.zeros(3, 3)}), [], "not a SIT checkpoint")
    cases["not a state dict"] = (save("list", [1, 2, 3]), [], "holds a list")
    garbage = tmp / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    cases["not a torch file"] = (garbage, [], "cannot read")
    cases["missing file"] = (tmp / "nowhere.pt", [], "not found")
    cases["learned pos_embed"] = (save("pos", {**sd, "pos_embed": torch.randn(sd["pos_embed"].shape)}), [], "learned")
    cases["heads"] = (save("heads", sd), ["--num-heads", "5"], "does not divide")
    cases["unknown width"] = (save("width", sd), [], "pass --num-heads")
    cases["score model"] = (save("score", {"ema": sd, "args": argparse.Namespace(path_type="GVP", prediction="score")}), [], "GVP")
    return cases


def test_bad_checkpoints_get_one_line_exit_2_and_nothing_written(tmp_path, capsys):
    module = _load_script()
    for name, (ckpt, extra, needle) in _bad_cases(tmp_path).items():
        out = tmp_path / f"out_{name.replace(' ', '_')}"
        heads = [] if "--num-heads" in extra or name == "unknown width" else ["--num-heads", "4"]
        with pytest.raises(SystemExit) as stop:
            module.main(["--format", "sit", "--checkpoint", str(ckpt), "--out", str(out), *heads, *extra])
        err = capsys.readouterr().err
        assert stop.value.code == 2, name
        assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, (name, err)
        assert not out.exists(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left behind


def test_an_out_folder_holding_other_files_is_refused_before_reading(tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        _load_script().main(["--format", "sit", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "busy")])
    assert "--out" in capsys.readouterr().err and (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_one_subprocess_bad_checkpoint_prints_one_line(tmp_path):
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "x.pt")
    done = run_cli(tmp_path, "--format", "repa", "--checkpoint", "x.pt", "--out", "o")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "not a REPA checkpoint" in done.stderr
    assert not (tmp_path / "o").exists()
