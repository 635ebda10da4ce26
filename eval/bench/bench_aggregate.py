"""DAR aggregation: naive PyTorch reference vs the fused Triton kernel, forward / backward time and memory.

Default (CUDA): SiT-XL/2 shapes, B=32, 256 tokens, d=1152, bf16 sources, fp32 static_t query, for
N = 1, 2, 4, 8, 16, 32, 57 sources (57 = the dense final aggregator of a 28-block model).
On the CPU the defaults are tiny and the fused path runs only under TRITON_INTERPRET=1 (the interpreter:
its times measure Python, not the kernel), otherwise only the naive path is timed.

    python eval/bench/bench_aggregate.py                                   # GPU, full size
    python eval/bench/bench_aggregate.py --device cpu                      # CPU, tiny, naive only
    TRITON_INTERPRET=1 python eval/bench/bench_aggregate.py --device cpu   # CPU, tiny, both paths

"naive" is what the router does with backend="torch": torch.stack of the sources + the reference maths
(fp32 logits, softmax, einsum). Both paths receive the router's list of S [B, T, D] tensors.
Memory: "saved" = allocated after the forward (graph alive, output included) minus before;
"peak" = peak during forward + backward minus the inputs already allocated (CUDA only).
"""
from __future__ import annotations

import argparse

import _common as C  # noqa: I001  (also puts the repo on sys.path)
import torch

from dmd_dar.errors import cli_main
from dmd_dar.routing.kernels import aggregate, triton_available


def query_for(kind: str, B: int, T: int, D: int, device) -> torch.Tensor:
    shape = {"static": (1, 1, D), "static_t": (B, 1, D), "dynamic": (B, T, D)}[kind]
    return torch.randn(shape, device=device) * 0.1


def measure(backend: str, values, query, key_weight, upstream, device, warmup: int, iters: int) -> dict:
    """Forward ms, backward ms, saved MiB, peak MiB for one backend."""

    def forward():
        return aggregate(values, query, key_weight, backend=backend)

    fwd_ms = C.time_ms(forward, device, warmup, iters)

    inputs = [*values, query, key_weight]

    def backward(out):  # autograd.grad: no accumulation into .grad (which would add a pass per source)
        return torch.autograd.grad(out, inputs, upstream)

    def backward_only() -> float:
        out = forward()
        C.sync(device)
        start = torch.cuda.Event(enable_timing=True) if device.type == "cuda" else None
        if start is not None:
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            backward(out)
            end.record()
            C.sync(device)
            return start.elapsed_time(end)
        import time

        t0 = time.perf_counter()
        backward(out)
        return (time.perf_counter() - t0) * 1e3

    for _ in range(warmup):
        backward_only()
    bwd = sorted(backward_only() for _ in range(iters))
    bwd_ms = bwd[len(bwd) // 2]

    C.sync(device)
    base = C.allocated_mb(device)
    C.reset_peak(device)
    out = forward()
    after_fwd = C.allocated_mb(device)
    grads = backward(out)
    peak = C.peak_mb(device)
    del out, grads
    return {
        "fwd_ms": fwd_ms,
        "bwd_ms": bwd_ms,
        "saved_mb": None if base is None else after_fwd - base,
        "peak_mb": None if base is None else peak - base,
    }


@cli_main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(parser)
    parser.add_argument("--batch", type=int, default=None, help="default 32 (GPU) / 2 (CPU)")
    parser.add_argument("--tokens", type=int, default=None, help="default 256 (GPU) / 16 (CPU)")
    parser.add_argument("--dim", type=int, default=None, help="default 1152 (GPU) / 64 (CPU)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--query", default="static_t", choices=["static", "static_t", "dynamic"])
    parser.add_argument("--sources", default=None, help="comma list of N (default 1,2,4,8,16,32,57 on GPU; 1,4,8 on CPU)")
    args = parser.parse_args(argv)
    C.resolve_iters(args)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    B = args.batch or (32 if gpu else 2)
    T = args.tokens or (256 if gpu else 16)
    D = args.dim or (1152 if gpu else 64)
    ns = [int(n) for n in (args.sources or ("1,2,4,8,16,32,57" if gpu else "1,4,8")).split(",")]
    dtype = getattr(torch, args.dtype)

    fused_ok = triton_available()
    if fused_ok and not gpu:
        from dmd_dar.routing.kernels import triton_aggregate

        fused_ok = triton_aggregate.interpreting()
    backends = ["torch"] + (["triton"] if fused_ok else [])
    C.header("DAR aggregation: naive (reference) vs fused (Triton)", args, device,
             f"shapes: B={B} T={T} D={D}  sources dtype={args.dtype}  query={args.query} (fp32)  "
             f"N={ns}  warmup={args.warmup} iters={args.iters}  backends={backends}"
             + ("" if fused_ok else "  [fused path skipped: needs CUDA or TRITON_INTERPRET=1]"))
    print(f"{'N':>3} | {'naive fwd':>9} {'fused fwd':>9} {'x':>6} | {'naive bwd':>9} {'fused bwd':>9} {'x':>6} | "
          f"{'naive saved':>11} {'fused saved':>11} | {'naive peak':>10} {'fused peak':>10} {'mem -%':>6}")
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for n in ns:
        values = [(torch.randn(B, T, D, generator=gen) * (1 + i)).to(device, dtype).requires_grad_(True) for i in range(n)]
        query = query_for(args.query, B, T, D, "cpu").to(device).requires_grad_(True)
        key_weight = torch.ones(D, device=device, requires_grad=True)
        upstream = torch.randn(B, T, D, generator=gen).to(device)
        res = {b: measure(b, values, query, key_weight, upstream, device, args.warmup, args.iters) for b in backends}
        naive, fused = res["torch"], res.get("triton", {})
        row = {"N": n, "naive": naive, "fused": fused,
               "fwd_speedup": C.ratio(naive["fwd_ms"], fused.get("fwd_ms")),
               "bwd_speedup": C.ratio(naive["bwd_ms"], fused.get("bwd_ms")),
               "peak_mem_reduction": None if fused.get("peak_mb") is None or not naive["peak_mb"] else 1 - fused["peak_mb"] / naive["peak_mb"]}
        rows.append(row)
        print(f"{n:>3} | {naive['fwd_ms']:>9.3f} {C.fmt(fused.get('fwd_ms'), '.3f'):>9} {C.fmt(row['fwd_speedup'], '.1f'):>6} | "
              f"{naive['bwd_ms']:>9.3f} {C.fmt(fused.get('bwd_ms'), '.3f'):>9} {C.fmt(row['bwd_speedup'], '.1f'):>6} | "
              f"{C.fmt(naive['saved_mb'], '.0f'):>11} {C.fmt(fused.get('saved_mb'), '.0f'):>11} | "
              f"{C.fmt(naive['peak_mb'], '.0f'):>10} {C.fmt(fused.get('peak_mb'), '.0f'):>10} "
              f"{C.fmt(None if row['peak_mem_reduction'] is None else 100 * row['peak_mem_reduction'], '.1f'):>6}")
        del values, query, key_weight, upstream
        if gpu:
            torch.cuda.empty_cache()
    print("times in ms (median), memory in MiB; x = naive / fused; targets at N=57: fwd >= 10x, bwd >= 8x")
    C.write_json(args.json, {"device": C.device_name(device), "B": B, "T": T, "D": D, "dtype": args.dtype,
                             "query": args.query, "rows": rows})


if __name__ == "__main__":
    main()
