"""LoRA (peft) on any of our backbones: which linears to wrap, inject, train only LoRA + router, merge before export."""
from __future__ import annotations

from torch import nn

from dmd_dar.errors import UserError
from dmd_dar.models.dit import DiT

# Parameter names of the DAR routers (the image stream and, when routed, the text stream of an MM-DiT).
ROUTER_PREFIXES = ("router.", "text_router.")

# Attention projections of diffusers attention modules: q, k, v, out, and the added text projections of MM-DiTs.
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
DIT_TARGETS = ["qkv", "proj", "fc1", "fc2"]  # our DiT: attention and MLP projections of every block


def lora_targets(model: nn.Module, include_mlp: bool = False) -> list[str]:
    """Full module names peft's LoraConfig(target_modules=...) should wrap in a diffusers transformer: every
    attention projection (ATTENTION_PROJECTIONS), optionally the feed-forward linears. Router parameters are
    never targets (they are trained fully)."""
    from diffusers.models.attention_processor import Attention

    attention_types: tuple[type, ...] = (Attention,)
    try:
        from diffusers.models.transformers.transformer_flux import FluxAttention

        attention_types += (FluxAttention,)
    except ImportError:  # pragma: no cover
        pass
    names = []
    for parent_name, parent in model.named_modules():
        if isinstance(parent, attention_types):
            for suffix in ATTENTION_PROJECTIONS:
                module = parent.get_submodule(suffix) if _has_submodule(parent, suffix) else None
                if isinstance(module, nn.Linear):
                    names.append(f"{parent_name}.{suffix}")
    if include_mlp:
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and (".ff." in f".{name}." or ".ff_context." in name or "_mlp." in name
                                                  or name.endswith((".proj_mlp", ".proj_out")) and "single_transformer_blocks" in name):
                names.append(name)
    if not names:
        raise UserError(f"found no attention projections in {type(model).__name__}; pass target_modules explicitly")
    return sorted(set(names))


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def apply_lora(model: nn.Module, rank: int = 64, alpha: float | None = None, targets: list[str] | None = None,
               dropout: float = 0.0) -> nn.Module:
    """Inject LoRA (peft) into `model`'s projections (`targets`, default: DIT_TARGETS for our DiT, else
    `lora_targets`) and make exactly the LoRA and router parameters trainable. Returns the same model (in
    place); LoRA starts at zero, so the function is unchanged."""
    from peft import LoraConfig, inject_adapter_in_model

    if targets is None:
        targets = DIT_TARGETS if isinstance(model, DiT) else lora_targets(model)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                        target_modules=targets, init_lora_weights=True)
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or name.startswith(ROUTER_PREFIXES))
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold injected LoRA weights into the base linears and remove the wrappers (before export)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    return model
