"""Routing overhead on the CPU: forward+backward time and memory of one DiT, residual vs DAR variants.

Issue 2 item 7. The same DiT (random weights, non-zero DAR queries) runs a flow-matching forward+backward
(no optimiser step) with each routing variant; the table gives medians and ratios to residual:

- time: median wall time of forward+backward after warm-up, the variants interleaved round by round so
  that load changes on a shared machine hit them alike (torch threads: --threads, default 1);
- saved MiB: bytes of the unique tensor storages autograd saves for backward during the forward
  (`torch.autograd.graph.saved_tensors_hooks`; parameters excluded). This is the activation memory a
  training step must keep alive between forward and backward, and it is exact and deterministic;
- peak MiB: peak of the CPU allocator's running total during one forward+backward, above what was live
  before it (torch.profiler memory events, profile_memory=True; a separate, untimed iteration). This adds
  the transient buffers (e.g. the reference aggregation's stacked copy of its sources, gradients).

The CPU has no allocator statistics like `torch.cuda.max_memory_allocated`, so `bench_train_step.py
--device cpu` prints no memory; process RSS would be blurred by the malloc caches, hence the two measures
above. On the CPU the router's "auto" backend is the PyTorch reference (torch.stack of the sources, then
einsum), so these figures say nothing about the fused GPU kernel: use `eval/bench/run_gpu.sh` for that.

    python eval/bench/bench_routing_cpu.py                       # both sizes, 1 thread
    python eval/bench/bench_routing_cpu.py --sizes teacher --iters 3
    python eval/bench/bench_routing_cpu.py --depth 4 --hidden 64 --heads 2 --batch 8   # one custom size
"""
from __future__ import annotations

import argparse
import gc
import statistics
import types
from pathlib import Path

import _common as C  # noqa: I001  (puts the repo on sys.path)
import torch
import torch.nn.functional as F

from dmd_dar.errors import UserError, cli_main
from dmd_dar.routing import RoutingConfig

# The bundled MNIST teacher's shape, and a deeper/wider model where the number of sources matters.
SIZES = {
    "teacher": dict(input_size=32, patch=4, channels=1, hidden=128, depth=6, heads=4, batch=64, num_classes=10),
    "deep": dict(input_size=32, patch=4, channels=1, hidden=256, depth=12, heads=4, batch=16, num_classes=10),
}
VARIANTS = {
    "residual": dict(mode="residual"),
    "dar dense static_t": dict(mode="dar", query="static_t", chunk_size=1),
    "dar dense dynamic": dict(mode="dar", query="dynamic", chunk_size=1),
    "dar c4 static_t": dict(mode="dar", query="static_t", chunk_size=4, summary="sum"),
    "dar c4 dynamic": dict(mode="dar", query="dynamic", chunk_size=4, summary="sum"),
}
CUSTOM_FLAGS = ("input_size", "patch", "channels", "hidden", "depth", "heads", "batch")


def sources_read(model) -> int:
    """Sources summed over every aggregator (all sublayers + the final one): what the stack copies scale with."""
    router = model.router
    if router.config.mode == "residual":
        return 0
    return sum(len(router.sources(l)) for l in range(1, router.num_sublayers + 1)) + len(router.sources_final())


def saved_for_backward_mib(forward, params: set[int]) -> float:
    """MiB of the unique storages autograd saves during `forward()` (parameter storages excluded)."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params:
            storages[ptr] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = forward()
    del out
    return sum(storages.values()) / 2**20


def profiled_peak_mib(step) -> float:
    """Peak of the CPU allocator's running total during `step()`, MiB above the level before it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    total = peak = 0
    memory_events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for e in sorted(memory_events, key=lambda e: e.start_ns()):
        if str(e.device_type()) != "DeviceType.CPU":
            continue
        total += e.nbytes()  # + for an allocation, - for a free
        peak = max(peak, total)
    return peak / 2**20


def build_variant(name: str, size: types.SimpleNamespace) -> dict:
    """The model of one variant and its forward+backward step on a fixed random batch."""
    model = C.build_dit(size, RoutingConfig(**VARIANTS[name]), torch.device("cpu"))
    if model.routing.mode == "dar":
        C.randomise_router(model)
    model.train()
    x_t, t, y, target = C.flow_matching_batch(size)

    def loss():
        return F.mse_loss(model(x_t, t, y), target)

    def step():
        model.zero_grad(set_to_none=True)
        loss().backward()

    return {"model": model, "loss": loss, "step": step}


def time_round_robin(built: dict[str, dict], warmup: int, iters: int) -> dict[str, float]:
    """Median ms per variant, the variants interleaved in every round so that load changes on the shared
    machine hit all of them alike."""
    for b in built.values():
        for _ in range(warmup):
            b["step"]()
    times: dict[str, list[float]] = {name: [] for name in built}
    for _ in range(iters):
        for name, b in built.items():
            times[name].append(C.time_ms(b["step"], torch.device("cpu"), warmup=0, iters=1))
    return {name: statistics.median(ts) for name, ts in times.items()}


def measure_memory(b: dict) -> dict:
    model = b["model"]
    model.zero_grad(set_to_none=True)
    gc.collect()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = saved_for_backward_mib(b["loss"], params)
    gc.collect()
    peak = profiled_peak_mib(b["step"])
    model.zero_grad(set_to_none=True)
    return {"saved_mib": saved, "peak_mib": peak, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "sources": sources_read(model)}


def run_size(size: types.SimpleNamespace, names: list[str], args) -> dict[str, dict]:
    built = {name: build_variant(name, size) for name in names}
    ms = time_round_robin(built, args.warmup, args.iters)
    results = {name: {"ms": ms[name], **measure_memory(built[name])} for name in names}
    del built
    gc.collect()
    return results


def resolve_sizes(args) -> dict[str, types.SimpleNamespace]:
    custom = {k: getattr(args, k) for k in CUSTOM_FLAGS if getattr(args, k) is not None}
    if custom:  # one custom size on top of the teacher shape
        return {"custom": types.SimpleNamespace(**{**SIZES["teacher"], **custom})}
    names = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [n for n in names if n not in SIZES]
    if unknown or not names:
        raise UserError(f"--sizes takes a comma list of {', '.join(SIZES)} (got {args.sizes!r}); or give --depth/--hidden/... for one custom size")
    return {n: types.SimpleNamespace(**SIZES[n]) for n in names}


def describe(size: types.SimpleNamespace) -> str:
    tokens = (size.input_size // size.patch) ** 2
    return (f"depth={size.depth} ({2 * size.depth} sublayers) hidden={size.hidden} heads={size.heads} patch={size.patch} "
            f"image={size.channels}x{size.input_size}x{size.input_size} ({tokens} tokens) batch={size.batch}")


@cli_main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma list of presets: {', '.join(SIZES)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of: {', '.join(VARIANTS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the dev machine is shared)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per variant")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per variant (the median is reported)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    for flag in CUSTOM_FLAGS:
        parser.add_argument("--" + flag.replace("_", "-"), type=int, default=None, help="custom size (default: the teacher preset's)")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.warmup < 0 or args.iters < 1:
        raise UserError("--threads and --iters must be >= 1, --warmup >= 0")
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or "residual" not in names:
        raise UserError(f"--variants must include 'residual' and only names from: {', '.join(VARIANTS)} (got {unknown or names})")
    sizes = resolve_sizes(args)
    torch.set_num_threads(args.threads)
    args.device = "cpu"
    C.header("routing overhead on the CPU: forward+backward, residual vs DAR", args, torch.device("cpu"),
             f"fp32, reference aggregation (backend auto = torch on the CPU), warmup={args.warmup} iters={args.iters}; "
             "c4 = chunk_size 4, summary sum")
    payload = {"device": C.device_name(torch.device("cpu")), "args": vars(args), "sizes": {}}
    for size_name, size in sizes.items():
        print(f"\n-- {size_name}: {describe(size)}")
        results = run_size(size, names, args)
        base = results["residual"]
        print(f"{'variant':<20} {'params M':>8} {'sources':>7} {'fwd+bwd ms':>10} {'x time':>7} "
              f"{'saved MiB':>9} {'x saved':>7} {'peak MiB':>8} {'x peak':>6}")
        for name, r in results.items():
            r["time_ratio"] = C.ratio(r["ms"], base["ms"])
            r["saved_ratio"] = C.ratio(r["saved_mib"], base["saved_mib"])
            r["peak_ratio"] = C.ratio(r["peak_mib"], base["peak_mib"])
            print(f"{name:<20} {r['params_m']:>8.2f} {r['sources']:>7d} {r['ms']:>10.1f} {C.fmt(r['time_ratio'], '.2f'):>7} "
                  f"{r['saved_mib']:>9.1f} {C.fmt(r['saved_ratio'], '.2f'):>7} {r['peak_mib']:>8.1f} {C.fmt(r['peak_ratio'], '.2f'):>6}")
        payload["sizes"][size_name] = {"shape": vars(size), "results": results}
    print("\nsources = sources read, summed over all aggregators; saved = autograd saved tensors; "
          "peak = allocator peak during fwd+bwd above the resting state")
    C.write_json(args.json, payload)


if __name__ == "__main__":
    main()
