"""Reference (pure PyTorch) DAR aggregation: the numerics every fused kernel must match.

values:     [S, B, T, D] the S sources (raw sublayer outputs or chunk summaries), any float dtype
query:      broadcastable to [B, T, D] (static: [1, 1, D]; static_t: [B, 1, D]; dynamic: [B, T, D])
key_weight: [D] the RMSNorm weight of the keys
Returns h = sum_i alpha_i v_i with alpha = softmax_i(q . RMSNorm(v_i) / sqrt(D)), computed in fp32.
"""
from __future__ import annotations

import math

import torch


def compute_dtype(values: torch.Tensor) -> torch.dtype:
    """Routing maths runs in at least fp32 (float64 inputs stay float64, e.g. for finite differences)."""
    return torch.promote_types(values.dtype, torch.float32)


def routing_logits(values: torch.Tensor, query: torch.Tensor, key_weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """[B, T, S] logits q . RMSNorm(v_i) / sqrt(D), in at least fp32."""
    dtype = compute_dtype(values)
    v = values.to(dtype)
    inv_rms = torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)  # [S, B, T, 1]
    qg = query.to(dtype) * key_weight.to(dtype)  # fold the key weight into the query
    logits = (v * qg).sum(-1, keepdim=True) * inv_rms  # [S, B, T, 1]
    return logits.squeeze(-1).permute(1, 2, 0) / math.sqrt(values.shape[-1])


def routing_weights(values: torch.Tensor, query: torch.Tensor, key_weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """[B, T, S] softmax weights over the sources, fp32."""
    return torch.softmax(routing_logits(values, query, key_weight, eps), dim=-1)


def aggregate_reference(values: torch.Tensor, query: torch.Tensor, key_weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """[B, T, D] fp32 convex combination of the raw values."""
    alpha = routing_weights(values, query, key_weight, eps)  # [B, T, S]
    return torch.einsum("bts,sbtd->btd", alpha, values.to(alpha.dtype))


def aggregate_sources(values, query: torch.Tensor, key_weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The reference maths on a list of sources, without stacking them.

    Same result as `aggregate_reference(torch.stack(values), ...)` up to summation order, but autograd keeps
    references to the sources instead of one stacked copy per aggregator: on the CPU that copy is most of
    DAR's extra memory and time (docs/benchmarks.md). fp32 sources are used in place.
    """
    dtype = compute_dtype(values[0])
    qg = query.to(dtype) * key_weight.to(dtype)
    scale = 1.0 / math.sqrt(values[0].shape[-1])
    sources = [v.to(dtype) for v in values]
    logits = torch.stack([(v * qg).sum(-1) * torch.rsqrt(v.pow(2).mean(-1) + eps) for v in sources], dim=-1) * scale
    alpha = torch.softmax(logits, dim=-1)  # [B, T, S]
    out = alpha[..., 0:1] * sources[0]
    for i in range(1, len(sources)):
        out = out + alpha[..., i : i + 1] * sources[i]
    return out
