"""DMD step on the CPU with the real trainer: seconds and peak memory per student step, residual vs DAR.

Issue 4 item 9. Each variant is two `dmd_dar.dmd.trainer.run_distillation` runs (configs/default.yaml plus the
overrides below), each in a fresh subprocess with --threads torch threads: one for time (--steps steps),
one for memory (--memory-steps steps, with the precautions below, which slow allocations down). A
"student step" is what the trainer's loop does per step: `fake.updates_per_student_step` fake-score updates
(each generates a detached student batch) and one student update (student forward+backward, the teacher's
CFG score and the fake score on the noised samples).

- s/step: from `<out>/<arm>/log.csv` (log_every=1): the median of the `elapsed_s` differences of steps
  2..N-1 (step 1 is the warm-up; step N also runs the end-of-training metrics). `train_seconds` of
  `summary.json` (everything in the arm, warm-up, final samples and export included) is printed alongside.
- peak RSS (the memory run): the child's peak resident set size during run_distillation (VmHWM, reset via
  /proc/self/clear_refs just before the run; getrusage's ru_maxrss otherwise) minus the RSS at that moment.
  A process-level measure (the CPU has no allocator peak counter like CUDA's): it includes the teacher,
  student, fake score, optimiser states and activations. Two precautions keep it about tensors: the child
  first does a tiny warm-up run (batch 2, 2 steps), so that the library code pages, which count towards
  RSS when first touched, are already resident; and it runs with MALLOC_MMAP_THRESHOLD_=131072, so freed
  large buffers go back to the OS instead of malloc's caches.

The evaluation is shrunk so it does not blur the figures (no spectral report, 10 grid/hf images, 2 teacher
sampler steps for the setup grids; none of this touches the training steps).

    python eval/bench/bench_distill_cpu.py                      # residual, DAR dense, DAR c4 (static_t); 12 steps each
    python eval/bench/bench_distill_cpu.py --steps 20 --variants residual,"dar dense static_t"
    python eval/bench/bench_distill_cpu.py --set batch_size=16 --set fake.updates_per_student_step=1
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dmd_dar.errors import UserError, cli_main  # noqa: E402

VARIANTS = {
    "residual": ["arms=[residual]"],
    "dar dense static_t": ["arms=[dar]", "student.routing.query=static_t", "student.routing.chunk_size=1"],
    "dar dense dynamic": ["arms=[dar]", "student.routing.query=dynamic", "student.routing.chunk_size=1"],
    "dar c4 static_t": ["arms=[dar]", "student.routing.query=static_t", "student.routing.chunk_size=4", "student.routing.summary=sum"],
    "dar c4 dynamic": ["arms=[dar]", "student.routing.query=dynamic", "student.routing.chunk_size=4", "student.routing.summary=sum"],
}
DEFAULT_VARIANTS = ("residual", "dar dense static_t", "dar c4 static_t")
NEVER = str(10**9)  # a step count the run never reaches
RESULT_MARK = "BENCH_RESULT "


# ------------------------------------------------------------------------------------------- child
def rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (and ru_maxrss) to the current RSS
        return True
    except OSError:
        return False


def step_seconds(log_csv: Path) -> dict:
    with open(log_csv) as f:
        rows = [(int(r["step"]), float(r["elapsed_s"])) for r in csv.DictReader(f) if r.get("elapsed_s")]
    rows.sort()
    elapsed = dict(rows)
    last = rows[-1][0]
    diffs = [elapsed[s] - elapsed[s - 1] for s in range(2, last) if s in elapsed and s - 1 in elapsed]
    return {"first_step_s": elapsed.get(1), "step_s_median": statistics.median(diffs) if diffs else None,
            "step_s_mean": statistics.fmean(diffs) if diffs else None, "timed_steps": len(diffs)}


def child(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    from dmd_dar.config import load_config
    from dmd_dar.dmd.config import DistillConfig
    from dmd_dar.dmd.trainer import run_distillation

    # A tiny warm-up run first (same variant, batch 2, 2 steps): it pages in the code of torch, oneDNN,
    # accelerate, safetensors... which counts towards RSS the first time and would otherwise swamp the delta.
    if spec["warmup_overrides"]:
        run_distillation(load_config(spec["config"], spec["warmup_overrides"], DistillConfig))
    cfg = load_config(spec["config"], spec["overrides"], DistillConfig)
    peak_reset = reset_peak_rss()
    rss_before = rss_kib("VmRSS")
    start = time.time()
    summary = run_distillation(cfg)
    wall = time.time() - start
    peak = rss_kib("VmHWM") if peak_reset else None
    peak = peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    (arm,) = summary["arms"]
    out = Path(cfg.out_dir) / arm
    result = {"arm": arm, "routing": summary["arms"][arm]["routing"], "train_seconds": summary["arms"][arm]["train_seconds"],
              "steps": cfg.steps, "batch_size": cfg.batch_size, "fake_updates": cfg.fake.updates_per_student_step,
              "run_seconds": round(wall, 1), "rss_before_mib": rss_before / 1024 if rss_before else None,
              "peak_rss_mib": peak / 1024, "peak_rss_delta_mib": (peak - rss_before) / 1024 if rss_before else None,
              "peak_measure": "VmHWM after clear_refs" if peak_reset else "ru_maxrss (since process start)",
              "threads": torch.get_num_threads(), **step_seconds(out / "log.csv")}
    print(RESULT_MARK + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------- parent
def resolve_teacher(choice: str, workdir: Path) -> tuple[str, str]:
    """(value for teacher=, what to print). A checkpoint of a teacher still training is copied first: the
    trainer rotates its checkpoints (keep_last) and could delete the folder during the benchmark."""
    bundled = REPO / "dmd_dar" / "assets" / "teacher" / "model.safetensors"
    if choice == "auto":
        if bundled.is_file():
            return "bundled", f"bundled ({bundled.parent})"
        ckpts = sorted((REPO / "runs" / "teacher_mnist" / "checkpoints").glob("step_*/ema"))
        if not ckpts:
            raise UserError("no teacher: dmd_dar/assets/teacher/model.safetensors is missing and runs/teacher_mnist has "
                            "no checkpoints/step_*/ema; pass --teacher <DiT folder>")
        choice = str(ckpts[-1])
    if choice == "bundled":
        return "bundled", f"bundled ({bundled.parent})"
    source = Path(choice)
    if not (source / "model.safetensors").is_file():
        raise UserError(f"--teacher {choice}: no model.safetensors there; pass a DiT folder or 'bundled'")
    copy = workdir / "teacher"
    shutil.copytree(source, copy)
    return str(copy), f"{source} (copied to {copy})"


def overrides_value(overrides: list[str], key: str) -> str:
    return [o.split("=", 1)[1] for o in overrides if o.startswith(key + "=")][-1]


def run_child(name: str, overrides: list[str], args, memory: bool) -> dict:
    """One run in a fresh process. memory=True: the warm-up run and the malloc setting for the RSS measure
    (every large buffer a fresh mmap: more page faults, so its timings are not the ones reported)."""
    warmup = [*overrides, "out_dir=" + overrides_value(overrides, "out_dir") + "_warmup", "steps=2", "batch_size=2"]
    spec = {"config": str(args.config), "overrides": overrides, "threads": args.threads,
            "warmup_overrides": warmup if memory else None}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    if memory:
        # A fixed mmap threshold turns off glibc's adaptive one: every buffer >= 128 KiB is mmap'd and returned
        # to the OS when freed, so the RSS follows the live tensors instead of what malloc keeps for reuse.
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)], cwd=REPO,
                          env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        raise UserError(f"variant {name!r}: the distillation run failed (exit {proc.returncode}); its output ends with:\n{tail}")
    return json.loads(lines[-1][len(RESULT_MARK):])


def fmt(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


@cli_main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "default.yaml")
    parser.add_argument("--steps", type=int, default=12, help="student steps per variant (>= 4: step 1 and step N are not timed)")
    parser.add_argument("--memory-steps", type=int, default=3, help="student steps of the separate memory run (>= 1)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list of: {', '.join(VARIANTS)}")
    parser.add_argument("--teacher", default="auto", help="'auto' (bundled if present, else the latest "
                        "runs/teacher_mnist/checkpoints/*/ema), 'bundled', or a DiT folder")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (default 1: the machine is shared)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override (repeatable)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the run folders (printed) instead of deleting them")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        return child(json.loads(args.child))
    if args.steps < 4 or args.threads < 1 or args.memory_steps < 1:
        raise UserError("--steps must be >= 4, --memory-steps and --threads >= 1")
    if not args.config.is_file():
        raise UserError(f"config {args.config} not found; pass --config configs/<name>.yaml")
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or "residual" not in names:
        raise UserError(f"--variants must include 'residual' and only names from: {', '.join(VARIANTS)} (got {unknown or names})")

    import platform

    import torch

    workdir = Path(tempfile.mkdtemp(prefix="bench_distill_"))
    try:
        teacher, teacher_note = resolve_teacher(args.teacher, workdir)
        print("== DMD student step on the CPU: residual vs DAR (real trainer, dmd_dar.dmd.trainer.run_distillation)")
        print(f"date: {time.strftime('%Y-%m-%dT%H:%M:%S')}  CPU {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} logical CPUs, {args.threads} torch thread(s)  torch {torch.__version__}  "
              f"python {platform.python_version()}  load average {os.getloadavg()[0]:.2f}")
        print("command: " + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
        print(f"teacher: {teacher_note}")
        results = {}
        for i, name in enumerate(names):
            overrides = [f"teacher={teacher}", f"out_dir={workdir / f'run{i}'}", f"steps={args.steps}", "log_every=1",
                         f"sample_every={NEVER}", f"checkpoint_every={NEVER}", "resume=false", "eval.report_samples=0",
                         f"eval.every={NEVER}", "eval.quality=false", "eval.grid_images=10", "eval.batch=10", "eval.teacher_steps=2",
                         *VARIANTS[name], *args.set]
            r = run_child(name, overrides, args, memory=False)
            mem_overrides = [o if not o.startswith("steps=") else f"steps={args.memory_steps}" for o in overrides]
            mem_overrides = [o if not o.startswith("out_dir=") else o + "_memory" for o in mem_overrides]
            mem = run_child(name, mem_overrides, args, memory=True)
            r.update({k: mem[k] for k in ("rss_before_mib", "peak_rss_mib", "peak_rss_delta_mib", "peak_measure")})
            results[name] = r
            r["load_average"] = os.getloadavg()[0]
            print(f"  {name}: done in {r['run_seconds']} s (load average {r['load_average']:.2f})", flush=True)
        first = next(iter(results.values()))
        print(f"config: {args.config.name}, batch {first['batch_size']}, {first['fake_updates']} fake updates per student "
              f"step, {args.steps} steps; timed: steps 2..{args.steps - 1} ({first['timed_steps']} intervals)")
        base = results["residual"]
        print(f"{'variant':<20} {'s/step':>7} {'x time':>7} {'mean s':>7} {'step 1 s':>8} {'train_s':>8} "
              f"{'peak RSS MiB':>12} {'x mem':>6} {'RSS before':>10}")
        for name, r in results.items():
            r["time_ratio"] = r["step_s_median"] / base["step_s_median"] if base["step_s_median"] and r["step_s_median"] else None
            r["mem_ratio"] = r["peak_rss_delta_mib"] / base["peak_rss_delta_mib"] if base["peak_rss_delta_mib"] and r["peak_rss_delta_mib"] else None
            print(f"{name:<20} {fmt(r['step_s_median'], '.3f'):>7} {fmt(r['time_ratio'], '.2f'):>7} {fmt(r['step_s_mean'], '.3f'):>7} "
                  f"{fmt(r['first_step_s'], '.2f'):>8} {r['train_seconds']:>8.1f} {fmt(r['peak_rss_delta_mib'], '.0f'):>12} "
                  f"{fmt(r['mem_ratio'], '.2f'):>6} {fmt(r['rss_before_mib'], '.0f'):>10}")
        print(f"peak RSS = {first['peak_measure']} during run_distillation, minus the RSS just before it (RSS before)")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"teacher": teacher_note, "args": {k: str(v) for k, v in vars(args).items()},
                                             "results": results}, indent=2))
    finally:
        if args.keep:
            print(f"run folders kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
