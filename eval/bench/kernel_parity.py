"""Parity of the fused Triton DAR aggregation against the PyTorch reference: forward and every gradient.

Runs on CUDA (compiled kernels) or on the CPU under Triton's interpreter:

    TRITON_INTERPRET=1 python eval/bench/kernel_parity.py --device cpu     # tiny shapes, ~10 s
    python eval/bench/kernel_parity.py --device cuda                       # adds SiT-XL/2-width cases

Prints one line per case and exits 1 if any case is outside tolerance (--json prints a JSON list instead).
Used by tests/test_kernels.py (in a subprocess for the interpreter) and by eval/bench/run_gpu.sh.
Imports only torch, triton and dmd_dar.routing.kernels / dmd_dar.routing.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

QUERY_KINDS = ("static", "static_t", "dynamic")
# max |fused - reference| / max |reference|, per output; bf16 / fp16 gradients are rounded to the
# sources' dtype by both paths, so they can differ by a rounding step.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@dataclass
class Case:
    query: str
    sources: int
    batch: int
    tokens: int
    dim: int
    dtype: str
    stacked: bool = False
    max_rows_per_program: int | None = None  # override the backward tiling (exercise the row loop)


@dataclass
class Result:
    case: Case
    errors: dict  # name -> relative max error
    tolerance: float
    ok: bool


def query_shape(kind: str, batch: int, tokens: int, dim: int) -> tuple[int, ...]:
    return {"static": (1, 1, dim), "static_t": (batch, 1, dim), "dynamic": (batch, tokens, dim)}[kind]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def run_case(case: Case, device: str, seed: int = 0) -> Result:
    from dmd_dar.routing.kernels import triton_aggregate
    from dmd_dar.routing.kernels.reference import aggregate_reference

    dtype = getattr(torch, case.dtype)
    gen = torch.Generator().manual_seed(seed)
    B, T, D, S = case.batch, case.tokens, case.dim, case.sources
    # Sources with different scales (the residual-stream regime) and a query large enough for peaked weights.
    values = [(torch.randn(B, T, D, generator=gen) * (0.5 + i)).to(device, dtype) for i in range(S)]
    query = (torch.randn(query_shape(case.query, B, T, D), generator=gen) * 2.0).to(device)
    key_weight = (torch.rand(D, generator=gen) + 0.5).to(device)
    upstream = torch.randn(B, T, D, generator=gen).to(device)

    def grads(fn, stacked):
        vs = [v.clone().requires_grad_(True) for v in values]
        q = query.clone().requires_grad_(True)
        g = key_weight.clone().requires_grad_(True)
        inputs = torch.stack(vs) if stacked else vs
        out = fn(inputs, q, g)
        got = torch.autograd.grad((out * upstream).sum(), [*vs, q, g])
        return out, got

    saved = (triton_aggregate._BWD_MAX_ROWS_PER_PROGRAM, triton_aggregate._BWD_MIN_PROGRAMS)
    if case.max_rows_per_program is not None:
        triton_aggregate._BWD_MAX_ROWS_PER_PROGRAM, triton_aggregate._BWD_MIN_PROGRAMS = case.max_rows_per_program, 1
    try:
        out, got = grads(lambda v, q, g: triton_aggregate.aggregate_triton(v, q, g), case.stacked)
    finally:
        triton_aggregate._BWD_MAX_ROWS_PER_PROGRAM, triton_aggregate._BWD_MIN_PROGRAMS = saved
    ref_out, want = grads(lambda v, q, g: aggregate_reference(v if isinstance(v, torch.Tensor) else torch.stack(v), q, g), True)

    errors = {"out": _rel_err(out, ref_out)}
    errors["dtype_ok"] = 0.0 if out.dtype == torch.float32 and got[-2].shape == query.shape and got[0].dtype == dtype else 1.0
    for i in range(S):
        errors[f"d_v{i}"] = _rel_err(got[i], want[i])
    errors["d_query"] = _rel_err(got[S], want[S])
    errors["d_key_weight"] = _rel_err(got[S + 1], want[S + 1])
    tol = TOLERANCE[dtype]
    ok = all(e <= tol for e in errors.values())
    return Result(case, errors, tol, ok)


def cpu_cases() -> list[Case]:
    """Tiny shapes for the interpreter (D not a power of two, so the column mask is exercised)."""
    cases = [Case(q, s, 2, 3, 24, "float32") for q in QUERY_KINDS for s in (1, 3, 5)]
    cases += [
        Case("dynamic", 3, 2, 5, 24, "float32", max_rows_per_program=2),  # several rows per program, ragged tail
        Case("static_t", 3, 2, 5, 24, "float32", max_rows_per_program=2),
        Case("static", 3, 2, 5, 24, "float32", max_rows_per_program=2),
        Case("static_t", 3, 2, 3, 24, "float32", stacked=True),
        Case("dynamic", 3, 2, 3, 40, "bfloat16"),
        Case("static", 2, 2, 1, 24, "float16"),  # T = 1
    ]
    return cases


def cuda_cases() -> list[Case]:
    cases = cpu_cases()
    cases += [Case(q, s, 4, 64, 1152, "bfloat16") for q in QUERY_KINDS for s in (1, 5, 17)]
    cases += [Case("static_t", 9, 4, 64, 1152, "float32"), Case("dynamic", 57, 2, 32, 1152, "bfloat16")]
    cases += [Case("static", 4, 64, 128, 768, "bfloat16")]  # enough rows for several rows per backward program
    return cases


def router_check(device: str) -> Result:
    """A DAR DepthRouter run with backend 'triton' vs 'torch' (same parameters): outputs and grads agree."""
    from dmd_dar.routing import DepthRouter, RoutingConfig

    torch.manual_seed(0)
    B, T, D, L = 2, 16, 64, 6
    errors = {}
    for query in QUERY_KINDS:
        results = []
        for backend in ("torch", "triton"):
            cfg = RoutingConfig(mode="dar", query=query, chunk_size=2, backend=backend)
            router = DepthRouter(cfg, num_sublayers=L, dim=D, time_dim=8).to(device)
            with torch.no_grad():  # non-trivial weights (a fresh router is uniform), the same for both backends
                for name, p in router.named_parameters():
                    noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3
                    p.copy_(noise + 1.0 if name == "key_norm_weight" else noise)
            gen = torch.Generator().manual_seed(2)
            h0 = torch.randn(B, T, D, generator=gen).to(device).requires_grad_(True)
            t_emb = torch.randn(B, 8, generator=gen).to(device)
            mats = [torch.randn(D, D, generator=gen).to(device) / D**0.5 for _ in range(L)]
            state = router.start(h0, t_emb)
            for l in range(1, L + 1):
                router.write(state, l, torch.tanh(router.read(state, l) @ mats[l - 1]))
            out = router.read_final(state)
            grads = torch.autograd.grad(out.square().sum(), [h0, *router.parameters()])
            results.append((out, grads))
        (o1, g1), (o2, g2) = results
        errors[f"{query}/out"] = _rel_err(o2, o1)
        for k, (a, b) in enumerate(zip(g2, g1)):
            errors[f"{query}/grad{k}"] = _rel_err(a, b)
    tol = 1e-4
    return Result(Case("router", L + 1, B, T, D, "float32"), errors, tol, all(e <= tol for e in errors.values()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print a JSON list of results")
    parser.add_argument("--no-router", action="store_true", help="skip the DepthRouter end-to-end check")
    args = parser.parse_args(argv)
    from dmd_dar.routing.kernels import triton_aggregate

    if args.device == "cpu" and not triton_aggregate.interpreting():
        print("error: on the CPU run with TRITON_INTERPRET=1 (Triton's interpreter)", file=sys.stderr)
        return 2
    cases = cuda_cases() if args.device == "cuda" else cpu_cases()
    results = [run_case(c, args.device) for c in cases]
    if not args.no_router:
        results.append(router_check(args.device))
    if args.json:
        print(json.dumps([{"case": asdict(r.case), "errors": r.errors, "tolerance": r.tolerance, "ok": r.ok} for r in results]))
    else:
        name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (Triton interpreter)"
        print(f"device: {name}  torch {torch.__version__}")
        for r in results:
            worst = max(r.errors, key=r.errors.get)
            print(f"{'ok  ' if r.ok else 'FAIL'} {asdict(r.case)}  worst {worst}={r.errors[worst]:.2e} (tol {r.tolerance:.0e})")
        print(f"{sum(r.ok for r in results)}/{len(results)} cases within tolerance")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
