"""DAR inside pretrained diffusers transformers: `convert_to_dar`, `save_dar_pretrained`, `load_dar_pretrained`.

`convert_to_dar(model, routing)` keeps every module object of the diffusers model (same weights, no copies),
registers a `DepthRouter` as `model.router` and swaps the model's class for a thin subclass whose `forward`
has the stock signature but routes every residual addition of the image stream through the router, one
sublayer per residual add (see docs/diffusers.md for the per-class table). The new forwards re-orchestrate
the blocks' own submodules (norms, attention modules and their processors, feed-forwards, gates); they do
not copy the stock block code.

Written against diffusers==0.42.1 (pinned in pyproject.toml); the block internals used here are checked by
tests/test_diffusers_dar.py (residual mode == stock forward, bit for bit).

Text (context) stream of MM-DiTs: `route_text=False` (default) keeps its residual adds; `route_text=True`
gives it its own router `model.text_router` with the same RoutingConfig. The text router always exists
(in residual mode it has no parameters), so one code path serves both.

Not supported by the DAR forwards (one clear UserError): ControlNet residuals, IP-Adapter, SD3 skip_layers.
fp16 overflow clipping of Flux/Qwen-Image is not reproduced (use bf16 or fp32).
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dmd_dar.checkpoint import atomic_dir, follow_umask, read_json
from dmd_dar.errors import ConfigError, UserError
from dmd_dar.models.architectures import CLASS_NAMES, architecture_of, architecture_of_class
from dmd_dar.routing import DepthRouter, RoutingConfig

try:
    import diffusers
    from diffusers import (  # ModelMixin: a stock pipeline loading a component from this module looks it up here
        DiTTransformer2DModel,
        FluxTransformer2DModel,
        ModelMixin,  # noqa: F401
        PixArtTransformer2DModel,
        QwenImageTransformer2DModel,
        SD3Transformer2DModel,
    )
    from diffusers.models.attention import _chunked_feed_forward
    from diffusers.models.modeling_outputs import Transformer2DModelOutput
    from diffusers.models.transformers.transformer_qwenimage import compute_text_seq_len_from_mask
    from diffusers.utils.peft_utils import apply_lora_scale
except ImportError as err:  # pragma: no cover - diffusers is a hard dependency of this module only
    raise ImportError(f"dmd_dar.models.diffusers_dar needs diffusers==0.42.1 ({err}); run scripts/setup.sh") from err

ROUTING_FILE = "routing.json"
ROUTER_WEIGHTS = "router.safetensors"
# The backbone is saved as the "dar" variant of diffusers' weights file, never under the stock name: the stock
# class's `from_pretrained` then finds no weights and raises, instead of silently returning a residual model
# without the router. Format 1 exports (before) used the stock name; they still load with `load_dar_pretrained`.
BACKBONE_VARIANT = "dar"
BACKBONE_WEIGHTS = f"diffusion_pytorch_model.{BACKBONE_VARIANT}.safetensors"
LEGACY_BACKBONE_WEIGHTS = "diffusion_pytorch_model.safetensors"
FORMAT_VERSION = 2


# ------------------------------------------------------------------------------------------ helpers
class _DARMixin:
    """Shared machinery of the converted classes. `self.router` routes the image stream, `self.text_router`
    the text stream of MM-DiTs (residual unless route_text=True)."""

    _stock_class: type = None

    # Routed reads come back in fp32 in DAR mode; the diffusers submodules want the model's own dtype.
    # In residual mode `.to` is a no-op that returns the very same tensor (bit-exact path).
    @staticmethod
    def _read(router: DepthRouter, state, l: int, dtype: torch.dtype) -> torch.Tensor:
        return router.read(state, l).to(dtype)

    @staticmethod
    def _read_unnormalised(router: DepthRouter, state, l: int, dtype: torch.dtype) -> torch.Tensor:
        """Input of a sublayer that does NOT start with a norm (PixArt cross-attention). A zero-initialised
        router reads the mean of its sources; multiplying by the number of sources gives back their sum,
        i.e. the residual stream, so the converted model still starts as the teacher."""
        x = router.read(state, l)
        if router.config.mode == "dar":
            x = x * len(router.sources(l))
        return x.to(dtype)

    @staticmethod
    def _read_text_final(router: DepthRouter, state, dtype: torch.dtype) -> torch.Tensor:
        return router.read_final(state).to(dtype)

    def _checkpointed(self, fn, *args):
        """Gradient checkpointing per sublayer (the router reads stay outside, like our own DiT)."""
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            ckpt = self._gradient_checkpointing_func
            if ckpt is None:
                return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
            return ckpt(fn, *args)
        return fn(*args)

    def _router_time(self, t_emb_fn) -> torch.Tensor | None:
        """The timestep embedding for static_t queries, computed only when a router needs it."""
        needs = any(
            r.config.mode == "dar" and r.config.query == "static_t" for r in (self.router, getattr(self, "text_router", None)) if r is not None
        )
        return t_emb_fn() if needs else None

    @staticmethod
    def _feed_forward(block, ff: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if getattr(block, "_chunk_size", None) is not None:
            return _chunked_feed_forward(ff, x, block._chunk_dim, block._chunk_size)
        return ff(x)

    @property
    def routing(self) -> RoutingConfig:
        return self.router.config

    def save_pretrained(self, save_directory, **kwargs) -> None:  # noqa: D401 - diffusers' name
        """Saving a converted model always writes the DAR export folder (see `save_dar_pretrained`); a stock
        pipeline's `save_pretrained` calls this for its transformer (its other options do not apply)."""
        save_dar_pretrained(self, save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, torch_dtype=None, **kwargs):
        """Load a DAR export folder (`save_dar_pretrained`) as this class, router included: what a stock
        `DiffusionPipeline.from_pretrained` calls for a component recorded as ["dmd_dar.models.diffusers_dar",
        "DAR<Stock>"] in model_index.json (import dmd_dar.models.diffusers_dar first). Other diffusers loading
        options (device_map, low_cpu_mem_usage, ...) go to the stock loader of the backbone."""
        folder = Path(pretrained_model_name_or_path).expanduser() / (subfolder or "")
        if not folder.is_dir():
            raise UserError(f"{cls.__name__}.from_pretrained needs a local DAR export folder; {folder} is not a folder "
                            "(download a hub repository first, e.g. with huggingface_hub.snapshot_download)")
        kwargs.pop("variant", None)  # the export has its own weights file names
        kwargs.pop("use_flashpack", None)
        model = load_dar_pretrained(folder, torch_dtype=torch_dtype, **kwargs)
        if type(model) is not cls:
            raise UserError(f"{folder} holds a {type(model).__name__}, not a {cls.__name__}; load it with "
                            f"{type(model).__name__}.from_pretrained or load_dar_pretrained")
        return model


def _unsupported(feature: str) -> UserError:
    return UserError(f"{feature} is not supported by the DAR forward of converted diffusers models; call the model without it")


# ------------------------------------------------------------------------------------------ DiT / PixArt
def _basic_block_sublayers(block) -> int:
    """BasicTransformerBlock: self-attention, cross-attention (if any) and feed-forward are one sublayer each."""
    return 3 if block.attn2 is not None else 2


def _run_basic_block(model, block, state, l: int, dtype, *, timestep, class_labels, attention_mask,
                     encoder_hidden_states, encoder_attention_mask, cross_attention_kwargs) -> int:
    """Route one diffusers BasicTransformerBlock (norm types ada_norm_zero / ada_norm_single). Returns the
    number of the last sublayer written."""
    router = model.router
    kwargs = dict(cross_attention_kwargs or {})
    if kwargs.pop("gligen", None) is not None:
        raise _unsupported("GLIGEN (cross_attention_kwargs['gligen'])")
    if block.pos_embed is not None or block.only_cross_attention:
        raise UserError("BasicTransformerBlock with positional embeddings or only_cross_attention is not supported by convert_to_dar")
    single = block.norm_type == "ada_norm_single"
    if single:
        mods = (block.scale_shift_table[None] + timestep.reshape(timestep.shape[0], 6, -1)).chunk(6, dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods

    # sublayer: self-attention
    def attention(x, *cond):
        if single:
            n = block.norm1(x) * (1 + scale_msa) + shift_msa
            return gate_msa * block.attn1(n, encoder_hidden_states=None, attention_mask=attention_mask, **kwargs), ()
        n, g_msa, sh_mlp, sc_mlp, g_mlp = block.norm1(x, timestep, class_labels, hidden_dtype=x.dtype)
        out = block.attn1(n, encoder_hidden_states=None, attention_mask=attention_mask, **kwargs)
        return g_msa.unsqueeze(1) * out, (sh_mlp, sc_mlp, g_mlp)

    l += 1
    out, mlp_mods = model._checkpointed(attention, model._read(router, state, l, dtype))
    router.write(state, l, out)

    # sublayer: cross-attention (PixArt: no norm in front of it, see _read_unnormalised)
    if block.attn2 is not None:
        l += 1
        if single:
            x = model._read_unnormalised(router, state, l, dtype)
            cross = lambda x: block.attn2(x, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask, **kwargs)  # noqa: E731
        else:
            x = model._read(router, state, l, dtype)
            cross = lambda x: block.attn2(block.norm2(x), encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask, **kwargs)  # noqa: E731
        router.write(state, l, model._checkpointed(cross, x))

    # sublayer: feed-forward
    def feed_forward(x):
        if single:  # PixArt uses norm2 for the MLP
            n = block.norm2(x) * (1 + scale_mlp) + shift_mlp
            return gate_mlp * model._feed_forward(block, block.ff, n)
        sh_mlp, sc_mlp, g_mlp = mlp_mods
        n = block.norm3(x) * (1 + sc_mlp[:, None]) + sh_mlp[:, None]
        return g_mlp.unsqueeze(1) * model._feed_forward(block, block.ff, n)

    l += 1
    router.write(state, l, model._checkpointed(feed_forward, model._read(router, state, l, dtype)))
    return l


class DARDiTTransformer2DModel(_DARMixin, DiTTransformer2DModel):
    """diffusers DiT with routed residuals: per block self-attention and feed-forward (2 sublayers)."""

    _stock_class = DiTTransformer2DModel

    def _dar_layout(self) -> tuple[int, int]:
        return sum(_basic_block_sublayers(b) for b in self.transformer_blocks), 0

    def _dar_time_dim(self) -> int:
        return self.inner_dim

    def forward(self, hidden_states, timestep=None, class_labels=None, cross_attention_kwargs=None, return_dict=True):
        h0 = self.pos_embed(hidden_states)
        dtype = h0.dtype
        emb = self.transformer_blocks[0].norm1.emb  # the time embedder of block 0 (class label not included)
        t_emb = self._router_time(lambda: emb.timestep_embedder(emb.time_proj(timestep).to(dtype=dtype)))
        state = self.router.start(h0, t_emb)
        l = 0
        for block in self.transformer_blocks:
            l = _run_basic_block(self, block, state, l, dtype, timestep=timestep, class_labels=class_labels,
                                 attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                                 cross_attention_kwargs=cross_attention_kwargs)
        hidden_states = self.router.read_final(state).to(dtype)

        # head: unchanged (final adaLN from block 0's conditioning, as in the stock model)
        conditioning = self.transformer_blocks[0].norm1.emb(timestep, class_labels, hidden_dtype=dtype)
        shift, scale = self.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
        hidden_states = self.norm_out(hidden_states) * (1 + scale[:, None]) + shift[:, None]
        hidden_states = self.proj_out_2(hidden_states)
        output = _unpatchify(hidden_states, self.patch_size, self.out_channels)
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)


class DARPixArtTransformer2DModel(_DARMixin, PixArtTransformer2DModel):
    """PixArt with routed residuals: per block self-attention, cross-attention, feed-forward (3 sublayers)."""

    _stock_class = PixArtTransformer2DModel

    def _dar_layout(self) -> tuple[int, int]:
        return sum(_basic_block_sublayers(b) for b in self.transformer_blocks), 0

    def _dar_time_dim(self) -> int:
        return self.inner_dim

    def forward(self, hidden_states, encoder_hidden_states=None, timestep=None, added_cond_kwargs=None,
                cross_attention_kwargs=None, attention_mask=None, encoder_attention_mask=None, return_dict=True):
        if self.use_additional_conditions and added_cond_kwargs is None:
            raise ValueError("`added_cond_kwargs` cannot be None when using additional conditions for `adaln_single`.")
        # masks -> additive biases, as the stock forward does
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = ((1 - attention_mask.to(hidden_states.dtype)) * -10000.0).unsqueeze(1)
        if encoder_attention_mask is not None and encoder_attention_mask.ndim == 2:
            encoder_attention_mask = ((1 - encoder_attention_mask.to(hidden_states.dtype)) * -10000.0).unsqueeze(1)

        batch_size = hidden_states.shape[0]
        height, width = hidden_states.shape[-2] // self.config.patch_size, hidden_states.shape[-1] // self.config.patch_size
        h0 = self.pos_embed(hidden_states)
        dtype = h0.dtype
        # adaLN-single: `timestep` becomes the 6*D modulation shared by all blocks; `embedded_timestep` [B, D]
        # is the model's own time embedding and feeds the static_t router queries.
        timestep, embedded_timestep = self.adaln_single(timestep, added_cond_kwargs, batch_size=batch_size, hidden_dtype=dtype)
        if self.caption_projection is not None:
            encoder_hidden_states = self.caption_projection(encoder_hidden_states)
            encoder_hidden_states = encoder_hidden_states.view(batch_size, -1, h0.shape[-1])

        state = self.router.start(h0, self._router_time(lambda: embedded_timestep))
        l = 0
        for block in self.transformer_blocks:
            l = _run_basic_block(self, block, state, l, dtype, timestep=timestep, class_labels=None,
                                 attention_mask=attention_mask, encoder_hidden_states=encoder_hidden_states,
                                 encoder_attention_mask=encoder_attention_mask, cross_attention_kwargs=cross_attention_kwargs)
        hidden_states = self.router.read_final(state).to(dtype)

        shift, scale = (self.scale_shift_table[None] + embedded_timestep[:, None].to(self.scale_shift_table.device)).chunk(2, dim=1)
        hidden_states = self.norm_out(hidden_states)
        hidden_states = hidden_states * (1 + scale.to(hidden_states.device)) + shift.to(hidden_states.device)
        hidden_states = self.proj_out(hidden_states).squeeze(1)
        output = _unpatchify(hidden_states, self.config.patch_size, self.out_channels, height, width)
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)


def _unpatchify(x: torch.Tensor, p: int, c: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
    if height is None:
        height = width = int(x.shape[1] ** 0.5)
    x = x.reshape(-1, height, width, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(-1, c, height * p, width * p)


# ------------------------------------------------------------------------------------------ SD3
class DARSD3Transformer2DModel(_DARMixin, SD3Transformer2DModel):
    """SD3 / SD3.5 MM-DiT. Image stream per block: joint attention, dual attention `attn2` (SD3.5 layers only;
    it reads the same input as `attn`, as in the stock block), feed-forward. Text stream per block (except the
    last, context_pre_only one): joint attention (context half) and ff_context."""

    _stock_class = SD3Transformer2DModel

    def _dar_layout(self) -> tuple[int, int]:
        image = sum(3 if b.attn2 is not None else 2 for b in self.transformer_blocks)
        text = sum(0 if b.context_pre_only else 2 for b in self.transformer_blocks)
        return image, text

    def _dar_time_dim(self) -> int:
        return self.inner_dim

    @apply_lora_scale("joint_attention_kwargs")
    def forward(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                block_controlnet_hidden_states=None, joint_attention_kwargs=None, return_dict=True, skip_layers=None):
        if block_controlnet_hidden_states is not None:
            raise _unsupported("block_controlnet_hidden_states (ControlNet)")
        if skip_layers:
            raise _unsupported("skip_layers")
        if joint_attention_kwargs is not None and "ip_adapter_image_embeds" in joint_attention_kwargs:
            raise _unsupported("IP-Adapter (ip_adapter_image_embeds)")
        jak = joint_attention_kwargs or {}
        height, width = hidden_states.shape[-2:]
        h0 = self.pos_embed(hidden_states).contiguous()
        dtype = h0.dtype
        temb = self.time_text_embed(timestep, pooled_projections)  # time + pooled text: the router's t-embedding
        c0 = self.context_embedder(encoder_hidden_states)
        t_emb = self._router_time(lambda: temb)
        state, text_state = self.router.start(h0, t_emb), self.text_router.start(c0, t_emb)
        l = lt = 0
        for block in self.transformer_blocks:
            l, lt = self._block(block, state, text_state, l, lt, temb, jak, dtype)
        hidden_states = self.norm_out(self.router.read_final(state).to(dtype), temb)
        hidden_states = self.proj_out(hidden_states)
        p = self.config.patch_size
        output = _unpatchify(hidden_states, p, self.out_channels, height // p, width // p)
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)

    def _block(self, block, state, text_state, l, lt, temb, jak, dtype):
        router, text_router = self.router, self.text_router
        pre_only = block.context_pre_only

        def attention(x, c):
            if block.use_dual_attention:
                n, g_msa, sh_mlp, sc_mlp, g_mlp, n2, g_msa2 = block.norm1(x, emb=temb)
            else:
                n, g_msa, sh_mlp, sc_mlp, g_mlp = block.norm1(x, emb=temb)
                n2 = g_msa2 = None
            if pre_only:
                nc, c_mods = block.norm1_context(c, temb), ()
            else:
                nc, *c_mods = block.norm1_context(c, emb=temb)
            out, c_out = block.attn(hidden_states=n, encoder_hidden_states=nc, **jak)
            out2 = g_msa2.unsqueeze(1) * block.attn2(hidden_states=n2, **jak) if n2 is not None else None
            c_out = None if pre_only else c_mods[0].unsqueeze(1) * c_out
            return g_msa.unsqueeze(1) * out, out2, c_out, (sh_mlp, sc_mlp, g_mlp), tuple(c_mods[1:])

        x = self._read(router, state, l + 1, dtype)
        c = self._read_text_final(text_router, text_state, dtype) if pre_only else self._read(text_router, text_state, lt + 1, dtype)
        out, out2, c_out, (sh_mlp, sc_mlp, g_mlp), c_mods = self._checkpointed(attention, x, c)
        l += 1
        router.write(state, l, out)
        if out2 is not None:  # SD3.5 dual attention: a parallel branch on the same input, its own sublayer
            l += 1
            router.write(state, l, out2)

        def feed_forward(x):
            n = block.norm2(x) * (1 + sc_mlp[:, None]) + sh_mlp[:, None]
            return g_mlp.unsqueeze(1) * self._feed_forward(block, block.ff, n)

        l += 1
        router.write(state, l, self._checkpointed(feed_forward, self._read(router, state, l, dtype)))

        if not pre_only:
            c_sh_mlp, c_sc_mlp, c_g_mlp = c_mods
            lt += 1
            text_router.write(text_state, lt, c_out)

            def context_feed_forward(c):
                n = block.norm2_context(c) * (1 + c_sc_mlp[:, None]) + c_sh_mlp[:, None]
                return c_g_mlp.unsqueeze(1) * self._feed_forward(block, block.ff_context, n)

            lt += 1
            text_router.write(text_state, lt, self._checkpointed(context_feed_forward, self._read(text_router, text_state, lt, dtype)))
        return l, lt


# ------------------------------------------------------------------------------------------ Flux
class DARFluxTransformer2DModel(_DARMixin, FluxTransformer2DModel):
    """Flux. Double blocks: image attention and ff (2 image sublayers), text attention and ff_context (2 text
    sublayers). Single blocks: one sublayer each (attention and MLP run in parallel on one input and are summed
    into one residual add); their text tokens are a text-stream sublayer."""

    _stock_class = FluxTransformer2DModel

    def _dar_layout(self) -> tuple[int, int]:
        n_double, n_single = len(self.transformer_blocks), len(self.single_transformer_blocks)
        return 2 * n_double + n_single, 2 * n_double + n_single

    def _dar_time_dim(self) -> int:
        return self.inner_dim

    @apply_lora_scale("joint_attention_kwargs")
    def forward(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None, img_ids=None,
                txt_ids=None, guidance=None, joint_attention_kwargs=None, controlnet_block_samples=None,
                controlnet_single_block_samples=None, return_dict=True, controlnet_blocks_repeat=False):
        if controlnet_block_samples is not None or controlnet_single_block_samples is not None:
            raise _unsupported("ControlNet block samples")
        if joint_attention_kwargs is not None and "ip_adapter_image_embeds" in joint_attention_kwargs:
            raise _unsupported("IP-Adapter (ip_adapter_image_embeds)")
        jak = joint_attention_kwargs or {}
        h0 = self.x_embedder(hidden_states)
        dtype = h0.dtype
        timestep = timestep.to(dtype) * 1000  # Flux takes sigma in [0, 1] and scales it itself
        if guidance is not None:
            guidance = guidance.to(dtype) * 1000
        temb = self.time_text_embed(timestep, pooled_projections) if guidance is None else self.time_text_embed(timestep, guidance, pooled_projections)
        c0 = self.context_embedder(encoder_hidden_states)
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        rope = self.pos_embed(torch.cat((txt_ids, img_ids), dim=0))

        t_emb = self._router_time(lambda: temb)
        state, text_state = self.router.start(h0, t_emb), self.text_router.start(c0, t_emb)
        l = lt = 0
        for block in self.transformer_blocks:
            l, lt = self._double_block(block, state, text_state, l, lt, temb, rope, jak, dtype)
        for block in self.single_transformer_blocks:
            l, lt = self._single_block(block, state, text_state, l, lt, temb, rope, jak, dtype)
        hidden_states = self.norm_out(self.router.read_final(state).to(dtype), temb)
        output = self.proj_out(hidden_states)
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)

    def _double_block(self, block, state, text_state, l, lt, temb, rope, jak, dtype):
        router, text_router = self.router, self.text_router

        def attention(x, c):
            n, g_msa, sh_mlp, sc_mlp, g_mlp = block.norm1(x, emb=temb)
            nc, c_g_msa, *c_mods = block.norm1_context(c, emb=temb)
            outputs = block.attn(hidden_states=n, encoder_hidden_states=nc, image_rotary_emb=rope, **jak)
            if len(outputs) != 2:
                raise _unsupported("an IP-Adapter attention processor")
            out, c_out = outputs
            return g_msa.unsqueeze(1) * out, c_g_msa.unsqueeze(1) * c_out, (sh_mlp, sc_mlp, g_mlp), tuple(c_mods)

        x = self._read(router, state, l + 1, dtype)
        c = self._read(text_router, text_state, lt + 1, dtype)
        out, c_out, (sh_mlp, sc_mlp, g_mlp), (c_sh_mlp, c_sc_mlp, c_g_mlp) = self._checkpointed(attention, x, c)
        router.write(state, l + 1, out)
        text_router.write(text_state, lt + 1, c_out)

        def feed_forward(x):
            return g_mlp.unsqueeze(1) * block.ff(block.norm2(x) * (1 + sc_mlp[:, None]) + sh_mlp[:, None])

        def context_feed_forward(c):
            return c_g_mlp.unsqueeze(1) * block.ff_context(block.norm2_context(c) * (1 + c_sc_mlp[:, None]) + c_sh_mlp[:, None])

        router.write(state, l + 2, self._checkpointed(feed_forward, self._read(router, state, l + 2, dtype)))
        text_router.write(text_state, lt + 2, self._checkpointed(context_feed_forward, self._read(text_router, text_state, lt + 2, dtype)))
        return l + 2, lt + 2

    def _single_block(self, block, state, text_state, l, lt, temb, rope, jak, dtype):
        def single(x, c):
            joint = torch.cat([c, x], dim=1)
            n, gate = block.norm(joint, emb=temb)
            mlp = block.act_mlp(block.proj_mlp(n))
            attn = block.attn(hidden_states=n, image_rotary_emb=rope, **jak)
            out = gate.unsqueeze(1) * block.proj_out(torch.cat([attn, mlp], dim=2))
            return out[:, : c.shape[1]], out[:, c.shape[1]:]

        x = self._read(self.router, state, l + 1, dtype)
        c = self._read(self.text_router, text_state, lt + 1, dtype)
        c_out, out = self._checkpointed(single, x, c)
        self.router.write(state, l + 1, out)
        self.text_router.write(text_state, lt + 1, c_out)
        return l + 1, lt + 1


# ------------------------------------------------------------------------------------------ Qwen-Image
class DARQwenImageTransformer2DModel(_DARMixin, QwenImageTransformer2DModel):
    """Qwen-Image MM-DiT. Per block: image attention and img_mlp (2 image sublayers), text attention and
    txt_mlp (2 text sublayers)."""

    _stock_class = QwenImageTransformer2DModel

    def _dar_layout(self) -> tuple[int, int]:
        return 2 * len(self.transformer_blocks), 2 * len(self.transformer_blocks)

    def _dar_time_dim(self) -> int:
        return self.inner_dim

    @apply_lora_scale("attention_kwargs")
    def forward(self, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None, timestep=None,
                img_shapes=None, guidance=None, attention_kwargs=None, controlnet_block_samples=None,
                additional_t_cond=None, return_dict=True):
        if controlnet_block_samples is not None:
            raise _unsupported("ControlNet block samples")
        from math import prod

        jak = attention_kwargs or {}
        h0 = self.img_in(hidden_states)
        dtype = h0.dtype
        timestep = timestep.to(dtype)  # Qwen-Image takes sigma in [0, 1]; its Timesteps(scale=1000) scales it
        modulate_index = None
        if self.zero_cond_t:
            timestep = torch.cat([timestep, timestep * 0], dim=0)
            modulate_index = torch.tensor(
                [[0] * prod(sample[0]) + [1] * sum(prod(s) for s in sample[1:]) for sample in img_shapes],
                device=timestep.device, dtype=torch.int,
            )
        c0 = self.txt_in(self.txt_norm(encoder_hidden_states))
        text_seq_len, _, mask = compute_text_seq_len_from_mask(c0, encoder_hidden_states_mask)
        if guidance is not None:
            guidance = guidance.to(dtype) * 1000
        temb = (self.time_text_embed(timestep, h0, additional_t_cond) if guidance is None
                else self.time_text_embed(timestep, guidance, h0, additional_t_cond))
        rope = self.pos_embed(img_shapes, max_txt_seq_len=text_seq_len, device=h0.device)
        head_temb = temb.chunk(2, dim=0)[0] if self.zero_cond_t else temb  # the real timestep's embedding

        t_emb = self._router_time(lambda: head_temb)
        state, text_state = self.router.start(h0, t_emb), self.text_router.start(c0, t_emb)
        for k, block in enumerate(self.transformer_blocks):
            self._block(block, state, text_state, 2 * k, temb, mask, rope, jak, modulate_index, dtype)
        hidden_states = self.norm_out(self.router.read_final(state).to(dtype), head_temb)
        output = self.proj_out(hidden_states)
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)

    def _block(self, block, state, text_state, l, temb, mask, rope, jak, modulate_index, dtype):
        router, text_router = self.router, self.text_router
        img_mod1, img_mod2 = block.img_mod(temb).chunk(2, dim=-1)
        txt_temb = temb.chunk(2, dim=0)[0] if block.zero_cond_t else temb
        txt_mod1, txt_mod2 = block.txt_mod(txt_temb).chunk(2, dim=-1)

        def attention(x, c):
            img_in, img_gate = block._modulate(block.img_norm1(x), img_mod1, modulate_index)
            txt_in, txt_gate = block._modulate(block.txt_norm1(c), txt_mod1)
            out, c_out = block.attn(hidden_states=img_in, encoder_hidden_states=txt_in, encoder_hidden_states_mask=mask,
                                    image_rotary_emb=rope, **jak)
            return img_gate * out, txt_gate * c_out

        out, c_out = self._checkpointed(attention, self._read(router, state, l + 1, dtype), self._read(text_router, text_state, l + 1, dtype))
        router.write(state, l + 1, out)
        text_router.write(text_state, l + 1, c_out)

        def image_mlp(x):
            n, gate = block._modulate(block.img_norm2(x), img_mod2, modulate_index)
            return gate * block.img_mlp(n)

        def text_mlp(c):
            n, gate = block._modulate(block.txt_norm2(c), txt_mod2)
            return gate * block.txt_mlp(n)

        router.write(state, l + 2, self._checkpointed(image_mlp, self._read(router, state, l + 2, dtype)))
        text_router.write(text_state, l + 2, self._checkpointed(text_mlp, self._read(text_router, text_state, l + 2, dtype)))


# ------------------------------------------------------------------------------------------ public API
_DAR_CLASSES: dict[type, type] = {
    cls._stock_class: cls
    for cls in (DARDiTTransformer2DModel, DARPixArtTransformer2DModel, DARSD3Transformer2DModel,
                DARFluxTransformer2DModel, DARQwenImageTransformer2DModel)
}
SUPPORTED_CLASSES = CLASS_NAMES  # the registry (dmd_dar.models.architectures); each has a DAR class above


def convert_to_dar(model, routing: RoutingConfig | dict | None, route_text: bool = False):
    """Replace the residual adds of a diffusers transformer by a `DepthRouter`, in place, and return it.

    The model keeps all its modules (same objects, same weights). `routing.mode="residual"` reproduces the
    stock forward bit for bit; a fresh `mode="dar"` router (zero queries) reproduces it to float tolerance when
    `routing.function_preserving` (dense, or chunked with summary="sum"). `route_text=True` also routes the
    text stream of MM-DiTs (SD3, Flux, Qwen-Image) through `model.text_router`.
    """
    routing = RoutingConfig.from_dict(routing)
    if isinstance(model, _DARMixin):
        raise UserError(f"{type(model).__name__} is already converted to DAR; convert the stock diffusers model once")
    dar_class = _DAR_CLASSES.get(type(model))
    if dar_class is None:
        raise TypeError(
            f"convert_to_dar does not support {type(model).__name__}; supported diffusers classes: {', '.join(SUPPORTED_CLASSES)}"
        )
    arch = architecture_of(model)
    if route_text and not arch.text_stream:
        raise UserError(f"route_text=True needs an MM-DiT (SD3, Flux, Qwen-Image); {type(model).__name__} has no text stream")
    param = next(model.parameters())
    model.__class__ = dar_class
    num_image, num_text = model._dar_layout()
    dim, time_dim = model.inner_dim, model._dar_time_dim()
    # Router parameters stay fp32 (routing maths run in fp32) on the model's device.
    model.router = DepthRouter(routing, num_image, dim, time_dim).to(param.device)
    if arch.text_stream:
        text_routing = routing if (route_text and num_text > 0) else RoutingConfig(mode="residual")
        model.text_router = DepthRouter(text_routing, max(num_text, 1), dim, time_dim).to(param.device)
    model.register_to_config(dar_routing=routing.to_dict(), dar_route_text=bool(route_text))
    return model


def _json_ready(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    return value


def save_dar_pretrained(model, folder) -> None:
    """Export a converted model: config.json (the stock config, `_class_name` the DAR class, the `dar_*` keys),
    the backbone as `diffusion_pytorch_model.dar.safetensors`, `routing.json` and `router.safetensors`. The folder
    is written atomically (temp folder + rename).

    Loaders: `load_dar_pretrained(folder)`, or the DAR class's own `from_pretrained` (which a stock
    `DiffusionPipeline` calls when model_index.json names it). The stock class's `from_pretrained` finds no
    `diffusion_pytorch_model.safetensors` and raises: it can never return the backbone without its router."""
    from safetensors.torch import save_file

    if not isinstance(model, _DARMixin):
        raise UserError(f"save_dar_pretrained needs a model returned by convert_to_dar, got {type(model).__name__}")
    if any("lora_" in name for name, _ in model.named_parameters()):
        raise UserError("the model still holds LoRA adapters; fold them in first with dmd_dar.models.lora.merge_lora(model)")
    backbone, router = {}, {}
    for name, tensor in model.state_dict().items():
        target = router if name.startswith(("router.", "text_router.")) else backbone
        target[name] = tensor.detach().to("cpu").contiguous()
    bad = [k for k, v in {**backbone, **router}.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # never write a non-finite model anywhere (as dmd_dar.checkpoint.write_model_files)
        raise UserError(f"refusing to write {Path(folder).name}: non-finite weights in {', '.join(bad[:3])}"
                        f"{' ...' if len(bad) > 3 else ''}; the run diverged: lower the learning rate")
    config = {k: _json_ready(v) for k, v in dict(model.config).items() if not k.startswith("_")}
    config.update(_class_name=type(model).__name__, _diffusers_version=diffusers.__version__)
    routing_meta = {
        "format_version": FORMAT_VERSION,
        "class": model._stock_class.__name__,
        "routing": model.router.config.to_dict(),
        "route_text": bool(model.config.get("dar_route_text", False)),
        "diffusers_version": diffusers.__version__,
    }
    with atomic_dir(folder) as tmp:
        for name, tensors in ((BACKBONE_WEIGHTS, backbone), (ROUTER_WEIGHTS, router)):
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            follow_umask(tmp / name)  # safetensors writes 0600: others who can read config.json must read these too
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / ROUTING_FILE).write_text(json.dumps(routing_meta, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def _quiet_config_warnings():
    """diffusers warns that the `dar_*` config keys "will be ignored" by the stock class: here they are not (the
    router is built from routing.json right after), so the warning would only mislead."""
    logger = logging.getLogger("diffusers.configuration_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_dar_pretrained(folder, torch_dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                        **load_options):
    """Load a folder written by `save_dar_pretrained` in one call: the stock class's `from_pretrained` of the
    backbone, then `convert_to_dar` with the saved routing, then the router weights (all must be present).
    `load_options` go to the stock `from_pretrained` (device_map, low_cpu_mem_usage, ...)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / ROUTING_FILE).is_file():
        raise UserError(f"{folder} has no {ROUTING_FILE}: not a DAR export folder (write one with save_dar_pretrained)")
    meta = read_json(folder / ROUTING_FILE)
    if meta.get("class") not in SUPPORTED_CLASSES:
        raise UserError(f"{folder / ROUTING_FILE} names class {meta.get('class')!r}; supported: {', '.join(SUPPORTED_CLASSES)}")
    try:
        routing = RoutingConfig.from_dict(meta.get("routing"))
    except (ConfigError, TypeError) as err:
        raise UserError(f"{folder / ROUTING_FILE}: {err}; the file was edited or written by another version of dmd_dar") from None
    if (folder / BACKBONE_WEIGHTS).is_file():
        load_options["variant"] = BACKBONE_VARIANT
    elif not (folder / LEGACY_BACKBONE_WEIGHTS).is_file():
        raise UserError(f"{folder / BACKBONE_WEIGHTS} not found: the DAR export is incomplete, export it again")
    stock = architecture_of_class(meta["class"]).diffusers_class()
    if torch_dtype is not None:
        load_options["torch_dtype"] = torch_dtype
    with _quiet_config_warnings():
        model = stock.from_pretrained(str(folder), **load_options)
    model = convert_to_dar(model, routing, route_text=meta.get("route_text", False))
    router_file = folder / ROUTER_WEIGHTS
    if not router_file.is_file():
        raise UserError(f"{router_file} not found: the DAR export is incomplete, export it again")
    own = {k for k in model.state_dict() if k.startswith(("router.", "text_router."))}
    saved = load_file(str(router_file))
    if set(saved) != own:
        raise UserError(f"router weights in {router_file} do not fit the routing in {ROUTING_FILE}: "
                        f"missing {sorted(own - set(saved))[:4]}, unexpected {sorted(set(saved) - own)[:4]}")
    model.load_state_dict(saved, strict=False)
    if device is not None:
        model.to(device)
    return model
