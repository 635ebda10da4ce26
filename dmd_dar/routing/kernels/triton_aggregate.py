"""Fused DAR aggregation in Triton: one read of the sources forward, one read + one write backward.

Maths per row r = (b, t), sources v_i (rows of D elements, any float dtype, loaded as fp32):

    qg     = q[b, t] * g                          (the key's RMSNorm weight folded into the query)
    rinv_i = rsqrt(mean(v_i^2) + eps)
    s_i    = (qg . v_i) * rinv_i / sqrt(D)
    out    = sum_i softmax(s)_i v_i               (fp32)

Forward: an online softmax (running max m, running denominator l, running fp32 accumulator) over the
sources, so each source row is read from HBM once. It saves lse = m + log(l) per row.

Backward (one pass over the sources per row; RMSNorm recomputed on the fly):

    alpha_i = exp(s_i - lse)
    delta   = dout . out                          (= sum_j alpha_j dalpha_j; `out` is saved, see below)
    ds_i    = alpha_i * (dout . v_i - delta)
    c_i     = ds_i * rinv_i / sqrt(D)
    dv_i    = alpha_i * dout + c_i * (qg - (qg . v_i) * rinv_i^2 / D * v_i)
    dqg     = sum_i c_i v_i                       -> dq = dqg * g (reduced over broadcast dims),
                                                     dg = sum over rows of dqg * q

Sources are passed as a device table of base addresses (int64), so a Python list of S tensors [B, T, D]
(what the router holds) is read in place: no [S, B, T, D] stack copy. Every source must share dtype,
device and shape, and be contiguous (made so if not).

Run on the CPU with TRITON_INTERPRET=1 set *before* this module is first imported (Triton decides at
decoration time whether kernels are compiled or interpreted).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from dmd_dar.errors import UserError

# Rows handled by one backward program (their dq / dg partial sums are reduced in registers first): at most
# this many, and fewer when that would leave under _BWD_MIN_PROGRAMS programs to fill the GPU.
_BWD_MAX_ROWS_PER_PROGRAM = 16
_BWD_MIN_PROGRAMS = 2048


@triton.jit
def _dar_fwd_kernel(
    table_ptr,  # int64 [S]: base address of each source [B, T, D]
    v0_ptr,  # the first source (gives the element type for the casts)
    q_ptr,  # fp32 query [Bq, Tq, D] (contiguous; broadcast through strides 0)
    g_ptr,  # fp32 key weight [D]
    out_ptr,  # fp32 [B, T, D]
    lse_ptr,  # fp32 [B * T]
    S,
    T,
    D,
    q_stride_b,
    q_stride_t,
    eps,
    scale,  # 1 / sqrt(D)
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    q = tl.load(q_ptr + b * q_stride_b + t * q_stride_t + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    qg = q * g
    row_offset = row * D

    # Source 0 starts the online softmax (keeps every loop-carried value a tensor of fixed type).
    base = tl.load(table_ptr).to(v0_ptr.dtype)
    v = tl.load(base + row_offset + cols, mask=mask, other=0.0).to(tl.float32)
    rinv = tl.rsqrt(tl.sum(v * v, axis=0) / D + eps)
    m = tl.sum(qg * v, axis=0) * rinv * scale
    denom = m * 0.0 + 1.0
    acc = v
    for i in range(1, S):
        base = tl.load(table_ptr + i).to(v0_ptr.dtype)
        v = tl.load(base + row_offset + cols, mask=mask, other=0.0).to(tl.float32)
        rinv = tl.rsqrt(tl.sum(v * v, axis=0) / D + eps)
        s = tl.sum(qg * v, axis=0) * rinv * scale
        m_new = tl.maximum(m, s)
        keep = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        acc = acc * keep + p * v
        denom = denom * keep + p
        m = m_new
    tl.store(out_ptr + row_offset + cols, acc / denom, mask=mask)
    tl.store(lse_ptr + row, m + tl.log(denom))


@triton.jit
def _dar_bwd_kernel(
    table_ptr,  # int64 [S]
    v0_ptr,
    q_ptr,
    g_ptr,
    out_ptr,  # fp32 [B, T, D] (saved forward output)
    lse_ptr,  # fp32 [B * T]
    dout_ptr,  # fp32 [B, T, D], contiguous
    dv_ptr,  # [S, B, T, D] in the sources' dtype
    dq_rows_ptr,  # fp32 [B, T, D] (used when PER_ROW_DQ)
    dqg_part_ptr,  # fp32 [B, NJ, D] partial sums of dqg (used when not PER_ROW_DQ)
    dg_part_ptr,  # fp32 [B, NJ, D] partial sums of dqg * q
    S,
    T,
    D,
    N_ROWS,  # B * T
    NJ,
    q_stride_b,
    q_stride_t,
    eps,
    scale,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PER_ROW_DQ: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    g = tl.load(g_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dqg_part = tl.zeros([BLOCK_D], dtype=tl.float32)
    dg_part = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k in range(ROWS):
        t = j * ROWS + k
        if t < T:
            row = b * T + t
            row_offset = row * D
            q = tl.load(q_ptr + b * q_stride_b + t * q_stride_t + cols, mask=mask, other=0.0).to(tl.float32)
            qg = q * g
            dout = tl.load(dout_ptr + row_offset + cols, mask=mask, other=0.0).to(tl.float32)
            out = tl.load(out_ptr + row_offset + cols, mask=mask, other=0.0).to(tl.float32)
            lse = tl.load(lse_ptr + row)
            delta = tl.sum(dout * out, axis=0)
            dqg = tl.zeros([BLOCK_D], dtype=tl.float32)
            for i in range(0, S):
                base = tl.load(table_ptr + i).to(v0_ptr.dtype)
                v = tl.load(base + row_offset + cols, mask=mask, other=0.0).to(tl.float32)
                rinv = tl.rsqrt(tl.sum(v * v, axis=0) / D + eps)
                dot = tl.sum(qg * v, axis=0)
                alpha = tl.exp(dot * rinv * scale - lse)
                ds = alpha * (tl.sum(dout * v, axis=0) - delta)
                c = ds * rinv * scale
                dv = alpha * dout + c * (qg - (dot * rinv * rinv / D) * v)
                tl.store(dv_ptr + (row + i * N_ROWS) * D + cols, dv.to(dv_ptr.dtype.element_ty), mask=mask)
                dqg += c * v
            if PER_ROW_DQ:
                tl.store(dq_rows_ptr + row_offset + cols, dqg * g, mask=mask)
            else:
                dqg_part += dqg
            dg_part += dqg * q
    part_offset = (b * NJ + j) * D
    if not PER_ROW_DQ:
        tl.store(dqg_part_ptr + part_offset + cols, dqg_part, mask=mask)
    tl.store(dg_part_ptr + part_offset + cols, dg_part, mask=mask)


# ------------------------------------------------------------------------------------------ helpers
def interpreting() -> bool:
    """True when this module's kernels were built by Triton's CPU interpreter."""
    return type(_dar_fwd_kernel).__name__ == "InterpretedFunction"


def _check_device(device: torch.device) -> None:
    if device.type == "cuda":
        return  # compiled kernels (or, under TRITON_INTERPRET=1, the interpreter on host copies)
    if device.type == "cpu":
        if not interpreting():
            state = "set" if os.environ.get("TRITON_INTERPRET") == "1" else "not set"
            raise UserError(f"the Triton DAR kernel needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                            f"dmd_dar.routing.kernels is first imported to run on the CPU (it is {state} now); "
                            f"use backend='torch' or 'auto' on the CPU")
        return
    raise UserError(f"the Triton DAR kernel does not run on device {device}; use backend='torch'")


def _as_sources(values) -> list[torch.Tensor]:
    """values ([S, B, T, D] or S tensors [B, T, D]) -> a list of S contiguous [B, T, D] tensors."""
    if isinstance(values, torch.Tensor):
        if values.dim() != 4:
            raise ValueError(f"stacked values must be [S, B, T, D], got shape {tuple(values.shape)}")
        return list(values.contiguous().unbind(0))
    sources = list(values)
    if not sources:
        raise ValueError("aggregate needs at least one source")
    first = sources[0]
    if first.dim() != 3:
        raise ValueError(f"each source must be [B, T, D], got shape {tuple(first.shape)}")
    for i, v in enumerate(sources):
        if v.shape != first.shape or v.dtype != first.dtype or v.device != first.device:
            raise ValueError(f"source {i} is {tuple(v.shape)} {v.dtype} on {v.device}; source 0 is "
                             f"{tuple(first.shape)} {first.dtype} on {first.device}: all must match")
    return [v.contiguous() for v in sources]


def _query_3d(query: torch.Tensor, B: int, T: int, D: int) -> torch.Tensor:
    q = query
    while q.dim() < 3:
        q = q.unsqueeze(0)
    if q.dim() != 3 or q.shape[0] not in (1, B) or q.shape[1] not in (1, T) or q.shape[2] != D:
        raise ValueError(f"query of shape {tuple(query.shape)} does not broadcast to [B, T, D] = [{B}, {T}, {D}]")
    return q


def _block_d(D: int) -> int:
    return triton.next_power_of_2(D)


def _num_warps(block_d: int) -> int:
    return 16 if block_d >= 4096 else 8 if block_d >= 2048 else 4 if block_d >= 512 else 2


def _address_table(sources: list[torch.Tensor]) -> torch.Tensor:
    """int64 [S] base addresses on the sources' device (pinned host copy, then an async transfer)."""
    table = torch.tensor([v.data_ptr() for v in sources], dtype=torch.int64)
    device = sources[0].device
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table


class _DarAggregate(torch.autograd.Function):
    """inputs: (query, key_weight, eps, *sources); output fp32 [B, T, D]."""

    @staticmethod
    def forward(ctx, query, key_weight, eps, *sources):
        B, T, D = sources[0].shape
        device = sources[0].device
        q = _query_3d(query, B, T, D).detach().float().contiguous()
        g = key_weight.detach().float().contiguous()
        table = _address_table(sources)
        out = torch.empty(B, T, D, device=device, dtype=torch.float32)
        lse = torch.empty(B * T, device=device, dtype=torch.float32)
        block_d = _block_d(D)
        q_sb = q.stride(0) if q.shape[0] > 1 else 0
        q_st = q.stride(1) if q.shape[1] > 1 else 0
        if B * T > 0:
            _dar_fwd_kernel[(B * T,)](table, sources[0], q, g, out, lse, len(sources), T, D, q_sb, q_st,
                                      float(eps), 1.0 / math.sqrt(D), BLOCK_D=block_d, num_warps=_num_warps(block_d))
        ctx.save_for_backward(q, g, out, lse, table, *sources)
        ctx.query_shape = query.shape
        ctx.query_dtype = query.dtype
        ctx.key_weight_dtype = key_weight.dtype
        ctx.eps = float(eps)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, g, out, lse, table, *sources = ctx.saved_tensors
        B, T, D = sources[0].shape
        S = len(sources)
        device = sources[0].device
        dout = dout.float().contiguous()
        block_d = _block_d(D)
        per_row_dq = q.shape[1] > 1
        rows = max(1, min(_BWD_MAX_ROWS_PER_PROGRAM, T, (B * T) // _BWD_MIN_PROGRAMS))
        nj = triton.cdiv(T, rows)
        dv = torch.empty((S, B, T, D), device=device, dtype=sources[0].dtype)
        dq_rows = torch.empty((B, T, D) if per_row_dq else (1,), device=device, dtype=torch.float32)
        dqg_part = torch.empty((1,) if per_row_dq else (B, nj, D), device=device, dtype=torch.float32)
        dg_part = torch.empty((B, nj, D), device=device, dtype=torch.float32)
        q_sb = q.stride(0) if q.shape[0] > 1 else 0
        q_st = q.stride(1) if q.shape[1] > 1 else 0
        if B * T > 0:
            _dar_bwd_kernel[(B, nj)](table, sources[0], q, g, out, lse, dout, dv, dq_rows, dqg_part, dg_part,
                                     S, T, D, B * T, nj, q_sb, q_st, ctx.eps, 1.0 / math.sqrt(D),
                                     ROWS=rows, BLOCK_D=block_d, PER_ROW_DQ=per_row_dq, num_warps=_num_warps(block_d))
        else:
            dg_part.zero_()
            dq_rows.zero_()
            dqg_part.zero_()
        dg = dg_part.sum((0, 1))
        if per_row_dq:
            dq = dq_rows if q.shape[0] == B else dq_rows.sum(0, keepdim=True)
        else:
            dqg = dqg_part.sum(1, keepdim=True)  # [B, 1, D]
            dq = (dqg if q.shape[0] == B else dqg.sum(0, keepdim=True)) * g
        dq = dq.reshape(ctx.query_shape).to(ctx.query_dtype)
        return (dq, dg.to(ctx.key_weight_dtype), None, *dv.unbind(0))


def aggregate_triton(values, query: torch.Tensor, key_weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Fused DAR aggregation. values: [S, B, T, D] tensor or a list of S [B, T, D] tensors; fp32 [B, T, D] out."""
    sources = _as_sources(values)
    _check_device(sources[0].device)
    if query.device != sources[0].device or key_weight.device != sources[0].device:
        raise ValueError(f"query ({query.device}) and key_weight ({key_weight.device}) must be on the sources' device ({sources[0].device})")
    if key_weight.shape != (sources[0].shape[-1],):
        raise ValueError(f"key_weight must be [D] = [{sources[0].shape[-1]}], got {tuple(key_weight.shape)}")
    return _DarAggregate.apply(query, key_weight, eps, *sources)
