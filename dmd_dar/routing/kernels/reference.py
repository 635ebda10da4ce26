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


class SourceCache:
    """Per-source quantities of one forward, computed once per source instead of once per consumer.

    A dense L-sublayer DAR forward reads each source in up to L aggregators; the RMS of a source (and, for
    sources stored below fp32, its fp32 copy) does not depend on the reader, so it is computed the first time
    a source is read and reused by every later reader. It is an ordinary autograd value: the gradients of all
    readers meet in it and flow once through its RMS graph.

    The router creates one per forward (in its `RoutingState`) and drops it with the state, so no state is kept
    on modules between calls. Entries are keyed by the identity of the source tensor; the cache holds a
    reference to each source, so an identity cannot be reused by another tensor while the cache lives.
    Computed lazily at the first read: keep the reads of one forward outside activation-checkpointed regions
    (the sublayers may be checkpointed, as in our DiT and diffusers models; a checkpointed region that reads
    a source first in the original forward would find it cached during recomputation).
    """

    def __init__(self, eps: float = 1e-6):
        self.eps = eps
        self._entries: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.rms_computations = 0  # how many RMS were computed (tests: once per source)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(v in the compute dtype, rsqrt(mean(v^2) + eps) [B, T])."""
        entry = self._entries.get(id(v))
        if entry is None or entry[0] is not v:
            v32 = v.to(compute_dtype(v))
            self.rms_computations += 1
            entry = (v, v32, torch.rsqrt(v32.pow(2).mean(-1) + self.eps))
            self._entries[id(v)] = entry
        return entry[1], entry[2]


def _dots(v: torch.Tensor, qg: torch.Tensor) -> torch.Tensor:
    """[B, T] rows of v [B, T, D] dotted with qg: a matrix-vector product when the query is the same for all
    tokens (static [1, 1, D], static_t [B, 1, D]), else an elementwise product and a sum (dynamic)."""
    if _token_shared(qg, v):
        if qg.shape[0] == 1:
            return v @ qg.reshape(-1)  # [B, T, D] @ [D]
        return (v @ qg.transpose(1, 2)).squeeze(-1)  # bmm [B, T, D] @ [B, D, 1]
    return (v * qg).sum(-1)


def _token_shared(qg: torch.Tensor, v: torch.Tensor) -> bool:
    return qg.dim() == 3 and v.dim() == 3 and qg.shape[1] == 1 and qg.shape[0] in (1, v.shape[0])


class _MixSources(torch.autograd.Function):
    """alpha = softmax_i(dots_i * rinv_i), dots_i = v_i . qg;  out = sum_i alpha_i v_i, with a hand-written backward.

    inputs: qg (the query with the key weight and 1/sqrt(D) folded in, broadcastable to [B, T, D]), the number
    S of sources, the S sources [B, T, D] and their S inverse RMS [B, T] (from the `SourceCache`, so each
    source's RMS graph is shared by all readers; this function returns its gradient d rinv_i = ds_i dots_i).
    Backward (the fused kernel's formulas, docs/kernels.md):
        dalpha_i = dout . v_i ;   ds = alpha (dalpha - sum_j alpha_j dalpha_j) ;   ddots_i = ds_i rinv_i
        dv_i = alpha_i dout + ddots_i qg ;   dqg = sum_i ddots_i v_i (summed to qg's shape) ;   drinv_i = ds_i dots_i
    Compared with autograd through the elementwise ops, it allocates no [B, T, D] temporaries in the forward
    (the sum accumulates in place) and saves only the [B, T, S] weights and logits besides the sources.
    """

    @staticmethod
    def forward(ctx, qg, n, *tensors):
        sources, rinvs = tensors[:n], tensors[n:]
        dots = torch.stack([_dots(v, qg) for v in sources])  # [S, B, T]
        alpha = torch.softmax(dots * torch.stack(rinvs), dim=0)  # [S, B, T], contiguous per source
        out = sources[0] * alpha[0].unsqueeze(-1)
        for i in range(1, n):
            out.addcmul_(alpha[i].unsqueeze(-1), sources[i])
        ctx.n = n
        ctx.save_for_backward(qg, dots, alpha, *tensors)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        qg, dots, alpha, *tensors = ctx.saved_tensors
        n = ctx.n
        sources, rinvs = tensors[:n], tensors[n:]
        dout = dout.to(alpha.dtype)
        dalpha = torch.stack([(dout * v).sum(-1) for v in sources])  # [S, B, T]
        ds = alpha * (dalpha - (alpha * dalpha).sum(0, keepdim=True))
        ddots = ds * torch.stack(rinvs)
        need_q, need_v, need_r = ctx.needs_input_grad[0], ctx.needs_input_grad[2 : 2 + n], ctx.needs_input_grad[2 + n :]
        dvs = []
        for i, v in enumerate(sources):
            if need_v[i]:
                dv = dout * alpha[i].unsqueeze(-1)
                dvs.append(dv.addcmul_(ddots[i].unsqueeze(-1), qg))
            else:
                dvs.append(None)
        dqg = None
        if need_q:
            if _token_shared(qg, sources[0]):  # [B, 1, D] = sum over tokens and sources of ddots v: a bmm per source
                acc = sum(torch.bmm(ddots[i].unsqueeze(1), v) for i, v in enumerate(sources))
            else:
                acc = sum(ddots[i].unsqueeze(-1) * v for i, v in enumerate(sources))
            dqg = acc.sum_to_size(qg.shape)
        drinvs = [ds[i] * dots[i] if need_r[i] else None for i in range(n)]
        return (dqg, None, *dvs, *drinvs)


def aggregate_sources(values, query: torch.Tensor, key_weight: torch.Tensor, eps: float = 1e-6,
                      cache: SourceCache | None = None) -> torch.Tensor:
    """The reference maths on a list of sources, without stacking them.

    Same result as `aggregate_reference(torch.stack(values), ...)` up to summation order, but autograd keeps
    references to the sources instead of one stacked copy per aggregator: on the CPU that copy is most of
    DAR's extra memory and time (docs/benchmarks.md). fp32 sources are used in place.

    cache: a `SourceCache` shared by the aggregations of one forward (the router passes its state's); each
    source's RMS (and fp32 copy) is then computed once per forward, not once per reader. Same results.
    The logits are matrix-vector products for static / static_t queries; the mixture has a hand-written
    backward (`_MixSources`).
    """
    values = list(values)
    if not values:
        raise ValueError("aggregate needs at least one source")
    cache = SourceCache(eps) if cache is None else cache
    if cache.eps != eps:
        raise ValueError(f"SourceCache built with eps={cache.eps} used with eps={eps}")
    first, _ = cache.get(values[0])
    dtype = first.dtype
    qg = query.to(dtype) * (key_weight.to(dtype) / math.sqrt(first.shape[-1]))  # key weight and 1/sqrt(D) folded in
    sources, inv_rms = [], []
    for v in values:
        v32, rinv = cache.get(v)
        sources.append(v32.to(dtype))  # every source in the first one's compute dtype (a no-op unless they differ)
        inv_rms.append(rinv.to(dtype))
    return _MixSources.apply(qg, len(sources), *sources, *inv_rms)
