"""SiT/DiT backbone on the depth router: adaLN-Zero blocks split into attention and MLP sublayers.

Written from the SiT/DiT papers (Peebles & Xie 2023, Ma et al. 2024); no code copied. Differences from the
reference implementations, on purpose:
- the model predicts exactly `in_channels` channels (no learn_sigma half to slice off);
- t is the flow time of `dmd_dar.diffusion` (t in [0, 1], t = 1 noise), embedded as 1000 t (`time_input`
  switches this for imported checkpoints: SiT embeds its own time 1 - t, REPA embeds t; see models/importers.py);
- each block is two sublayers (attention, MLP) whose inputs come from `self.router`, so one class serves
  the residual baseline and every DAR variant (`routing=RoutingConfig(...)`);
- label dropout is a pure function (`drop_labels`) with an explicit generator: no hidden RNG in forward.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dmd_dar.checkpoint import WEIGHTS_NAME, load_model_files, save_model
from dmd_dar.errors import ConfigError, UserError
from dmd_dar.routing import DepthRouter, RoutingConfig

# What the sinusoidal time features are computed from (`time_input`): ours (1000 t), SiT's own time (1 - t: SiT has
# t = 1 at the data), REPA's (t itself). Position-embedding halves (`pos_embed_axes`): "hw" (ours: rows first) or
# "wh" (SiT / REPA / MAE: columns first).
TIME_INPUTS = ("1000t", "1-t", "t")
POS_EMBED_AXES = ("hw", "wh")

PRESETS: dict[str, dict[str, int]] = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, axes: str = "hw") -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [grid_h * grid_w, dim] (half the channels per axis; `axes` "hw": the
    first half encodes the row, "wh": the column)."""

    def axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    ys, xs = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij")
    halves = [axis(dim // 2, ys), axis(dim // 2, xs)]
    emb = np.concatenate(halves if axes == "hw" else halves[::-1], axis=1)
    return torch.from_numpy(emb).float()


class TimestepEmbedder(nn.Module):
    """Flow time t in [0, 1] -> sinusoidal features of 1000 t (or of 1 - t, or t: `time_input`) -> MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256, time_input: str = "1000t"):
        super().__init__()
        self.frequency_size = frequency_size
        self.time_input = time_input
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        if self.time_input == "1000t":
            args = (1000.0 * t.float())[:, None] * freqs[None]
        else:
            args = (1.0 - t.float() if self.time_input == "1-t" else t.float())[:, None] * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(dim // num_heads, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(dim // num_heads, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero block as two sublayers; `modulation(c)` is computed once and shared by both."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.adaLN_modulation(c).chunk(6, dim=-1)

    def attention_sublayer(self, x, shift, scale, gate):
        return gate.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift, scale))

    def mlp_sublayer(self, x, shift, scale, gate):
        return gate.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


@dataclass
class DiTOutput:
    """Returned when a caller asks for more than the prediction (`return_repa=True`)."""

    sample: torch.Tensor
    repa_features: torch.Tensor | None = None
    hidden: torch.Tensor | None = None  # what the head reads (the final aggregated state) [B, T, D]


class DiT(nn.Module):
    """Class-conditional SiT/DiT predicting the flow velocity v = eps - x0 from (x_t, t, y).

    y holds class ids in [0, num_classes]; id `num_classes` is the null (unconditional) class used by label
    dropout and classifier-free guidance.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        routing: RoutingConfig | dict | None = None,
        repa_depth: int | None = None,
        repa_dim: int | None = None,
        repa_hidden: int = 2048,
        qk_norm: bool = False,
        time_input: str = "1000t",
        pos_embed_axes: str = "hw",
        vae: str | None = None,
    ):
        """`time_input`, `pos_embed_axes`: see TIME_INPUTS / POS_EMBED_AXES (the defaults are ours; imported SiT /
        REPA checkpoints set theirs). `vae`: None for a pixel-space model; else the VAE (hub id, local folder or
        "tiny") whose scaled latents the model denoises, which decodes its samples (dmd_dar.t2i.vae)."""
        super().__init__()
        routing = RoutingConfig.from_dict(routing)
        if input_size % patch_size:
            raise UserError(f"input_size={input_size} is not divisible by patch_size={patch_size}")
        if hidden_size % num_heads:
            raise UserError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        if repa_depth is not None and not (1 <= repa_depth <= depth and repa_dim):
            raise UserError(f"repa_depth={repa_depth} must be in 1..{depth} and repa_dim must be set")
        if time_input not in TIME_INPUTS or pos_embed_axes not in POS_EMBED_AXES:
            raise UserError(f"time_input={time_input!r} / pos_embed_axes={pos_embed_axes!r}: use one of "
                            f"{', '.join(TIME_INPUTS)} / {', '.join(POS_EMBED_AXES)}")
        self.config: dict[str, Any] = dict(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, num_classes=num_classes,
            class_dropout_prob=class_dropout_prob, routing=routing.to_dict(), repa_depth=repa_depth,
            repa_dim=repa_dim, repa_hidden=repa_hidden, qk_norm=qk_norm,
        )
        # recorded only when they differ from the defaults, so that the folders of our own models stay as they were
        extra = dict(time_input=(time_input, "1000t"), pos_embed_axes=(pos_embed_axes, "hw"), vae=(vae, None))
        self.config.update({k: v for k, (v, default) in extra.items() if v != default})
        self.vae = vae
        self.in_channels = self.out_channels = in_channels
        self.patch_size = patch_size
        self.input_size = input_size
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.repa_depth = repa_depth
        self.gradient_checkpointing = False
        grid = input_size // patch_size

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        pos_embed = sincos_pos_embed_2d(hidden_size, grid, grid, pos_embed_axes)
        self.register_buffer("pos_embed", pos_embed.unsqueeze(0), persistent=False)
        self.t_embedder = TimestepEmbedder(hidden_size, time_input=time_input)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size)  # last row: the null class
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.router = DepthRouter(routing, num_sublayers=2 * depth, dim=hidden_size, time_dim=hidden_size)
        self.repa_projector = None
        if repa_depth is not None:
            self.repa_projector = nn.Sequential(
                nn.Linear(hidden_size, repa_hidden), nn.SiLU(), nn.Linear(repa_hidden, repa_hidden), nn.SiLU(),
                nn.Linear(repa_hidden, repa_dim),
            )
        self.initialize_weights()

    # ------------------------------------------------------------------------------------ building
    @classmethod
    def from_preset(cls, name: str, **kwargs) -> DiT:
        """`DiT.from_preset("XL/2", input_size=32, ...)`: sizes S/B/L/XL x patch 2/4/8."""
        size, _, patch = name.partition("/")
        if size not in PRESETS or patch not in ("2", "4", "8"):
            raise UserError(f"unknown DiT preset {name!r}; use one of S, B, L, XL with /2, /4 or /8 (e.g. 'XL/2')")
        return cls(patch_size=int(patch), **PRESETS[size], **kwargs)

    def initialize_weights(self) -> None:
        def init_linear(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(init_linear)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        self.router.reset_parameters()  # the global Linear init must not decide the router's start

    @property
    def routing(self) -> RoutingConfig:
        return self.router.config

    @property
    def null_class(self) -> int:
        return self.num_classes

    def drop_labels(self, y: torch.Tensor, generator: torch.Generator | None = None, prob: float | None = None) -> torch.Tensor:
        """Replace labels by the null class with probability `prob` (default: class_dropout_prob)."""
        prob = self.class_dropout_prob if prob is None else prob
        if prob <= 0:
            return y
        drop = torch.rand(y.shape, generator=generator, device="cpu").to(y.device) < prob
        return torch.where(drop, torch.full_like(y, self.null_class), y)

    # ------------------------------------------------------------------------------------ forward
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        return self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p, c = self.patch_size, self.out_channels
        g = self.input_size // p
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def _run(self, fn, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, return_repa: bool = False,
                return_hidden: bool = False, record_routing: dict | None = None):
        """Velocity prediction [B, C, H, W]. `return_repa` / `return_hidden` return a `DiTOutput` with the
        projected REPA features / the final hidden state; `record_routing` (a dict) receives the DAR routing
        weights per sublayer, for diagnostics."""
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size or x.shape[1] != self.in_channels:
            raise ValueError(f"DiT expects [B, {self.in_channels}, {self.input_size}, {self.input_size}] input, got {list(x.shape)}")
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        h0 = self.patchify(x)
        t_emb = self.t_embedder(t)
        c = t_emb + self.y_embedder(y)
        state = self.router.start(h0, t_emb, record_weights=record_routing is not None)
        repa_tap_sublayer = 2 * self.repa_depth + 1 if self.repa_depth is not None else None
        repa_hidden = None
        for k, block in enumerate(self.blocks):
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = block.modulation(c)
            l = 2 * k + 1
            h = self.router.read(state, l)
            if l == repa_tap_sublayer:
                repa_hidden = h
            self.router.write(state, l, self._run(block.attention_sublayer, h, shift_a, scale_a, gate_a))
            h = self.router.read(state, l + 1)
            self.router.write(state, l + 1, self._run(block.mlp_sublayer, h, shift_m, scale_m, gate_m))
        h = self.router.read_final(state)
        if repa_tap_sublayer == 2 * len(self.blocks) + 1:
            repa_hidden = h
        out = self.unpatchify(self.final_layer(h, c))
        if record_routing is not None and state.weights is not None:
            record_routing.update(state.weights)
        if not (return_repa or return_hidden):
            return out
        feats = self.repa_projector(repa_hidden) if return_repa and self.repa_projector is not None else None
        return DiTOutput(sample=out, repa_features=feats, hidden=h if return_hidden else None)

    # ------------------------------------------------------------------------------------ save/load
    def save_pretrained(self, folder) -> None:
        save_model(folder, {"class": "DiT", **self.config}, self.state_dict())

    @classmethod
    def from_pretrained(cls, folder, routing: RoutingConfig | dict | None = None, **overrides) -> DiT:
        """Load a DiT folder. `routing` swaps the routing: a residual checkpoint loads into a DAR model, whose
        router parameters (the only new keys) keep their zero initialisation."""
        files = load_model_files(folder)
        config = {k: v for k, v in files.config.items() if k != "class"}
        if files.config.get("class", "DiT") != "DiT":
            raise UserError(f"{folder} holds a {files.config.get('class')} model, not a DiT")
        saved_routing = routing is None and "routing" not in overrides
        if routing is not None:
            config["routing"] = RoutingConfig.from_dict(routing).to_dict()
        config.update(overrides)
        if not isinstance(config.get("routing"), (dict, type(None))):
            raise UserError(f"{folder}/config.json: routing={config['routing']!r} is not a routing mapping "
                            "(mode, query, chunk_size, ...); the file was edited, restore it")
        try:
            model = cls(**check_config_fields(config, cls, f"{folder}/config.json"))
        except ConfigError as err:  # a routing this version cannot build
            raise UserError(f"{folder}/config.json: {err}; the file was edited or written by another version of dmd_dar") from None
        if saved_routing:  # the router weights must be those of the routing the folder names, never silently dropped
            own = {k: v.shape for k, v in model.state_dict().items() if k.startswith("router.")}
            saved = {k: v.shape for k, v in files.state_dict.items() if k.startswith("router.")}
            if own != saved:
                raise UserError(
                    f"{folder}: the router weights in {WEIGHTS_NAME} do not fit the routing in config.json "
                    f"({model.routing.mode}, query={model.routing.query}, chunk_size={model.routing.chunk_size}): missing "
                    f"{sorted(set(own) - set(saved))[:3]}, unexpected {sorted(set(saved) - set(own))[:3]}, shape mismatch "
                    f"{sorted(k for k in set(own) & set(saved) if own[k] != saved[k])[:3]}; config.json was edited or comes "
                    "from another model: restore it (or pass routing= to load the backbone alone)")
        model.load_backbone_state(files.state_dict, source=str(folder))
        return model

    def load_backbone_state(self, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Load weights allowing only router parameters to be missing (residual -> DAR) or unexpected
        (DAR -> residual); any other mismatch is a user error that names the keys."""
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict and not k.startswith("router.")]
        unexpected = [k for k in state_dict if k not in own and not k.startswith("router.")]
        shape_mismatch = [k for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
        if missing or unexpected or shape_mismatch:
            raise UserError(
                f"weights from {source} do not fit this DiT: missing {missing[:4]}, unexpected {unexpected[:4]}, "
                f"shape mismatch {shape_mismatch[:4]}; check the model size/patch/channels in the config"
            )
        self.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)


def check_config_fields(config: dict, cls: type, source: str) -> dict:
    """A model folder's config.json, checked against the constructor: unknown fields and values of the wrong type
    (a number given as text, say) are one user error naming the field, not a traceback from deep inside."""
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(config) - set(params))
    if unknown:
        raise UserError(f"{source}: unknown field(s) {', '.join(unknown)} for {cls.__name__}; the folder was not written "
                        "by this version of dmd_dar, or the file was edited")
    for name, value in config.items():
        default = params[name].default
        if default is None and params[name].annotation == "str | None" and not isinstance(value, (str, type(None))):
            raise UserError(f"{source}: field {name}={value!r} should be a str or null")
        expected = (int, float) if isinstance(default, float) else type(default)
        if default is not None and isinstance(default, (bool, int, float, str)) and (
                not isinstance(value, expected) or isinstance(value, bool) != isinstance(default, bool)):
            raise UserError(f"{source}: field {name}={value!r} should be a {type(default).__name__}")
    return config
