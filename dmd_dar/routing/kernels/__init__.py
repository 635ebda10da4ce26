"""DAR aggregation kernels: the PyTorch reference path and (on CUDA) a fused Triton path.

`values` may be a stacked tensor [S, B, T, D] or a sequence of S tensors [B, T, D].
The Triton module is imported lazily, so importing `dmd_dar.routing.kernels` never needs triton.
"""
from __future__ import annotations

import torch

from dmd_dar.errors import UserError
from dmd_dar.routing.kernels.reference import SourceCache, aggregate_reference, aggregate_sources, routing_logits, routing_weights

BACKENDS = ("auto", "torch", "triton")


def _first_source(values) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values
    for v in values:
        return v
    raise ValueError("aggregate needs at least one source")


def triton_available() -> bool:
    """True when the fused kernel module imports (triton installed); says nothing about a GPU."""
    try:
        import dmd_dar.routing.kernels.triton_aggregate  # noqa: F401
    except ImportError:
        return False
    return True


def _fused():
    try:
        from dmd_dar.routing.kernels.triton_aggregate import aggregate_triton
    except ImportError as err:
        raise UserError(f"routing backend 'triton' needs the triton package ({err}); install it or use backend='torch'") from err
    return aggregate_triton


def uses_fused(first_source: torch.Tensor, backend: str = "auto") -> bool:
    """Whether `aggregate(..., backend=backend)` takes the fused Triton path for sources like this one."""
    if backend not in BACKENDS:
        raise ValueError(f"aggregate backend={backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "triton":
        return True
    if backend == "auto" and first_source.is_cuda and triton_available():
        from dmd_dar.routing.kernels import triton_aggregate

        return not triton_aggregate.interpreting()
    return False


def aggregate(values, query, key_weight, eps: float = 1e-6, backend: str = "auto", cache: SourceCache | None = None) -> torch.Tensor:
    """Dispatch the aggregation; returns fp32 [B, T, D].

    backend: "auto" = the fused Triton kernel when the values are CUDA tensors and triton imports (compiled,
    not interpreted), else the reference; "torch" = the reference; "triton" = the fused kernel (on the CPU
    only under TRITON_INTERPRET=1, else a UserError).
    cache: a `SourceCache` shared by the aggregations of one forward, used by the reference path on a list
    of sources (each source's RMS computed once per forward); the fused path recomputes it in registers.
    """
    if backend not in BACKENDS:
        raise ValueError(f"aggregate backend={backend!r} is not one of {', '.join(BACKENDS)}")
    if not isinstance(values, torch.Tensor):
        values = list(values)
    if uses_fused(_first_source(values), backend):
        if backend == "triton":
            return _fused()(values, query, key_weight, eps)
        from dmd_dar.routing.kernels import triton_aggregate

        return triton_aggregate.aggregate_triton(values, query, key_weight, eps)
    if isinstance(values, torch.Tensor):
        return aggregate_reference(values, query, key_weight, eps)
    return aggregate_sources(values, query, key_weight, eps, cache=cache)


__all__ = ["BACKENDS", "SourceCache", "aggregate", "aggregate_reference", "aggregate_sources", "routing_logits", "routing_weights",
           "triton_available", "uses_fused"]
