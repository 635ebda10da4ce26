"""LoRA (peft) on any backbone: inject, train only LoRA + router parameters, merge before export."""
from __future__ import annotations

from torch import nn


def apply_lora(model: nn.Module, rank: int = 64, alpha: float | None = None, targets: list[str] | None = None,
               dropout: float = 0.0) -> nn.Module:
    """Inject LoRA (peft) into `model`'s attention projections and make exactly the LoRA and router parameters
    trainable. Returns the same model (in place); LoRA starts at zero, so the function is unchanged."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                        target_modules=targets or _default_targets(model), init_lora_weights=True)
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or name.startswith(("router.", "text_router.")))
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


def _default_targets(model: nn.Module) -> list[str]:
    from dmd_dar.models import DiT

    if isinstance(model, DiT):  # attention and MLP projections of every block
        return ["qkv", "proj", "fc1", "fc2"]
    from dmd_dar.teachers import lora_targets

    return lora_targets(model)
