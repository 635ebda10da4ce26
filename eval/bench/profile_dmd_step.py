"""Where one DMD student update of the main job spends its time on the CPU (torch.profiler breakdown).

Builds what `dmd_dar.dmd.trainer.distill_arm` builds for configs/default.yaml (the bundled teacher, the
student with the chosen routing, the residual fake score, AdamW, EMA, the real `DMD` method object) and
times `DMD.train_step` + `EMA.update`, i.e. one loop step without logging or evaluation.

Three modes:

- timing (default): --steps steps after --warmup, wall time per step (median), no profiler;
- --profile: one profiled step after the warm-up. Every op is attributed to its innermost label, forward
  ops through `record_function` scopes (model: student / teacher / fake; part: routing, attention, mlp,
  adaLN, the rest of the sublayer), backward ops through their autograd node's sequence number (the forward
  op that created the node), so the backward time lands in the same part as its forward. The phases of the
  step (fake generation, fake loss, fake backward, optimiser steps, student loss, student backward, EMA) are
  labelled too.
- --ab-baseline PATH: an A/B in one process. Three arms are built (residual student, DAR student with the
  aggregation of PATH, a copy of `dmd_dar/routing/kernels/reference.py` from before a change, and DAR with
  this tree's) and stepped round-robin, one step each per round, so the load of a shared machine hits all
  alike; the median s/step per arm is printed. The baseline arm calls the baseline's `aggregate_sources`
  as the router called it before the per-forward `SourceCache` (`bench_routing_ab.baseline_aggregation`).

    python eval/bench/profile_dmd_step.py --profile                       # DAR dense static_t (the main job)
    python eval/bench/profile_dmd_step.py --profile --set student.routing.mode=residual
    python eval/bench/profile_dmd_step.py --steps 6 --json out.json       # timing only
    git show HEAD:dmd_dar/routing/kernels/reference.py > /tmp/reference_base.py
    python eval/bench/profile_dmd_step.py --ab-baseline /tmp/reference_base.py --steps 5
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.profiler import record_function  # noqa: E402

PARTS = ("routing", "attention", "mlp", "adaLN", "sublayer_rest")


def build(config: Path, overrides: list[str]):
    """The pieces of one arm, as `distill_arm` makes them (single process, CPU, no resume, no evaluation)."""
    from accelerate import Accelerator

    from dmd_dar.config import load_config
    from dmd_dar.dmd.config import DistillConfig
    from dmd_dar.dmd.family import make_family
    from dmd_dar.dmd.method import DMD, FakeScore, Optimised
    from dmd_dar.models.lora import ROUTER_PREFIXES
    from dmd_dar.training import EMA, local_slice, make_optimizer

    cfg = load_config(config, overrides, DistillConfig)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=True)
    family = make_family(cfg.backbone, cfg.teacher, accelerator.device, cfg.t2i)
    routing = next(iter(cfg.arm_routings().values()))  # the first arm (configs/default.yaml has one: dar)
    torch.manual_seed(cfg.seed)
    student = family.trainable(routing, cfg.student.lora_rank)
    student.gradient_checkpointing = cfg.student.gradient_checkpointing
    fake_model = family.trainable(cfg.fake.routing, cfg.fake.lora_rank)
    trained = [(name, p) for name, p in student.named_parameters() if p.requires_grad]
    router = [p for name, p in trained if name.startswith(ROUTER_PREFIXES)]
    others = [p for name, p in trained if not name.startswith(ROUTER_PREFIXES)]
    groups = [{"params": others}, {"params": router, "lr": cfg.student.optim.lr * cfg.student.router_lr_scale}]
    student_opt = make_optimizer([g for g in groups if g["params"]], cfg.student.optim)
    fake_params = [p for p in fake_model.parameters() if p.requires_grad]
    fake_opt = make_optimizer(fake_params, cfg.fake.optim)
    ema = EMA(student, cfg.student.ema_decay) if cfg.student.ema_decay > 0 else None
    student, fake_model, student_opt, fake_opt = accelerator.prepare(student, fake_model, student_opt, fake_opt)
    method = DMD(cfg, family, accelerator, student, fake=FakeScore(family, fake_model), fake_unwrapped=FakeScore(family, fake_model),
                 student_opt=Optimised([p for _, p in trained], student_opt, cfg.student.optim.grad_clip),
                 fake_opt=Optimised(fake_params, fake_opt, cfg.fake.optim.grad_clip),
                 local=local_slice(cfg.batch_size, 0, 1))
    models = {"student": accelerator.unwrap_model(student), "teacher": family.teacher(), "fake": fake_model}
    return cfg, routing, method, ema, models


def label(name: str, fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)

    return wrapped


def instrument(method, ema, models) -> None:
    """record_function labels on instances only (nothing global is patched, the library is untouched)."""
    for name, model in models.items():
        model.forward = label(f"model:{name}", model.forward)
        router = model.router
        router._aggregate = label("part:routing", router._aggregate)
        router.start = label("part:routing", router.start)
        for block in model.blocks:
            block.attn.forward = label("part:attention", block.attn.forward)
            block.mlp.forward = label("part:mlp", block.mlp.forward)
            block.modulation = label("part:adaLN", block.modulation)
            block.attention_sublayer = label("part:sublayer_rest", block.attention_sublayer)
            block.mlp_sublayer = label("part:sublayer_rest", block.mlp_sublayer)
    orig_update = method.update

    def update(loss, what):
        tag = "fake" if what is method.fake_opt else "student"
        opt = what.optimizer
        step = opt.step
        opt.step = label(f"phase:{tag} optimizer step", step)
        try:
            with record_function(f"phase:{tag} backward+clip"):
                return orig_update(loss, what)
        finally:
            opt.step = step

    method.update = update
    method.generate = label("phase:generate (student fwd)", method.generate)
    method.fake_score_loss = label("phase:fake loss fwd", method.fake_score_loss)
    method.student_loss = label("phase:student loss fwd", method.student_loss)
    if ema is not None:
        ema.update = label("phase:ema update", ema.update)


def one_step(method, ema, models, step: int) -> None:
    method.train_step(step)
    if ema is not None:
        ema.update(models["student"])


def _labels(event) -> list[str]:
    names = []
    e = event
    while e is not None:
        if e.name.startswith(("model:", "part:", "phase:")):
            names.append(e.name)
        e = e.cpu_parent
    return names


def attribute(prof) -> dict:
    """ms per (phase, model, part) from the profiled events (self CPU time of every op)."""
    events = list(prof.events())
    fwd_labels: dict[tuple[int, int], list[str]] = {}
    for e in events:
        if e.sequence_nr is not None and e.sequence_nr >= 0 and not e.name.startswith("autograd::engine"):
            labels = _labels(e)
            key = (e.thread, e.sequence_nr)
            if labels and (key not in fwd_labels or len(labels) > len(fwd_labels[key])):
                fwd_labels[key] = labels
    table: dict[tuple[str, str, str], float] = collections.defaultdict(float)
    for e in events:
        if e.name.startswith(("model:", "part:", "phase:")):
            continue
        labels = _labels(e)
        phase = next((n[6:] for n in labels if n.startswith("phase:")), "other")
        model = next((n[6:] for n in labels if n.startswith("model:")), "-")
        part = next((n[5:] for n in labels if n.startswith("part:")), "-")
        if "backward" in phase:  # backward op: find the forward op that created its autograd node
            anc = e
            while anc is not None and not anc.name.startswith("autograd::engine::evaluate_function"):
                anc = anc.cpu_parent
            if anc is not None:
                node = next((c for c in anc.cpu_children if c.sequence_nr is not None and c.sequence_nr >= 0), None)
                fwd = fwd_labels.get((node.fwd_thread if node.fwd_thread is not None else anc.thread, node.sequence_nr)) if node else None
                if fwd:
                    model = next((n[6:] for n in fwd if n.startswith("model:")), model)
                    part = next((n[5:] for n in fwd if n.startswith("part:")), part)
        table[(phase, model, part)] += e.self_cpu_time_total / 1e3
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "default.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="timed steps (timing mode)")
    parser.add_argument("--profile", action="store_true", help="profile one step and print the breakdown")
    parser.add_argument("--ab-baseline", type=Path, default=None, help="a reference.py to A/B against (see above)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.ab_baseline is not None:
        return ab(args)
    cfg, routing, method, ema, models = build(args.config, ["teacher=bundled", *args.set])
    print(f"routing {routing.to_dict()}  batch {cfg.batch_size}  fake updates {cfg.fake.updates_per_student_step}  "
          f"threads {torch.get_num_threads()}  load {os.getloadavg()[0]:.2f}  torch {torch.__version__}  dmd_dar from "
          f"{Path(sys.modules['dmd_dar'].__file__).parent}")
    for s in range(args.warmup):
        one_step(method, ema, models, s)
    payload = {"routing": routing.to_dict(), "load_start": os.getloadavg()[0]}
    if not args.profile:
        times = []
        for s in range(args.steps):
            start = time.perf_counter()
            one_step(method, ema, models, args.warmup + s)
            times.append(time.perf_counter() - start)
        payload.update(step_s=times, median_s=statistics.median(times), load_end=os.getloadavg()[0])
        print(f"s/step median {statistics.median(times):.3f}  all {[round(t, 3) for t in times]}  load {os.getloadavg()[0]:.2f}")
    else:
        from torch.profiler import ProfilerActivity, profile

        instrument(method, ema, models)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            one_step(method, ema, models, args.warmup)
            wall = time.perf_counter() - start
        table = attribute(prof)
        total = sum(table.values())
        print(f"profiled step: wall {wall * 1e3:.0f} ms (with profiler), attributed self CPU {total:.0f} ms")
        by_phase = collections.defaultdict(float)
        by_model_part = collections.defaultdict(float)
        for (phase, model, part), ms in table.items():
            by_phase[phase] += ms
            by_model_part[(model, part)] += ms
        print(f"\n{'phase':<32} {'ms':>8} {'share':>6}")
        for phase, ms in sorted(by_phase.items(), key=lambda kv: -kv[1]):
            print(f"{phase:<32} {ms:>8.1f} {ms / total:>6.1%}")
        print(f"\n{'model / part (fwd + its bwd)':<32} {'ms':>8} {'share':>6}")
        for (model, part), ms in sorted(by_model_part.items(), key=lambda kv: -kv[1]):
            print(f"{model + ' / ' + part:<32} {ms:>8.1f} {ms / total:>6.1%}")
        ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        print("\n" + ops)
        payload.update(wall_ms=wall * 1e3, total_ms=total, phases=dict(by_phase),
                       parts={f"{m}/{p}": v for (m, p), v in by_model_part.items()})
    if args.json:
        args.json.write_text(json.dumps(payload, indent=2))


def ab(args) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_routing_ab import baseline_aggregation, load_baseline

    base = load_baseline(args.ab_baseline)
    arms = {"residual": build(args.config, ["teacher=bundled", *args.set, "student.routing.mode=residual"]),
            "dar (baseline aggregation)": build(args.config, ["teacher=bundled", *args.set]),
            "dar": build(args.config, ["teacher=bundled", *args.set])}
    cfg, routing = arms["dar"][0], arms["dar"][1]
    print(f"A/B in one process: student routing {routing.to_dict()}, batch {cfg.batch_size}, fake updates "
          f"{cfg.fake.updates_per_student_step}, {torch.get_num_threads()} thread(s), baseline {args.ab_baseline}, "
          f"load {os.getloadavg()[0]:.2f}")
    times: dict[str, list[float]] = {name: [] for name in arms}
    cpu: dict[str, list[float]] = {name: [] for name in arms}
    loads = []
    for r in range(args.warmup + args.steps):
        for name, (_, _, method, ema, models) in arms.items():
            ctx = baseline_aggregation(base) if "baseline" in name else contextlib.nullcontext()
            start, start_cpu = time.perf_counter(), time.process_time()
            with ctx:
                one_step(method, ema, models, r)
            if r >= args.warmup:
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
        loads.append(os.getloadavg()[0])
        print(f"  round {r + 1}: " + "  ".join(f"{n} {times[n][-1]:.2f} (cpu {cpu[n][-1]:.2f})" for n in arms if times[n])
              + f"  load {loads[-1]:.2f}", flush=True)
    res, res_cpu = statistics.median(times["residual"]), statistics.median(cpu["residual"])
    print(f"{'arm':<28} {'wall s/step':>11} {'x res':>6} {'CPU s/step':>10} {'x res':>6}   (medians of {args.steps} rounds after "
          f"{args.warmup} warm-up, load {min(loads):.2f}-{max(loads):.2f})")
    for name in arms:
        w, c = statistics.median(times[name]), statistics.median(cpu[name])
        print(f"{name:<28} {w:>11.3f} {w / res:>6.2f} {c:>10.3f} {c / res_cpu:>6.2f}")
    print("CPU s = process CPU time (1 torch thread): what the step costs when the cores are not shared; wall s includes "
          "the waits of an oversubscribed machine")
    if args.json:
        args.json.write_text(json.dumps({"wall_s": times, "cpu_s": cpu, "loads": loads, "routing": routing.to_dict()}, indent=2))


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
