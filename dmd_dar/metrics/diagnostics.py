"""Cross-layer information-flow diagnostics: the paper's §3 measurements as a tool.

For a model on the depth router (our `DiT`, or any model that follows the router protocol through a small
`DiagnosisAdapter`), on a grid of flow times t and N fixed (image, noise) pairs, per block k:

- RMS(z_k)          forward magnitude of the state the block passes on;
- RMS(dL/dz_k)      backward magnitude, L the model's own training loss (velocity MSE for our DiT);
- cos(z_k, z_k+1)   per-token cosine between consecutive block states (redundancy);
- routing maps      DAR: softmax weights alpha_{i->l}(t) per chosen sublayer (sources x t);
- importance maps   residual: gradient of the loss w.r.t. a gate fixed at 1 on each historical source;
- linear probe      ridge regression of t from the token-pooled state at each depth (test R^2), with the
                    raw x_t as the baseline.

z_k is what the next block's first sublayer reads (`router.read(state, s*k + 1)`, s = sublayers per block);
for the last block it is what the head reads (`router.read_final(state)`). z_0 is the embedding.

Nothing on the model is modified: the router's bound methods are shadowed on the instance for the duration
of one forward (`instrument_router`) and restored in `finally`; gradients are taken with
`torch.autograd.grad`, so parameter `.grad` fields are never touched; module train/eval flags are restored
one by one. In residual mode the instrumented router rebuilds each read as an explicit gated sum
sum_i g_{l,i} v_i in the stock summation order with g = 1, which is bit-identical to the running sum.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmd_dar.errors import UserError

DEFAULT_T_POINTS = 11
FORMAT = "dmd_dar.metrics.diagnostics/1"
MAX_BASELINE_FEATURES = 4096  # the raw-x_t probe average-pools larger inputs down to this many features
RIDGE_ALPHAS = tuple(10.0 ** e for e in range(-6, 4))  # penalty per training row, standardised features


# ------------------------------------------------------------------------------------------ adapters
@runtime_checkable
class DiagnosisAdapter(Protocol):
    """What the diagnostics need from a model. `DiTAdapter` implements it for our DiT; a converted
    diffusers transformer (`convert_to_dar`, which attaches `.router`) needs only a few lines more.

    module:              the nn.Module whose weights and train/eval flags must be left as they were;
    router:              the object the forward routes through (start/read/write/read_final, sources);
    sublayers_per_block: sublayers per block (2 for attention + MLP);
    predict(x_t, t, cond) -> the prediction the training loss compares (t: [B] flow time, t = 1 noise);
    target(x0, eps)      -> what the training loss regresses the prediction onto;
    condition(labels, batch_size, device) -> the `cond` argument of `predict`;
    source_name(i)       -> a short label for routing source i (0 = embedding, i = sublayer i's output).

    `predict` must call `router.start` once and then the sublayers in order, and must not re-run router
    calls in the backward pass (switch off activation checkpointing that wraps them, e.g. diffusers'
    `gradient_checkpointing`, which is active whenever grad is enabled, also in eval mode).
    """

    module: nn.Module
    router: Any
    sublayers_per_block: int

    def predict(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor: ...

    def target(self, x0: Tensor, eps: Tensor) -> Tensor: ...

    def condition(self, labels: Tensor | None, batch_size: int, device: torch.device) -> Any: ...

    def source_name(self, index: int) -> str: ...


class DiTAdapter:
    """Our DiT: predicts the velocity v = eps - x0, trained with MSE(v_pred, eps - x0)."""

    sublayers_per_block = 2

    def __init__(self, model: nn.Module):
        self.module = model
        self.router = model.router

    def predict(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return self.module(x_t, t, cond)

    def target(self, x0: Tensor, eps: Tensor) -> Tensor:
        return eps - x0

    def condition(self, labels: Tensor | None, batch_size: int, device: torch.device) -> Tensor:
        null = self.module.null_class
        if labels is None:
            return torch.full((batch_size,), null, dtype=torch.long, device=device)
        labels = labels.to(device=device, dtype=torch.long)
        # Labels the model does not know (another dataset, or an unconditional model) read as the null class.
        return torch.where((labels >= 0) & (labels < null), labels, torch.full_like(labels, null))

    def source_name(self, index: int) -> str:
        if index == 0:
            return "emb"
        return f"b{(index + 1) // 2}.{'attn' if index % 2 else 'mlp'}"


def adapter_for(model: Any) -> DiagnosisAdapter:
    """The adapter for a model: our DiT, or an object that already implements `DiagnosisAdapter`."""
    from dmd_dar.models.dit import DiT

    if isinstance(model, DiT):
        return DiTAdapter(model)
    if isinstance(model, DiagnosisAdapter):
        return model
    raise UserError(
        f"cannot diagnose a {type(model).__name__}: pass a dmd_dar DiT or wrap the model in a "
        "dmd_dar.metrics.diagnostics.DiagnosisAdapter (module, router, sublayers_per_block, predict, target, condition, source_name)"
    )


def source_label(adapter: DiagnosisAdapter, source: tuple[int, ...]) -> str:
    """Label of a router source tuple: one raw output, or a chunk summary summing several."""
    if len(source) == 1:
        return adapter.source_name(source[0])
    return f"sum({adapter.source_name(source[0])}..{adapter.source_name(source[-1])})"


# ------------------------------------------------------------------------------------------ instrumentation
@dataclass
class RouterTrace:
    """What one forward through an instrumented router saw."""

    reads: dict[Any, Tensor] = field(default_factory=dict)  # l -> input of sublayer l; "final" -> head input
    sources: list[Tensor] = field(default_factory=list)  # raw outputs v_1, ... (residual: v_0 first)
    gates: Tensor | None = None  # residual: [B, L+1 readers (sublayers 1..L, final), L+1 sources]
    weights: dict[Any, Tensor] | None = None  # DAR: routing weights [B, T, S] per reader


def _gated_sum(sources: Sequence[Tensor], gates: Tensor) -> Tensor:
    """sum_i gates[:, i] * sources[i], added left to right like the stock residual stream, so that with
    unit gates the result is bit-identical to ((v_0 + v_1) + v_2) + ..."""
    total = None
    for i, value in enumerate(sources):
        term = gates[:, i].to(value.dtype).view(-1, *([1] * (value.dim() - 1))) * value
        total = term if total is None else total + term
    return total


@contextlib.contextmanager
def instrument_router(router: Any, gate_values: Tensor | None = None) -> Iterator[list[RouterTrace]]:
    """Record every read of `router` (one `RouterTrace` per `router.start`) for the duration of the block.

    Residual routers: reads are rebuilt as gated sums of the sources with gates g (ones, or `gate_values`
    [B, L+1, L+1]; row l-1 serves sublayer l, row L the head; column i is source i), a leaf tensor that
    requires grad, so d loss / d g is the counterfactual importance of source i for reader l.
    DAR routers: the stock methods run unchanged, with routing weights recorded.
    The instance attributes are removed again on exit, whatever happens.
    """
    names = ("start", "read", "write", "read_final")
    shadowed = {name: router.__dict__[name] for name in names if name in router.__dict__}
    stock = {name: getattr(router, name) for name in names}
    residual = router.config.mode == "residual"
    num_sublayers = router.num_sublayers
    traces: list[RouterTrace] = []
    open_states: list[tuple[Any, RouterTrace]] = []

    def trace_of(state) -> RouterTrace:
        for known, trace in open_states:
            if known is state:
                return trace
        raise RuntimeError("router state was not created inside instrument_router")

    def start(h0, t_emb=None, record_weights=False):
        state = stock["start"](h0, t_emb, record_weights=not residual or record_weights)
        trace = RouterTrace()
        if residual:
            trace.sources.append(h0)
            if gate_values is None:
                dtype = torch.promote_types(h0.dtype, torch.float32)
                gates = torch.ones(h0.shape[0], num_sublayers + 1, num_sublayers + 1, dtype=dtype, device=h0.device)
            else:
                gates = gate_values.detach().clone()
            trace.gates = gates.requires_grad_(True)
        traces.append(trace)
        open_states.append((state, trace))
        return state

    def read(state, l):
        trace = trace_of(state)
        if residual:
            if len(trace.sources) != l:
                raise RuntimeError(f"router.read({l}) after {len(trace.sources) - 1} writes: sublayers must run in order")
            x = _gated_sum(trace.sources, trace.gates[:, l - 1, :l])
        else:
            x = stock["read"](state, l)
        trace.reads[l] = x
        return x

    def write(state, l, value):
        trace_of(state).sources.append(value)
        if not residual:  # residual: the stream is rebuilt from the sources at every read
            stock["write"](state, l, value)

    def read_final(state):
        trace = trace_of(state)
        if residual:
            x = _gated_sum(trace.sources, trace.gates[:, num_sublayers, : len(trace.sources)])
        else:
            x = stock["read_final"](state)
            trace.weights = state.weights
        trace.reads["final"] = x
        return x

    # Instance attributes shadow the bound methods (also on an nn.Module: plain functions live in __dict__).
    router.__dict__.update(start=start, read=read, write=write, read_final=read_final)
    try:
        yield traces
    finally:
        for name in names:
            router.__dict__.pop(name, None)
        router.__dict__.update(shadowed)


@contextlib.contextmanager
def preserved_module_state(module: nn.Module) -> Iterator[None]:
    """Run the block in eval mode with grad enabled; restore every submodule's train/eval flag after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


# ------------------------------------------------------------------------------------------ one batch
@dataclass
class BatchDiagnosis:
    """Per-batch tensors (all detached). Block states z_0..z_K with z_0 the embedding."""

    loss: Tensor  # [B] per-sample training loss
    states: list[Tensor]  # z_k, [B, T, D]
    state_grads: list[Tensor]  # d loss_b / d z_k, [B, T, D]
    output_grads: list[Tensor]  # d loss_b / d v (raw output of block k's last sublayer), k = 1..K
    gate_grads: Tensor | None  # residual: [B, L+1, L+1] d loss_b / d g
    weights: dict[Any, Tensor] | None  # DAR: [B, T, S] per reader


def block_read_indices(router: Any, sublayers_per_block: int) -> list[Any]:
    """Router reads that carry z_0..z_K: sublayers 1, s+1, 2s+1, ... and "final" for the last block."""
    L = router.num_sublayers
    if sublayers_per_block < 1 or L % sublayers_per_block:
        raise ValueError(f"{L} sublayers do not split into blocks of {sublayers_per_block}")
    return [1 + k * sublayers_per_block for k in range(L // sublayers_per_block)] + ["final"]


def diagnose_batch(adapter: DiagnosisAdapter, x0: Tensor, eps: Tensor, t: Tensor, cond: Any,
                   gate_values: Tensor | None = None) -> BatchDiagnosis:
    """One instrumented forward + backward at x_t = (1 - t) x0 + t eps.

    The loss is the sum over samples of each sample's training loss (mean over its elements), so every
    gradient below is the gradient of that sample's own loss, independent of the batch size.
    Call inside `preserved_module_state` (as `diagnose` does) to keep the model's mode untouched.
    """
    router = adapter.router
    tb = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    x_t = ((1 - tb) * x0 + tb * eps).detach().requires_grad_(True)  # grad flows even through frozen weights
    with instrument_router(router, gate_values) as traces:
        prediction = adapter.predict(x_t, t, cond)
    if len(traces) != 1:
        raise RuntimeError(f"the model started its router {len(traces)} times in one forward; expected once")
    trace = traces[0]
    residual = trace.gates is not None
    work = torch.promote_types(prediction.dtype, torch.float32)  # at least fp32, float64 stays float64
    per_sample = (prediction.to(work) - adapter.target(x0, eps).to(work)).pow(2).flatten(1).mean(1)

    L = router.num_sublayers
    s = adapter.sublayers_per_block
    readers = list(range(1, L + 1)) + ["final"]
    raw_outputs = trace.sources[1:] if residual else trace.sources  # v_1 .. v_L
    block_outputs = [raw_outputs[k * s - 1] for k in range(1, L // s + 1)]  # last sublayer of each block
    inputs = [trace.reads[r] for r in readers] + block_outputs + ([trace.gates] if residual else [])
    grads = torch.autograd.grad(per_sample.sum(), inputs, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]
    read_grads = dict(zip(readers, grads[: len(readers)]))
    output_grads = grads[len(readers): len(readers) + len(block_outputs)]

    if residual:
        # z_k is the running stream: every later reader sees it, so its gradient is the sum of the
        # gradients of all reads from sublayer l on (d stream_{l'} / d stream_l = identity).
        stream_grad = {"final": read_grads["final"]}
        running = read_grads["final"]
        for l in range(L, 0, -1):
            running = running + read_grads[l]
            stream_grad[l] = running
    else:
        stream_grad = read_grads  # a DAR aggregate is read by its own sublayer only
    indices = block_read_indices(router, adapter.sublayers_per_block)
    return BatchDiagnosis(
        loss=per_sample.detach(),
        states=[trace.reads[i].detach() for i in indices],
        state_grads=[stream_grad[i].detach() for i in indices],
        output_grads=[g.detach() for g in output_grads],
        gate_grads=grads[-1].detach() if residual else None,
        weights=trace.weights,
    )


# ------------------------------------------------------------------------------------------ probe
def _standardise(train: Tensor, other: Tensor) -> tuple[Tensor, Tensor]:
    mean = train.mean(0)
    std = train.std(0, unbiased=False)
    std = torch.where(std > 1e-12 * (1 + mean.abs()), std, torch.ones_like(std))  # constant features -> 0
    return (train - mean) / std, (other - mean) / std


def _ridge_predictions(x_train: Tensor, y_train: Tensor, x_eval: Tensor, alphas: Sequence[float]) -> Tensor:
    """Ridge predictions [len(alphas), n_eval]; penalty alpha * n_train on standardised features."""
    xs, xe = _standardise(x_train, x_eval)
    y_mean = y_train.mean()
    U, S, Vh = torch.linalg.svd(xs, full_matrices=False)
    uty = U.t() @ (y_train - y_mean)
    out = []
    for alpha in alphas:
        shrink = S / (S**2 + alpha * len(y_train))
        out.append(xe @ (Vh.t() @ (shrink * uty)) + y_mean)
    return torch.stack(out)


def ridge_probe(features: Tensor, targets: Tensor, groups: Tensor, *, test_fraction: float = 0.25,
                alphas: Sequence[float] = RIDGE_ALPHAS, folds: int = 5, seed: int = 0) -> dict[str, float]:
    """Test R^2 of a ridge regression of `targets` from `features` [n, p].

    Rows with the same `groups` id (one (image, noise) pair at every t) stay on one side of the
    train/test split; the penalty is chosen by group K-fold cross-validation on the training side.
    R^2 = 1 - SSE / sum (y - mean y_test)^2 on the test side (0 = no better than a constant).
    """
    x = features.detach().double().flatten(1).cpu()
    y = targets.detach().double().flatten().cpu()
    groups = groups.detach().flatten().cpu()
    ids = torch.unique(groups)
    if len(ids) < 3:
        raise ValueError(f"the probe needs at least 3 (image, noise) pairs, got {len(ids)}")
    ids = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))]
    n_test = min(len(ids) - 2, max(1, round(test_fraction * len(ids))))
    test_ids, train_ids = ids[:n_test], ids[n_test:]
    is_test = torch.isin(groups, test_ids)
    x_train, y_train, g_train = x[~is_test], y[~is_test], groups[~is_test]

    folds = min(folds, len(train_ids))
    sse = torch.zeros(len(alphas), dtype=torch.float64)
    for f in range(folds):
        held = torch.isin(g_train, train_ids[f::folds])
        pred = _ridge_predictions(x_train[~held], y_train[~held], x_train[held], alphas)
        sse += (pred - y_train[held]).pow(2).sum(1)
    best = int(torch.argmin(sse))
    pred = _ridge_predictions(x_train, y_train, x[is_test], [alphas[best]])[0]
    y_test = y[is_test]
    sst = (y_test - y_test.mean()).pow(2).sum()
    r2 = 1.0 - float((pred - y_test).pow(2).sum() / sst) if sst > 0 else float("nan")
    return {"r2": r2, "alpha": float(alphas[best]), "train_pairs": len(train_ids), "test_pairs": len(test_ids)}


def baseline_features(x_t: Tensor, max_features: int = MAX_BASELINE_FEATURES) -> Tensor:
    """Raw x_t flattened, average-pooled spatially by the smallest factor that fits `max_features`."""
    factor = 1
    while x_t[0].numel() // (factor * factor) > max_features and factor < min(x_t.shape[-2:]):
        factor *= 2
    if factor > 1:
        x_t = F.avg_pool2d(x_t, factor, ceil_mode=True)
    return x_t.flatten(1)


# ------------------------------------------------------------------------------------------ full diagnosis
def t_grid_values(t_grid: int | Sequence[float]) -> list[float]:
    if isinstance(t_grid, int):
        if t_grid < 2:
            raise UserError(f"t grid of {t_grid} points: use at least 2 (default {DEFAULT_T_POINTS}, from 0 to 1)")
        return [i / (t_grid - 1) for i in range(t_grid)]
    values = [float(t) for t in t_grid]
    if len(set(values)) < 2 or any(not 0.0 <= t <= 1.0 for t in values):
        raise UserError(f"t grid {values} needs at least 2 distinct values, each in [0, 1] (t = 1 is pure noise)")
    return values


def _default_sublayers(router: Any) -> list[Any]:
    return list(range(1, router.num_sublayers + 1)) + ["final"]


def _rows(matrix: Tensor) -> list[list[float]]:
    return [[float(v) for v in row] for row in matrix]


def diagnose(model: Any, images: Tensor, labels: Tensor | None = None, *, t_grid: int | Sequence[float] = DEFAULT_T_POINTS,
             num_samples: int | None = None, batch_size: int = 64, sublayers: Sequence[Any] | None = None,
             seed: int = 0, probe_test_fraction: float = 0.25) -> dict[str, Any]:
    """Measure the information flow of `model` (a DiT or a `DiagnosisAdapter`) on real `images`.

    images: float NCHW in [-1, 1] (the model's input shape); labels: class ids or None (null class).
    num_samples: how many (image, noise) pairs (default: all images); every pair is used at every t.
    sublayers: readers whose routing / importance maps are kept (ints 1..L and/or "final"; default all).
    Returns a JSON-serialisable dict (see docs/diagnostics.md for the fields).
    """
    adapter = adapter_for(model)
    module, router = adapter.module, adapter.router
    ts = t_grid_values(t_grid)
    if images.dim() != 4:
        raise UserError(f"images must be NCHW, got shape {list(images.shape)}")
    n = len(images) if num_samples is None else num_samples
    if not 3 <= n <= len(images):
        raise UserError(f"asked for {n} samples but {len(images)} images are available; use 3 <= n <= {len(images)}")
    reference = next(module.parameters())
    device, dtype = reference.device, reference.dtype
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=generator)[:n]
    x0_all = images[order].to(dtype)
    eps_all = torch.randn(x0_all.shape, generator=generator, dtype=torch.float32).to(dtype)
    labels_all = labels[order] if labels is not None else None

    residual = router.config.mode == "residual"
    L = router.num_sublayers
    chosen = list(sublayers) if sublayers is not None else _default_sublayers(router)
    for r in chosen:
        if r != "final" and not (isinstance(r, int) and 1 <= r <= L):
            raise UserError(f"sublayer {r!r} is not one of 1..{L} or 'final'")
    K = len(block_read_indices(router, adapter.sublayers_per_block)) - 1
    G = len(ts)

    state_sq = torch.zeros(K + 1, G, dtype=torch.float64)
    grad_sq = torch.zeros(K + 1, G, dtype=torch.float64)
    output_grad_sq = torch.zeros(K, G, dtype=torch.float64)
    output_count = torch.zeros(K, G, dtype=torch.float64)
    state_count = torch.zeros(K + 1, G, dtype=torch.float64)
    cos_sum = torch.zeros(K, G, dtype=torch.float64)  # pairs (z_0, z_1) .. (z_K-1, z_K)
    cos_count = torch.zeros(K, G, dtype=torch.float64)
    loss_sum = torch.zeros(G, dtype=torch.float64)
    weight_sum: dict[Any, Tensor] = {}
    weight_count = torch.zeros(G, dtype=torch.float64)
    gate_sum = torch.zeros(L + 1, L + 1, G, dtype=torch.float64)
    gate_abs = torch.zeros(L + 1, L + 1, G, dtype=torch.float64)
    source_sum = torch.zeros(L + 1, G, dtype=torch.float64)  # one shared gate per source
    source_abs = torch.zeros(L + 1, G, dtype=torch.float64)
    pooled: list[list[Tensor]] = [[] for _ in range(K + 1)]  # per depth, rows in (t, pair) order
    baseline: list[Tensor] = []
    probe_t: list[Tensor] = []
    probe_pair: list[Tensor] = []

    with preserved_module_state(module):
        for j, t_value in enumerate(ts):
            for lo in range(0, n, batch_size):
                x0 = x0_all[lo: lo + batch_size].to(device)
                eps = eps_all[lo: lo + batch_size].to(device)
                B = len(x0)
                t = torch.full((B,), t_value, dtype=torch.promote_types(dtype, torch.float32), device=device)
                cond = adapter.condition(None if labels_all is None else labels_all[lo: lo + batch_size], B, device)
                out = diagnose_batch(adapter, x0, eps, t, cond)

                loss_sum[j] += out.loss.double().sum().cpu()
                for k, (z, g) in enumerate(zip(out.states, out.state_grads)):
                    state_sq[k, j] += z.double().pow(2).sum().cpu()
                    grad_sq[k, j] += g.double().pow(2).sum().cpu()
                    state_count[k, j] += z.numel()
                    pooled[k].append(z.double().mean(1).cpu())
                for k, g in enumerate(out.output_grads):
                    output_grad_sq[k, j] += g.double().pow(2).sum().cpu()
                    output_count[k, j] += g.numel()
                for k in range(K):
                    cos = F.cosine_similarity(out.states[k].double(), out.states[k + 1].double(), dim=-1)
                    cos_sum[k, j] += cos.sum().cpu()
                    cos_count[k, j] += cos.numel()
                if out.weights is not None:
                    for r in chosen:
                        w = out.weights[r].double().sum((0, 1)).cpu()
                        weight_sum.setdefault(r, torch.zeros(len(w), G, dtype=torch.float64))[:, j] += w
                    weight_count[j] += B * out.states[0].shape[1]  # batch x tokens
                if out.gate_grads is not None:
                    gg = out.gate_grads.double().cpu()
                    gate_sum[:, :, j] += gg.sum(0)
                    gate_abs[:, :, j] += gg.abs().sum(0)
                    shared = gg.sum(1)  # d loss_b / d (one gate on source i seen by every reader)
                    source_sum[:, j] += shared.sum(0)
                    source_abs[:, j] += shared.abs().sum(0)
                baseline.append(baseline_features(((1 - t_value) * x0 + t_value * eps).float()).double().cpu())
                probe_t.append(torch.full((B,), t_value, dtype=torch.float64))
                probe_pair.append(torch.arange(lo, lo + B))

    result: dict[str, Any] = {
        "format": FORMAT,
        "routing": router.config.to_dict() if hasattr(router.config, "to_dict") else {"mode": router.config.mode},
        "t_grid": ts,
        "num_samples": n,
        "seed": seed,
        "blocks": list(range(1, K + 1)),
        "loss": [float(v) for v in loss_sum / n],
        "embedding_rms": [float(v) for v in (state_sq[0] / state_count[0]).sqrt()],
        "rms": _rows((state_sq[1:] / state_count[1:]).sqrt()),
        "grad_rms": _rows((grad_sq[1:] / state_count[1:]).sqrt()),
        "output_grad_rms": _rows((output_grad_sq / output_count).sqrt()),
        "embedding_grad_rms": [float(v) for v in (grad_sq[0] / state_count[0]).sqrt()],
        "cosine_pairs": [[k, k + 1] for k in range(1, K)],
        "cosine": _rows(cos_sum[1:] / cos_count[1:]),
        "embedding_cosine": [float(v) for v in cos_sum[0] / cos_count[0]],
    }
    if residual:
        sources = [adapter.source_name(i) for i in range(L + 1)]
        per_reader = {}
        for r in chosen:
            row = L if r == "final" else r - 1
            width = L + 1 if r == "final" else r
            per_reader[str(r)] = {
                "sources": sources[:width],
                "gate_grad": _rows(gate_sum[row, :width] / n),
                "gate_grad_abs": _rows(gate_abs[row, :width] / n),
            }
        result["importance"] = {
            "sources": sources,
            "gate_grad": _rows(source_sum / n),
            "gate_grad_abs": _rows(source_abs / n),
            "sublayers": per_reader,
        }
    else:
        maps = {}
        for r in chosen:
            listed = router.sources_final() if r == "final" else router.sources(r)
            maps[str(r)] = {
                "sources": [source_label(adapter, s) for s in listed],
                "weights": _rows(weight_sum[r] / weight_count),
            }
        result["routing_maps"] = maps

    rows_t = torch.cat(probe_t)
    rows_pair = torch.cat(probe_pair)
    probe = lambda feats: ridge_probe(torch.cat(feats), rows_t, rows_pair, test_fraction=probe_test_fraction, seed=seed)  # noqa: E731
    depth_fits = [probe(pooled[k]) for k in range(K + 1)]
    base_fit = probe(baseline)
    result["probe"] = {
        "blocks": list(range(1, K + 1)),
        "r2": [fit["r2"] for fit in depth_fits[1:]],
        "embedding_r2": depth_fits[0]["r2"],
        "x_t_baseline_r2": base_fit["r2"],
        "ridge_alpha": [fit["alpha"] for fit in depth_fits[1:]],
        "train_pairs": base_fit["train_pairs"],
        "test_pairs": base_fit["test_pairs"],
    }
    _check_finite(result)
    return result


def _check_finite(result: dict[str, Any]) -> None:
    """NaN/inf would silently break the JSON and the plots: name the metric instead."""

    def walk(value, path):
        if isinstance(value, float) and not math.isfinite(value):
            raise FloatingPointError(f"diagnostics: non-finite value at {path}; the model produces NaN/inf there")
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}.{key}")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, f"{path}[{i}]")

    walk(result, "result")


__all__ = [
    "DEFAULT_T_POINTS",
    "DiagnosisAdapter",
    "DiTAdapter",
    "adapter_for",
    "instrument_router",
    "preserved_module_state",
    "diagnose_batch",
    "block_read_indices",
    "ridge_probe",
    "baseline_features",
    "t_grid_values",
    "diagnose",
]
