"""Official SiT and REPA checkpoints -> our DiT, predicting in our conventions (CLI: scripts/import_checkpoint.py).

Written from the published architectures (SiT: Ma et al. 2024, github.com/willisma/SiT; REPA: Yu et al. 2024,
github.com/sihyun-yu/REPA; both MIT); no code copied. Both are DiT-style adaLN-Zero transformers whose parameters
map one to one onto ours, with three differences of convention, converted once here:

- time: SiT's linear path has t = 1 at the data, x_t = t x0 + (1 - t) eps, and predicts u = dx_t/dt = x0 - eps. Ours
  has t = 1 at the noise and predicts v = eps - x0, so v(x, t, y) = -u_SiT(x, 1 - t, y). The sign is folded into the
  final linear layer (exact), and the DiT embeds 1 - t as SiT embeds its own t (`time_input="1-t"`; no x 1000).
  REPA's linear path already has t = 1 at the noise and predicts v: only `time_input="t"`.
- learn_sigma (SiT): the head predicts 2C channels, the last C of which (a variance SiT's flow sampler never reads)
  are dropped by keeping the rows of channels 0..C-1 of the final linear layer (exact).
- the fixed sin-cos position embedding puts the column in its first half (`pos_embed_axes="wh"`); the stored
  `pos_embed` is checked against it and not kept (ours is a buffer computed from the config).

The architecture is read from the tensors' shapes (patch size, width, depth, number of classes, input size,
learn_sigma, MLP ratio, REPA projector sizes). The number of heads cannot be read from shapes: it comes from
`num_heads`, else the training checkpoint's `args.model` (e.g. "SiT-XL/2"), else the official size of that width.
REPA's projector head (its first one, when several were trained) becomes our REPA tap at `repa_depth` (the
checkpoint's `args.encoder_depth`, else REPA's default 8); it is dropped, with a note, where it cannot be placed.
Anything that is not such a checkpoint is one `UserError` line, before anything is written.
"""
from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dmd_dar.errors import UserError
from dmd_dar.models.dit import DiT, sincos_pos_embed_2d

FORMATS = ("sit", "repa")
# width -> heads of the official sizes (S, B, L, XL), and the preset names of the training scripts' --model flag
OFFICIAL_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}
PRESET_HEADS = {"S": 6, "B": 12, "L": 16, "XL": 16}
REPA_DEFAULT_DEPTH = 8  # REPA's --encoder-depth default, the alignment depth of its released SiT-XL/2
BLOCK_KEYS = ("attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "mlp.fc1.weight", "mlp.fc1.bias",
              "mlp.fc2.weight", "mlp.fc2.bias", "adaLN_modulation.1.weight", "adaLN_modulation.1.bias")
TOP_KEYS = ("x_embedder.proj.weight", "x_embedder.proj.bias", "pos_embed", "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias",
            "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias", "y_embedder.embedding_table.weight",
            "final_layer.linear.weight", "final_layer.linear.bias", "final_layer.adaLN_modulation.1.weight",
            "final_layer.adaLN_modulation.1.bias")


@dataclass
class Imported:
    model: DiT
    notes: list[str] = field(default_factory=list)  # what the user should know (dropped heads, choices made)
    source: dict[str, Any] = field(default_factory=dict)  # what was read: format, which weights, architecture


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], str, dict[str, Any]]:
    """(state dict, which part of the file it is, the training arguments when the file has them) of a bare state
    dict or a training checkpoint {"model", "ema", "opt", "args", ...}; `ema` is taken when present."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found: pass the .pt file of a SiT or REPA checkpoint")
    try:  # the training scripts pickle their argparse.Namespace beside the weights: allow that one class, nothing else
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip/pickle damage, or objects other than tensors and plain containers
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot read {path} as a PyTorch checkpoint of tensors ({first[:160]}); pass a SiT or REPA .pt file") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a {type(data).__name__}, not a state dict or a training checkpoint")
    args = data.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}
    for part in ("ema", "model"):
        if isinstance(data.get(part), dict):
            state, which = data[part], part
            break
    else:
        state, which = data, "state dict"
    if not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UserError(f"{path}: the {which} is not a mapping of names to tensors; pass a SiT or REPA checkpoint")
    return state, which, args


def _shape(state: dict[str, torch.Tensor], key: str, fmt: str, rank: int) -> tuple[int, ...]:
    if key not in state:
        raise UserError(f"not a {fmt.upper()} checkpoint: no {key!r} tensor (keys start {', '.join(list(state)[:4])})")
    shape = tuple(state[key].shape)
    if len(shape) != rank:
        raise UserError(f"{fmt.upper()} checkpoint: {key} has shape {list(shape)}, expected {rank} dimensions")
    return shape


def infer_architecture(state: dict[str, torch.Tensor], fmt: str) -> dict[str, Any]:
    """Sizes read from the shapes of the official keys (see the module docstring)."""
    hidden, channels, p, p2 = _shape(state, "x_embedder.proj.weight", fmt, 4)
    if p != p2:
        raise UserError(f"{fmt.upper()} checkpoint: x_embedder.proj.weight has a non-square patch {p}x{p2}")
    _, tokens, width = _shape(state, "pos_embed", fmt, 3)
    grid = round(tokens ** 0.5)
    if grid * grid != tokens or width != hidden:
        raise UserError(f"{fmt.upper()} checkpoint: pos_embed {list(state['pos_embed'].shape)} is not a square grid of width {hidden}")
    rows, _ = _shape(state, "y_embedder.embedding_table.weight", fmt, 2)
    out_features, _ = _shape(state, "final_layer.linear.weight", fmt, 2)
    out_channels, rest = divmod(out_features, p * p)
    if rest or out_channels not in (channels, 2 * channels) or (fmt == "repa" and out_channels != channels):
        raise UserError(f"{fmt.upper()} checkpoint: final_layer.linear.weight predicts {out_features} features, not "
                        f"{p}x{p}x{channels}" + ("" if fmt == "repa" else f" or {p}x{p}x{2 * channels} (learn_sigma)"))
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    if depth == 0:
        raise UserError(f"not a {fmt.upper()} checkpoint: no blocks.N.* tensors")
    mlp_hidden, _ = _shape(state, "blocks.0.mlp.fc1.weight", fmt, 2)
    mlp_ratio = mlp_hidden / hidden
    if int(hidden * mlp_ratio) != mlp_hidden:
        raise UserError(f"{fmt.upper()} checkpoint: MLP width {mlp_hidden} is not a ratio of the width {hidden} we can rebuild")
    return dict(input_size=grid * p, patch_size=p, in_channels=channels, hidden_size=hidden, depth=depth, mlp_ratio=mlp_ratio,
                num_classes=rows - 1, learn_sigma=out_channels == 2 * channels)


def resolve_heads(hidden: int, num_heads: int | None, args: dict[str, Any]) -> tuple[int, str]:
    if num_heads is not None:
        how = "given"
    elif isinstance(args.get("model"), str) and (m := re.fullmatch(r"SiT-(S|B|L|XL)/\d", args["model"])):
        num_heads, how = PRESET_HEADS[m.group(1)], f"from the checkpoint's args.model={args['model']}"
    elif hidden in OFFICIAL_HEADS:
        num_heads, how = OFFICIAL_HEADS[hidden], f"the official model of width {hidden}"
    else:
        raise UserError(f"width {hidden} is not one of the official sizes ({', '.join(map(str, OFFICIAL_HEADS))}), so the "
                        "number of attention heads cannot be told from the weights: pass --num-heads")
    if num_heads < 1 or hidden % num_heads:
        raise UserError(f"--num-heads {num_heads} does not divide the width {hidden}")
    return num_heads, how


def _check_training_args(fmt: str, args: dict[str, Any]) -> None:
    """A training checkpoint says which path and prediction it was trained with: only the linear velocity ones convert."""
    if fmt == "sit":
        path, prediction = str(args.get("path_type", "Linear")), str(args.get("prediction", "velocity"))
        if path.lower() != "linear" or prediction.lower() != "velocity":
            raise UserError(f"this SiT checkpoint was trained with path_type={path}, prediction={prediction}; only the "
                            "Linear path with velocity prediction (SiT's default and its released models) converts to our flow")
    else:
        path, prediction = str(args.get("path_type", "linear")), str(args.get("prediction", "v"))
        if path.lower() != "linear" or prediction.lower() != "v":
            raise UserError(f"this REPA checkpoint was trained with path_type={path}, prediction={prediction}; only the "
                            "linear path with v prediction (REPA's default) converts to our flow")
        if args.get("qk_norm"):
            raise UserError("this REPA checkpoint was trained with --qk-norm (LayerNorm on queries and keys), which our "
                            "DiT does not have; use a checkpoint trained without it")


def official_keys(arch: dict[str, Any], fmt: str, projectors: int) -> set[str]:
    keys = set(TOP_KEYS) | {f"blocks.{i}.{k}" for i in range(arch["depth"]) for k in BLOCK_KEYS}
    if fmt == "repa":
        keys |= {f"projectors.{j}.{layer}.{kind}" for j in range(projectors) for layer in (0, 2, 4) for kind in ("weight", "bias")}
    return keys


def _listing(keys: list[str]) -> str:
    return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


def convert(state: dict[str, torch.Tensor], fmt: str, num_heads: int | None = None, repa_depth: int | None = None,
            drop_projector: bool = False, args: dict[str, Any] | None = None, vae: str | None = None,
            note: Callable[[str], None] | None = None) -> Imported:
    """An official `fmt` ("sit" or "repa") state dict -> our DiT predicting v(x, t, y) in our time convention.
    `repa_depth`: where REPA's projector reads (default: args.encoder_depth, else 8); `drop_projector`: do not keep it.
    `vae`: recorded in the model's config (the latent space it denoises)."""
    if fmt not in FORMATS:
        raise UserError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    args = args or {}
    _check_training_args(fmt, args)
    notes: list[str] = []
    arch = infer_architecture(state, fmt)
    heads, heads_how = resolve_heads(arch["hidden_size"], num_heads, args)
    projectors = len({int(m.group(1)) for k in state if (m := re.match(r"projectors\.(\d+)\.", k))})
    expected = official_keys(arch, fmt, projectors)
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        what = []
        if missing:
            what.append(f"missing {_listing(missing)}")
        if extra:
            what.append(f"unexpected {_listing(extra)}")
        hint = " (is it a REPA checkpoint? use --format repa)" if fmt == "sit" and any(k.startswith("projectors.") for k in extra) else ""
        raise UserError(f"not a {fmt.upper()} checkpoint of this architecture: {'; '.join(what)}{hint}")

    repa: dict[str, Any] = {}
    if fmt == "repa" and projectors:
        depth_from = "given" if repa_depth is not None else "args.encoder_depth" if args.get("encoder_depth") else "REPA's default"
        depth_at = repa_depth if repa_depth is not None else int(args.get("encoder_depth") or REPA_DEFAULT_DEPTH)
        if drop_projector:
            notes.append(f"dropped the REPA projector head{'s' if projectors > 1 else ''} (--drop-projector)")
        elif not 1 <= depth_at <= arch["depth"]:
            if repa_depth is not None:
                raise UserError(f"--repa-depth {repa_depth} is outside 1..{arch['depth']} (the model's depth)")
            notes.append(f"dropped the REPA projector head: REPA's default depth {depth_at} is beyond this model's "
                         f"{arch['depth']} blocks (pass --repa-depth to keep it)")
        else:
            repa = dict(repa_depth=depth_at, repa_dim=int(state["projectors.0.4.weight"].shape[0]),
                        repa_hidden=int(state["projectors.0.0.weight"].shape[0]))
            notes.append(f"REPA projector head kept as the REPA tap after block {depth_at} ({depth_from})")
            if projectors > 1:
                notes.append(f"dropped REPA projector heads 1..{projectors - 1} (our DiT has one REPA tap)")

    learn_sigma = arch.pop("learn_sigma")
    model = DiT(**arch, num_heads=heads, class_dropout_prob=0.1, time_input="1-t" if fmt == "sit" else "t",
                pos_embed_axes="wh", vae=vae, **repa)
    p, c, hidden = arch["patch_size"], arch["in_channels"], arch["hidden_size"]

    # every official tensor must have the shape the architecture read above implies
    own = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        ours = key.replace("x_embedder.proj.", "x_embedder.").replace("y_embedder.embedding_table.", "y_embedder.")
        ours = re.sub(r"^projectors\.0\.", "repa_projector.", ours)
        if key == "pos_embed" or key.startswith("projectors."):
            if key.startswith("projectors.0.") and repa:
                mapped[ours] = value
            continue
        if key.startswith("final_layer.linear.") and learn_sigma:  # rows are (patch row, patch column, channel)
            value = value.reshape(p * p, 2 * c, *value.shape[1:])[:, :c].reshape(p * p * c, *value.shape[1:])
        if key.startswith("final_layer.linear.") and fmt == "sit":
            value = -value  # v = -u
        mapped[ours] = value
    bad = [f"{k} {list(v.shape)} (expected {list(own[k].shape)})" for k, v in mapped.items() if k in own and v.shape != own[k].shape]
    if bad:
        raise UserError(f"{fmt.upper()} checkpoint: tensors of inconsistent shapes: {_listing(bad)}")
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise UserError(f"{fmt.upper()} checkpoint has non-finite weights ({_listing(nonfinite)}); use another checkpoint")
    pos = state["pos_embed"].double().reshape(-1, hidden)
    want = sincos_pos_embed_2d(hidden, arch["input_size"] // p, arch["input_size"] // p, "wh").double()
    if not torch.allclose(pos, want, atol=1e-5, rtol=0):  # stored in float32: rounding is ~6e-8
        raise UserError(f"{fmt.upper()} checkpoint: pos_embed is not the fixed sin-cos embedding of SiT/REPA; a learned "
                        "position embedding cannot be imported")
    model.load_backbone_state({k: v.float() for k, v in mapped.items()}, source=f"the {fmt.upper()} checkpoint")
    source = dict(format=fmt, heads=f"{heads} ({heads_how})", learn_sigma=learn_sigma, **arch)
    for line in notes:
        if note is not None:
            note(line)
    return Imported(model.eval(), notes, source)


def import_checkpoint(path: str | Path, fmt: str, out: str | Path | None = None, **options) -> Imported:
    """Read `path`, convert it (`convert`'s options), and write the DiT folder `out` (atomically) when given."""
    state, which, args = read_checkpoint(path)
    imported = convert(state, fmt, args=args, **options)
    imported.source.update(file=str(path), weights=which)
    if out is not None:
        imported.model.save_pretrained(out)
    return imported
