"""A/B of the CPU aggregation in one process: this tree's reference path vs a baseline `reference.py`.

On a shared machine, separate runs of the same code differ by more than the change being measured. This
script builds one DiT per variant (bundled-teacher shape, random weights, non-zero DAR queries) and runs
them round-robin in the same process, so load changes hit every variant alike. The baseline is another
copy of `dmd_dar/routing/kernels/reference.py` (e.g. the file before a change, from `git show
HEAD:dmd_dar/routing/kernels/reference.py > /tmp/reference_base.py`): its `aggregate_sources` replaces the
router's aggregation for the "dar ... (baseline)" variants, called exactly as the router called it before
the per-forward `SourceCache` existed (no cache). Variants:

    residual                       the residual DiT
    dar dense static_t (baseline)  DAR with the baseline aggregation
    dar dense static_t             DAR with this tree's aggregation (SourceCache, matvec logits, _MixSources)

Measured per round: forward+backward of the flow-matching loss, and a no-grad forward (the generation
the DMD fake-score updates do). Median over --rounds rounds after --warmup rounds.

    python eval/bench/bench_routing_ab.py --baseline /tmp/reference_base.py
    python eval/bench/bench_routing_ab.py --baseline /tmp/reference_base.py --query dynamic --chunk-size 4 --summary sum
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import dmd_dar.routing as routing_module  # noqa: E402
from dmd_dar.routing import RoutingConfig  # noqa: E402

TEACHER = dict(depth=6, hidden=128, heads=4, patch=4, input_size=32, channels=1, num_classes=10, batch=64)


def load_baseline(path: Path):
    spec = importlib.util.spec_from_file_location("baseline_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def baseline_aggregation(module):
    """The router's `aggregate` replaced by the baseline's list aggregation (its cache argument ignored)."""
    current = routing_module.aggregate

    def old(values, query, key_weight, eps=1e-6, backend="auto", cache=None):
        return module.aggregate_sources(list(values), query, key_weight, eps)

    routing_module.aggregate = old
    try:
        yield
    finally:
        routing_module.aggregate = current


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--baseline", type=Path, required=True, help="a copy of reference.py to compare against")
    parser.add_argument("--query", default="static_t")
    parser.add_argument("--chunk-size", type=int, default=1)
    parser.add_argument("--summary", default="last")
    parser.add_argument("--batch", type=int, default=TEACHER["batch"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = load_baseline(args.baseline)
    size = types.SimpleNamespace(**{**TEACHER, "batch": args.batch})
    dar = RoutingConfig(mode="dar", query=args.query, chunk_size=args.chunk_size, summary=args.summary)
    tag = f"dar {'dense' if args.chunk_size == 1 else f'c{args.chunk_size}'} {args.query}"
    models = {"residual": C.build_dit(size, RoutingConfig(mode="residual"), torch.device("cpu"))}
    models[tag + " (baseline)"] = C.build_dit(size, dar, torch.device("cpu"))
    C.randomise_router(models[tag + " (baseline)"])
    models[tag] = C.build_dit(size, dar, torch.device("cpu"))
    models[tag].load_state_dict(models[tag + " (baseline)"].state_dict())
    x_t, t, y, target = C.flow_matching_batch(size)

    def context(name):
        return baseline_aggregation(base) if name.endswith("(baseline)") else contextlib.nullcontext()

    def fwd_bwd(name):
        model = models[name]
        model.zero_grad(set_to_none=True)
        with context(name):
            F.mse_loss(model(x_t, t, y), target).backward()

    def fwd(name):
        with torch.no_grad(), context(name):
            models[name](x_t, t, y)

    # the two DAR variants must agree (float rounding only); the head is zero-initialised: compare what it reads
    with torch.no_grad():
        with context(tag + " (baseline)"):
            a = models[tag + " (baseline)"](x_t, t, y, return_hidden=True).hidden
        b = models[tag](x_t, t, y, return_hidden=True).hidden
    max_diff = (a - b).abs().max().item()
    times = {(name, kind): [] for name in models for kind in ("fwd+bwd", "fwd")}
    cpu = {key: [] for key in times}
    for r in range(args.warmup + args.rounds):
        for name in models:
            for kind, fn in (("fwd+bwd", fwd_bwd), ("fwd", fwd)):
                start, start_cpu = time.perf_counter(), time.process_time()
                fn(name)
                if r >= args.warmup:
                    times[(name, kind)].append((time.perf_counter() - start) * 1e3)
                    cpu[(name, kind)].append((time.process_time() - start_cpu) * 1e3)
    print(f"== routing A/B on the CPU, one process, round-robin: {tag}, batch {size.batch}, teacher shape "
          f"(depth {size.depth}, width {size.hidden}, {(size.input_size // size.patch) ** 2} tokens), {torch.get_num_threads()} thread(s)")
    print(f"baseline: {args.baseline}  rounds {args.rounds} (+{args.warmup} warm-up)  load average {os.getloadavg()[0]:.2f}  "
          f"max |hidden baseline - hidden| = {max_diff:.2e}")
    for clock, data in (("wall", times), ("CPU", cpu)):
        med = {k: statistics.median(v) for k, v in data.items()}
        print(f"{clock + ' time: variant':<34} {'fwd+bwd ms':>10} {'x res':>6} {'routing ms':>10} {'fwd ms':>8} {'x res':>6} {'routing ms':>10}")
        for name in models:
            fb, f = med[(name, "fwd+bwd")], med[(name, "fwd")]
            rfb, rf = fb - med[("residual", "fwd+bwd")], f - med[("residual", "fwd")]
            print(f"{name:<34} {fb:>10.1f} {fb / med[('residual', 'fwd+bwd')]:>6.2f} {rfb:>10.1f} {f:>8.1f} "
                  f"{f / med[('residual', 'fwd')]:>6.2f} {rf:>10.1f}")
    print("routing ms = the variant's median minus the residual model's (the cost of DAR's aggregation); CPU = process CPU "
          "time (1 thread: what it costs when the cores are not shared), wall includes the waits of an oversubscribed machine")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "max_diff": max_diff,
                                         "wall_ms": {f"{n}|{k}": v for (n, k), v in times.items()},
                                         "cpu_ms": {f"{n}|{k}": v for (n, k), v in cpu.items()}}, indent=2))


if __name__ == "__main__":
    main()
