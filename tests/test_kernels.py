"""DAR aggregation kernels: the reference maths, the dispatcher, and the fused Triton path.

The Triton path is checked on the CPU with Triton's interpreter in a subprocess (TRITON_INTERPRET=1 must be
set before the kernels are defined, and must not leak into the rest of the suite), and on CUDA in-process.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dmd_dar.errors import UserError
from dmd_dar.routing.kernels import aggregate, aggregate_reference, routing_logits, routing_weights, triton_available

REPO = Path(__file__).resolve().parents[1]
PARITY_SCRIPT = REPO / "eval" / "bench" / "kernel_parity.py"
QUERY_SHAPES = {"static": lambda B, T, D: (1, 1, D), "static_t": lambda B, T, D: (B, 1, D), "dynamic": lambda B, T, D: (B, T, D)}


def loop_aggregate(values: list[torch.Tensor], query: torch.Tensor, key_weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The paper's formula written out source by source in float64 (differentiable, for gradcheck)."""
    D = values[0].shape[-1]
    logits = []
    for v in values:
        v = v.double()
        key = v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps) * key_weight.double()
        logits.append((query.double() * key).sum(-1) / math.sqrt(D))  # [B, T]
    top = torch.stack(logits).amax(0)
    weights = [torch.exp(s - top) for s in logits]
    total = sum(weights)
    return sum((w / total).unsqueeze(-1) * v.double() for w, v in zip(weights, values))


def _inputs(kind: str, S: int, B=2, T=3, D=8, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    values = [torch.randn(B, T, D, generator=gen, dtype=dtype) * (1 + i) for i in range(S)]
    query = torch.randn(QUERY_SHAPES[kind](B, T, D), generator=gen, dtype=dtype)
    key_weight = torch.rand(D, generator=gen, dtype=dtype) + 0.5
    return values, query, key_weight


# ---------------------------------------------------------------------------------- reference maths
@pytest.mark.parametrize("kind", list(QUERY_SHAPES))
@pytest.mark.parametrize("S", [1, 3])
def test_reference_matches_per_source_loop(kind, S):
    values, query, key_weight = _inputs(kind, S)
    got = aggregate_reference(torch.stack(values), query, key_weight).double()
    want = loop_aggregate(values, query, key_weight)
    # The reference computes in fp32 by contract: compare at fp32 precision.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_reference_two_sources_known_weights():
    """Two one-hot-ish sources of unit RMS; the logits are q . k / sqrt(D) by hand."""
    D = 4
    v0 = torch.tensor([2.0, 0.0, 0.0, 0.0]).view(1, 1, D)  # RMS 1
    v1 = torch.tensor([0.0, 2.0, 0.0, 0.0]).view(1, 1, D)  # RMS 1
    query = torch.tensor([3.0, 1.0, 0.0, 0.0]).view(1, 1, D)
    key_weight = torch.ones(D)
    logits = routing_logits(torch.stack([v0, v1]), query, key_weight, eps=0.0)
    torch.testing.assert_close(logits, torch.tensor([[[3.0, 1.0]]]))  # (3*2)/2 and (1*2)/2
    a = 1 / (1 + math.exp(-2.0))
    out = aggregate_reference(torch.stack([v0, v1]), query, key_weight, eps=0.0)
    torch.testing.assert_close(out, (a * v0 + (1 - a) * v1).float())


@pytest.mark.parametrize("kind", list(QUERY_SHAPES))
def test_reference_gradients_match_gradchecked_loop(kind):
    """gradcheck the per-source loop in float64, then the reference's autograd gradients must equal the loop's
    (values, query reduced to its own shape, key weight) at fp32 precision."""
    values, query, key_weight = _inputs(kind, 3, B=2, T=2, D=4)
    values = [v.requires_grad_(True) for v in values]
    query.requires_grad_(True)
    key_weight.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda q, g, *vs: loop_aggregate(list(vs), q, g), (query, key_weight, *values))
    upstream = torch.randn(2, 2, 4, dtype=torch.float64)
    inputs = (*values, query, key_weight)
    got = torch.autograd.grad((aggregate_reference(torch.stack(values), query, key_weight).double() * upstream).sum(), inputs)
    want = torch.autograd.grad((loop_aggregate(values, query, key_weight) * upstream).sum(), inputs)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)


def test_zero_query_gives_mean_of_sources():
    values, _, key_weight = _inputs("static", 5, dtype=torch.float32)
    out = aggregate(values, torch.zeros(1, 1, 8), key_weight, backend="torch")
    torch.testing.assert_close(out, torch.stack(values).mean(0), rtol=1e-6, atol=1e-6)
    w = routing_weights(torch.stack(values), torch.zeros(1, 1, 8), key_weight)
    torch.testing.assert_close(w, torch.full((2, 3, 5), 0.2))


def test_logits_ignore_source_scale():
    """Keys are RMS-normalised: scaling a source leaves the weights unchanged (not its value)."""
    values, query, key_weight = _inputs("dynamic", 3, dtype=torch.float32)
    scaled = [values[0] * 7.0, values[1], values[2] * 0.01]
    w0 = routing_weights(torch.stack(values), query, key_weight, eps=0.0)
    w1 = routing_weights(torch.stack(scaled), query, key_weight, eps=0.0)
    torch.testing.assert_close(w0, w1, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------- dispatcher
def test_dispatcher_list_and_stack_agree_on_cpu():
    values, query, key_weight = _inputs("static_t", 4, dtype=torch.bfloat16)
    query, key_weight = query.float(), key_weight.float()
    ref = aggregate_reference(torch.stack(values), query, key_weight)
    for backend in ("auto", "torch"):
        for inputs in (values, torch.stack(values), tuple(values)):
            out = aggregate(inputs, query, key_weight, backend=backend)
            assert out.dtype == torch.float32
            # lists are aggregated without stacking (aggregate_sources): same maths, other summation order
            torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["static", "static_t", "dynamic"])
def test_unstacked_reference_matches_stacked_with_gradients(kind):
    from dmd_dar.routing.kernels import aggregate_sources

    values, query, key_weight = _inputs(kind, 5, dtype=torch.float64)
    leaves = [v.clone().requires_grad_() for v in values] + [query.clone().requires_grad_(), key_weight.clone().requires_grad_()]
    a = aggregate_sources(leaves[:5], leaves[5], leaves[6])
    grads_a = torch.autograd.grad((a * a.detach().sin()).sum(), leaves)
    b = aggregate_reference(torch.stack(leaves[:5]), leaves[5], leaves[6])
    grads_b = torch.autograd.grad((b * b.detach().sin()).sum(), leaves)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", list(QUERY_SHAPES))
@pytest.mark.parametrize("shared", [False, True])
def test_unstacked_reference_gradcheck_float64(kind, shared):
    """gradcheck of the list path itself (its mixture has a hand-written backward, `_MixSources`): values, query and
    key weight; `shared` reads the sources through one `SourceCache` as two aggregations, as the router does."""
    from dmd_dar.routing.kernels import SourceCache, aggregate_sources

    values, query, key_weight = _inputs(kind, 3, B=2, T=3, D=4)
    leaves = [v.requires_grad_() for v in values] + [query.requires_grad_(), key_weight.requires_grad_()]

    def f(*xs):
        vs, q, g = list(xs[:3]), xs[3], xs[4]
        if not shared:
            return aggregate_sources(vs, q, g)
        cache = SourceCache()
        return aggregate_sources(vs[:2], q, g, cache=cache) + aggregate_sources(vs, q * 0.5, g, cache=cache)

    assert torch.autograd.gradcheck(f, tuple(leaves))


@pytest.mark.parametrize("kind", list(QUERY_SHAPES))
def test_shared_source_cache_equals_fresh_computation(kind):
    """Aggregations sharing a cache give the outputs and gradients of independent ones; RMS once per source."""
    from dmd_dar.routing.kernels import SourceCache, aggregate_sources

    values, query, key_weight = _inputs(kind, 4)
    results = []
    for shared in (False, True):
        leaves = [v.clone().requires_grad_() for v in values] + [query.clone().requires_grad_()]
        cache = SourceCache() if shared else None
        outs = [aggregate_sources(leaves[:n], leaves[4] * n, key_weight, cache=cache) for n in (1, 2, 3, 4)]
        grads = torch.autograd.grad(sum((o * o.detach().cos()).sum() for o in outs), leaves)
        results.append((outs, grads))
        if shared:
            assert cache.rms_computations == len(cache) == 4
    for a, b in zip(results[0][0] + list(results[0][1]), results[1][0] + list(results[1][1])):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_source_cache_rejects_another_eps():
    from dmd_dar.routing.kernels import SourceCache, aggregate_sources

    values, query, key_weight = _inputs("static", 2)
    with pytest.raises(ValueError, match="eps"):
        aggregate_sources(values, query, key_weight, eps=1e-5, cache=SourceCache(eps=1e-6))


def test_dispatcher_rejects_unknown_backend():
    values, query, key_weight = _inputs("static", 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="backend"):
        aggregate(values, query, key_weight, backend="cuda")


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error():
    from dmd_dar.routing.kernels import triton_aggregate

    if triton_aggregate.interpreting():
        pytest.skip("this process runs Triton's interpreter (TRITON_INTERPRET=1 was set at import)")
    values, query, key_weight = _inputs("static", 2, dtype=torch.float32)
    with pytest.raises(UserError, match="TRITON_INTERPRET=1"):
        aggregate(values, query, key_weight, backend="triton")


# ---------------------------------------------------------------------------------- Triton interpreter
@pytest.fixture(scope="module")
def interpreter_results():
    if not triton_available():
        pytest.skip("triton is not installed: the fused kernel cannot be interpreted")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, str(PARITY_SCRIPT), "--device", "cpu", "--json"], env=env,
                          capture_output=True, text=True, timeout=240)
    if proc.returncode not in (0, 1):
        pytest.fail(f"interpreter parity run crashed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _case_id(r):
    c = r["case"]
    return f"{c['query']}-S{c['sources']}-B{c['batch']}T{c['tokens']}D{c['dim']}-{c['dtype']}"


def test_interpreter_covers_every_query_kind_and_source_count(interpreter_results):
    seen = {(r["case"]["query"], r["case"]["sources"]) for r in interpreter_results}
    for kind in QUERY_SHAPES:
        for S in (1, 3, 5):
            assert (kind, S) in seen


def test_interpreter_fused_matches_reference(interpreter_results):
    """Forward and every gradient (each value, the query reduced to its shape, the key weight)."""
    failures = [f"{_case_id(r)}: {r['errors']}" for r in interpreter_results if not r["ok"]]
    assert not failures, "\n".join(failures)
    for r in interpreter_results:
        if r["case"]["query"] != "router":
            expected = {"out", "dtype_ok", "d_query", "d_key_weight"} | {f"d_v{i}" for i in range(r["case"]["sources"])}
            assert expected <= set(r["errors"])


# ---------------------------------------------------------------------------------- CUDA
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(), reason="needs a CUDA GPU and triton")


@needs_cuda
def test_cuda_fused_matches_reference():
    sys.path.insert(0, str(PARITY_SCRIPT.parent))
    import kernel_parity

    results = [kernel_parity.run_case(c, "cuda") for c in kernel_parity.cuda_cases()]
    results.append(kernel_parity.router_check("cuda"))
    failures = [f"{r.case}: {r.errors}" for r in results if not r.ok]
    assert not failures, "\n".join(failures)


@needs_cuda
def test_cuda_auto_backend_uses_the_fused_kernel():
    from dmd_dar.routing.kernels.triton_aggregate import aggregate_triton

    values, query, key_weight = _inputs("dynamic", 5, B=2, T=64, D=256, dtype=torch.float32)
    values = [v.cuda().to(torch.bfloat16) for v in values]
    query, key_weight = query.cuda(), key_weight.cuda()
    fused = aggregate_triton(values, query, key_weight)
    assert torch.equal(aggregate(values, query, key_weight, backend="auto"), fused)
    torch.testing.assert_close(aggregate(values, query, key_weight, backend="torch"), fused, rtol=1e-4, atol=1e-4)
