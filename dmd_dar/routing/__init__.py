"""Depth routing: the plain residual stream and DAR (Diffusion-Adaptive Routing), one interface.

A network with L sublayers (an attention and an MLP sublayer per transformer block) is written once:

    state = router.start(h0, t_emb)
    for l in range(1, router.num_sublayers + 1):
        x = router.read(state, l)          # what sublayer l reads
        router.write(state, l, sublayer_l(x))
    h = router.read_final(state)           # what the head reads

`mode="residual"` makes `read` return the running sum and `write` do `h = h + v` (bit-exact with the stock
residual network). `mode="dar"` keeps the history of raw sublayer outputs v_0 (the embedding), v_1, ... and
reads a per-token softmax mixture over a subset of them (paper Eq. 5-7):

    h_l = sum_i alpha_{i->l} v_i,   alpha = softmax_i(q_l . RMSNorm_l(v_i) / sqrt(d))

All query parameters start at zero, so a fresh DAR router reads the *mean* of its sources: for a pre-norm
network (every consumer starts with a LayerNorm) that is the residual stream up to scale, i.e. the same
function. The history lives in the per-call `RoutingState`, never on the module, so the router is
re-entrant (CFG batch doubling, activation checkpointing, torch.compile, DDP). On the reference (CPU)
path the state also carries a `SourceCache`: each source's RMS is computed once per forward and shared by
all the aggregators that read it.

Sources are numbered 0..L: 0 is the embedding, i the raw output of sublayer i. Chunking (chunk_size=S)
groups sublayers into chunks of S; a finished chunk n is read through a summary c_n: the output of its
last sublayer (summary="last", the paper) or the sum of its outputs (summary="sum", which keeps a
zero-initialised router equal to the residual model). c_0 is the embedding. Within its own chunk a sublayer
always reads each raw output separately. So "sum" equals Block AttnRes (which reads one running sum of the
current block) only for chunk_size <= 2, where the two coincide; for larger chunks it is our own variant:
finished chunks as sums, the open chunk output by output.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dmd_dar.errors import ConfigError
from dmd_dar.routing.kernels import SourceCache, aggregate, routing_weights, uses_fused

MODES = ("residual", "dar")
QUERIES = ("static", "static_t", "dynamic")
SUMMARIES = ("last", "sum")
BACKENDS = ("auto", "torch", "triton")


@dataclass
class RoutingConfig:
    """How a network routes information across depth.

    mode: "residual" (plain h = h + v) or "dar".
    query: "static" (q_l = w_l), "static_t" (q_l = w_l + e(t)), "dynamic" (q_l = W_q^(l) v_{l-1}).
    chunk_size: 1 = dense (every sublayer reads every earlier output), S > 1 = chunked.
    summary: how a finished chunk is seen by later sublayers: "last" (paper) or "sum" (finished chunks as the sums of their
        outputs; Block AttnRes for chunk_size <= 2 only, see the module docstring).
    final_aggregator: the head reads through its own aggregator; False reuses the last sublayer's
        query and key norm (the paper's REPA variant).
    backend: aggregation implementation: "auto" (fused kernel on CUDA), "torch", "triton".
    """

    mode: str = "residual"
    query: str = "static_t"
    chunk_size: int = 1
    summary: str = "last"
    final_aggregator: bool = True
    eps: float = 1e-6
    backend: str = "auto"

    def __post_init__(self):
        for name, allowed in (("mode", MODES), ("query", QUERIES), ("summary", SUMMARIES), ("backend", BACKENDS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"routing.{name}={value!r} is not one of {', '.join(allowed)}")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ConfigError(f"routing.chunk_size={self.chunk_size!r} must be a positive integer (1 = dense)")

    @property
    def function_preserving(self) -> bool:
        """True when a zero-initialised router reproduces a pretrained pre-norm residual network."""
        return self.mode == "residual" or self.chunk_size == 1 or self.summary == "sum"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | RoutingConfig | None) -> RoutingConfig:
        if data is None:
            return cls()
        if isinstance(data, RoutingConfig):
            return data
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown routing key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**dict(data))

    def replace(self, **changes) -> RoutingConfig:
        return dataclasses.replace(self, **changes)


@dataclass
class RoutingState:
    """The per-forward history. Created by `DepthRouter.start`, discarded after the forward."""

    stream: torch.Tensor | None = None  # residual mode: the running sum
    outputs: list[torch.Tensor] = field(default_factory=list)  # DAR: v_0, v_1, ... (raw)
    summaries: list[torch.Tensor] = field(default_factory=list)  # DAR: c_0, c_1, ... (finished chunks)
    time_query: torch.Tensor | None = None  # static_t: e(t), [B, 1, D] fp32
    weights: dict[Any, torch.Tensor] | None = None  # filled only when recording
    cache: SourceCache | None = None  # DAR on the reference path: per-source RMS, computed once per forward


class DepthRouter(nn.Module):
    """Routes sublayer inputs over depth. Holds parameters only; the history is a `RoutingState`."""

    def __init__(self, config: RoutingConfig, num_sublayers: int, dim: int, time_dim: int | None = None):
        super().__init__()
        self.config = config
        self.num_sublayers = num_sublayers
        self.dim = dim
        self.time_dim = time_dim
        if config.mode == "dar":
            n = num_sublayers + 1  # one aggregator per sublayer, plus the final one
            # Plain Parameters (no nn.Linear) so a model-wide `apply(init_linear)` cannot touch them.
            self.key_norm_weight = nn.Parameter(torch.ones(n, dim))
            if config.query in ("static", "static_t"):
                self.query_static = nn.Parameter(torch.zeros(n, dim))
            if config.query == "static_t":
                if time_dim is None:
                    raise ConfigError("routing.query='static_t' needs the model's timestep embedding width (time_dim)")
                self.query_time = nn.Parameter(torch.zeros(time_dim, dim))
            if config.query == "dynamic":
                self.query_dynamic = nn.Parameter(torch.zeros(n, dim, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero queries (uniform weights) and unit key norms. Models call this after their own init."""
        if self.config.mode != "dar":
            return
        with torch.no_grad():
            self.key_norm_weight.fill_(1.0)
            for name in ("query_static", "query_time", "query_dynamic"):
                if hasattr(self, name):
                    getattr(self, name).zero_()

    # ----------------------------------------------------------------------------------- topology
    def _chunk(self, l: int) -> int:
        """0-based chunk index of sublayer l (1-based)."""
        return (l - 1) // self.config.chunk_size

    def _summary_sources(self, n: int) -> tuple[int, ...]:
        if n == 0:
            return (0,)
        s = self.config.chunk_size
        if self.config.summary == "last":
            return (n * s,)
        return tuple(range((n - 1) * s + 1, n * s + 1))

    def sources(self, l: int) -> list[tuple[int, ...]]:
        """What sublayer l (1..L) reads, as tuples of source indices (a tuple = their sum)."""
        if not 1 <= l <= self.num_sublayers:
            raise IndexError(f"sublayer {l} outside 1..{self.num_sublayers}")
        if self.config.mode == "residual":
            return [tuple(range(l))]
        n = self._chunk(l)
        first_in_chunk = n * self.config.chunk_size + 1
        return [self._summary_sources(j) for j in range(n + 1)] + [(i,) for i in range(first_in_chunk, l)]

    def sources_final(self) -> list[tuple[int, ...]]:
        """What the head reads: all chunk summaries plus the raw outputs of the last chunk."""
        L = self.num_sublayers
        if self.config.mode == "residual":
            return [tuple(range(L + 1))]
        n = self._chunk(L)
        first_in_chunk = n * self.config.chunk_size + 1
        return [self._summary_sources(j) for j in range(n + 1)] + [(i,) for i in range(first_in_chunk, L + 1)]

    # ----------------------------------------------------------------------------------- forward
    def start(self, h0: torch.Tensor, t_emb: torch.Tensor | None = None, record_weights: bool = False) -> RoutingState:
        """Begin a forward pass from the embedding h0 [B, T, D] (and the timestep embedding [B, time_dim])."""
        if self.config.mode == "residual":
            return RoutingState(stream=h0)
        state = RoutingState(outputs=[h0], summaries=[h0], weights={} if record_weights else None)
        if not uses_fused(h0, self.config.backend):
            state.cache = SourceCache(self.config.eps)
        if self.config.query == "static_t":
            if t_emb is None:
                raise ValueError("static_t routing needs the timestep embedding: router.start(h0, t_emb)")
            with torch.autocast(device_type=h0.device.type, enabled=False):
                dtype = torch.promote_types(t_emb.dtype, torch.float32)
                state.time_query = (t_emb.to(dtype) @ self.query_time.to(dtype)).unsqueeze(1)
        return state

    def read(self, state: RoutingState, l: int) -> torch.Tensor:
        """Input of sublayer l (1-based)."""
        if self.config.mode == "residual":
            return state.stream
        if len(state.outputs) != l:
            raise RuntimeError(f"router.read({l}) after {len(state.outputs) - 1} writes: sublayers must run in order")
        n = self._chunk(l)
        first_in_chunk = n * self.config.chunk_size + 1
        values = state.summaries[: n + 1] + state.outputs[first_in_chunk:l]
        return self._aggregate(state, values, index=l - 1, previous=state.outputs[l - 1], key=l)

    def write(self, state: RoutingState, l: int, value: torch.Tensor) -> None:
        """Record the raw output of sublayer l."""
        if self.config.mode == "residual":
            state.stream = state.stream + value
            return
        state.outputs.append(value)
        s = self.config.chunk_size
        if l % s == 0:  # chunk finished: add its summary
            state.summaries.append(value if (s == 1 or self.config.summary == "last") else sum(state.outputs[l - s + 1 : l + 1]))

    def read_final(self, state: RoutingState) -> torch.Tensor:
        """What the head reads after all L sublayers have written."""
        if self.config.mode == "residual":
            return state.stream
        L = self.num_sublayers
        if len(state.outputs) != L + 1:
            raise RuntimeError(f"router.read_final() after {len(state.outputs) - 1} of {L} writes")
        n = self._chunk(L)
        first_in_chunk = n * self.config.chunk_size + 1
        values = state.summaries[: n + 1] + state.outputs[first_in_chunk:]
        index = L if self.config.final_aggregator else L - 1
        return self._aggregate(state, values, index=index, previous=state.outputs[L], key="final")

    def _query(self, state: RoutingState, index: int, previous: torch.Tensor) -> torch.Tensor:
        q = self.config.query
        dtype = torch.promote_types(previous.dtype, torch.float32)  # at least fp32
        if q == "dynamic":
            return previous.to(dtype) @ self.query_dynamic[index].to(dtype).t()  # [B, T, D]
        static = self.query_static[index].to(dtype).view(1, 1, -1)
        return static + state.time_query if q == "static_t" else static

    def _aggregate(self, state: RoutingState, values: list[torch.Tensor], index: int, previous: torch.Tensor, key) -> torch.Tensor:
        # Routing maths in fp32 even under bf16 autocast (logits, softmax, weighted sum).
        with torch.autocast(device_type=previous.device.type, enabled=False):
            query = self._query(state, index, previous)
            key_weight = self.key_norm_weight[index]
            if state.weights is not None:
                state.weights[key] = routing_weights(torch.stack(values), query, key_weight, self.config.eps).detach()
            return aggregate(values, query, key_weight, self.config.eps, backend=self.config.backend, cache=state.cache)

    def extra_repr(self) -> str:
        c = self.config
        return f"mode={c.mode}, query={c.query}, chunk_size={c.chunk_size}, summary={c.summary}, sublayers={self.num_sublayers}, dim={self.dim}"
