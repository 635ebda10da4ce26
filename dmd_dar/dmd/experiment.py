"""Experiments: every combination of seeds x arms x varied settings through the distillation job, resumable, with
statistics across seeds and the paired comparison of the arms (docs/distillation.md, "Experiments").

CLI: `scripts/experiment.py --config X --seeds 0,1,2 --arms residual,dar [--vary key=v1,v2 ...] --out DIR`.

- An **arm** is a named student routing (`ARMS`, the one table): `residual`, `dar` (the config's own
  `student.routing` in DAR mode) and the ablations of docs/results.md. Each run distills one arm
  (`run_distillation` with `arms=[]` and the arm's `student.routing.*` keys) into `DIR/runs/<run>/`.
- Runs of the same seed share every random draw (noises, times, labels, data order and the report's samples
  are functions of (seed, step, stream), `dmd_dar.training.step_generator`), so arms are compared **paired**:
  the interval of the per-seed difference, not the difference of two intervals.
- A run is finished when its `run.json` exists and records the same resolved config (on every key both have: a
  key the schema gained since does not count); finished runs are skipped. Anything else is (re)started through
  the trainer, which resumes from its newest checkpoint.
- From each run: the quality of the report samples (`quality.json`: classifier FD / accuracy / precision /
  recall, or FID / KID / precision / recall in Inception space), the spectral metrics (`report/metrics.json`:
  HF retention per cutoff, energy per band, LSD, slope) and the detail metrics (`evaluate_detail`: high-pass FD
  and KID, patch FID for large images), for the student and for the teacher's multi-step samples.
- `DIR/experiment.json`, `DIR/results.md`, `DIR/results.html` are rewritten after every finished run: per arm the
  mean and the t interval across seeds, the paired differences arm - baseline per seed with their t interval,
  HF retention against FD for every run, and the per-band energy ratios per arm.
"""
from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import hashlib
import html
import io
import itertools
import math
import multiprocessing
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmd_dar.checkpoint import read_json, run_lock, write_json
from dmd_dar.config import load_config, to_dict
from dmd_dar.dmd.config import DistillConfig
from dmd_dar.errors import UserError
from dmd_dar.metrics.stats import Interval, paired_interval, t_interval

__all__ = [
    "ARMS",
    "RunSpec",
    "ExperimentPlan",
    "parse_list",
    "parse_vary",
    "plan_experiment",
    "run_experiment",
    "collect_run",
    "summarise",
    "write_results",
]

# The arms: name -> the student.routing keys it sets (merged onto the config's student.routing).
# "dar" is the config's own DAR routing (only the mode is forced); the others fix every key that defines them.
ARMS: dict[str, dict[str, Any]] = {
    "residual": {"mode": "residual"},
    "dar": {"mode": "dar"},
    "dar_dense_static": {"mode": "dar", "query": "static", "chunk_size": 1},
    "dar_dense_static_t": {"mode": "dar", "query": "static_t", "chunk_size": 1},
    "dar_dense_dynamic": {"mode": "dar", "query": "dynamic", "chunk_size": 1},
    "dar_c4_sum": {"mode": "dar", "query": "static_t", "chunk_size": 4, "summary": "sum"},
    "dar_c4_last": {"mode": "dar", "query": "static_t", "chunk_size": 4, "summary": "last"},
}
# Keys the runner sets itself: a --vary or an override of these is refused.
RESERVED_KEYS = ("seed", "out_dir", "arms")
RUN_RECORD = "run.json"
RESULT_FILES = ("experiment.json", "results.md", "results.html")
# Columns of the tables, in order; a column appears when some run has the metric.
QUALITY_KEYS = ("fd", "fd_to_floor", "fid", "kid", "accuracy", "precision", "recall")
DETAIL_KEYS = ("hp_fd", "hp_kid", "patch_fid")
LABELS = {"fd": "FD", "fd_to_floor": "FD/floor", "fid": "FID", "kid": "KID", "accuracy": "accuracy",
          "precision": "precision", "recall": "recall", "hp_fd": "high-pass FD", "hp_kid": "high-pass KID",
          "patch_fid": "patch FID", "lsd_db": "LSD (dB)", "slope": "slope"}


def label(metric: str) -> str:
    if metric.startswith("hf_retention@"):
        return f"HF retention f>{metric.split('@')[1]}"
    if metric.startswith("band_ratio@"):
        return f"band {metric.split('@')[1]}"
    return LABELS.get(metric, metric)


# ------------------------------------------------------------------------------------------- the plan
def parse_list(text: str, what: str) -> list[str]:
    """Split `text` at commas outside brackets ("[1.0,0.5],[1.0]" -> two items); empty items are an error."""
    items, depth, current = [], 0, ""
    for ch in text:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    items.append(current)
    items = [item.strip() for item in items]
    if not all(items):
        raise UserError(f"{what}={text!r}: an empty item; give a comma-separated list such as 0,1,2")
    return items


def parse_vary(specs: Sequence[str]) -> list[tuple[str, list[str]]]:
    """["key=v1,v2", ...] -> [(key, [v1, v2]), ...] (each key once)."""
    out: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise UserError(f"--vary {spec!r}: expected key=v1,v2 (e.g. student.routing.query=static_t,dynamic)")
        if key in RESERVED_KEYS:
            raise UserError(f"--vary {key}: the runner sets {key} itself (use --seeds / --out / --arms)")
        if key in (k for k, _ in out):
            raise UserError(f"--vary {key} is given twice; list all its values in one --vary")
        out.append((key, parse_list(values, f"--vary {key}")))
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", text).strip("-")


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid: an arm, a seed and one value of each varied key."""

    name: str  # its folder under DIR/runs
    arm: str
    seed: int
    vary: tuple[tuple[str, str], ...]
    overrides: tuple[str, ...]  # the complete key=value list the run's config is loaded with

    @property
    def group(self) -> str:
        """The varied settings ("" when nothing is varied): arms are compared within a group."""
        return " ".join(f"{k}={v}" for k, v in self.vary)


@dataclass
class ExperimentPlan:
    config: str
    out: Path
    seeds: list[int]
    arms: list[str]
    vary: list[tuple[str, list[str]]]
    overrides: list[str]
    baseline: str | None
    confidence: float = 0.95
    runs: list[RunSpec] = field(default_factory=list)

    def run_dir(self, spec: RunSpec) -> Path:
        return self.out / "runs" / spec.name

    @property
    def groups(self) -> list[str]:
        return list(dict.fromkeys(spec.group for spec in self.runs))


def plan_experiment(config: str | os.PathLike, seeds: Sequence[int], arms: Sequence[str], out: str | os.PathLike, *,
                    vary: Sequence[tuple[str, Sequence[str]]] = (), overrides: Sequence[str] = (),
                    baseline: str | None = "residual", confidence: float = 0.95) -> ExperimentPlan:
    """Every combination (groups of varied values, then seeds, then arms, so each seed's pair completes early),
    with its config loaded once here: a bad key or value stops before any run starts."""
    if not seeds:
        raise UserError("no seeds given; pass e.g. --seeds 0,1,2")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"seeds {list(seeds)} list a seed twice")
    if not arms:
        raise UserError("no arms given; pass e.g. --arms residual,dar")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise UserError(f"unknown arm(s) {', '.join(unknown)}; the arms are: {', '.join(ARMS)}")
    if len(set(arms)) != len(arms):
        raise UserError(f"arms {list(arms)} list an arm twice")
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in RESERVED_KEYS:
            raise UserError(f"override {item!r}: the runner sets {key} itself (use --seeds / --out / --arms)")
    if baseline is not None and baseline not in arms:
        baseline = None  # no paired comparison without the baseline arm
    if not 0 < confidence < 1:
        raise UserError(f"confidence={confidence} must lie in (0, 1)")
    out = Path(out)
    plan = ExperimentPlan(str(config), out, list(seeds), list(arms), [(k, list(v)) for k, v in vary], list(overrides),
                          baseline, confidence)
    names: dict[str, RunSpec] = {}
    for values in itertools.product(*(v for _, v in plan.vary)):
        assignment = tuple(zip((k for k, _ in plan.vary), values))
        suffix = "".join(f"__{_slug(f'{k}={v}')}" for k, v in assignment)
        for seed in plan.seeds:
            for arm in plan.arms:
                name = f"{arm}_s{seed}{suffix}"
                routing = [f"student.routing.{k}={v}" for k, v in ARMS[arm].items()]
                # the arms of one seed share their teacher samples: sampled once, by the first run (a later override wins);
                # every run trains all its steps: a wall-clock cap would make arms differ by the machine's load
                run_overrides = (f"eval.teacher_cache={out / 'teacher_samples'}", "time_limit_min=0", *plan.overrides,
                                 *(f"{k}={v}" for k, v in assignment), *routing,
                                 f"seed={seed}", f"out_dir={out / 'runs' / name}", "arms=[]")
                spec = RunSpec(name, arm, int(seed), assignment, tuple(run_overrides))
                if name in names:
                    raise UserError(f"--vary values {names[name].group!r} and {spec.group!r} give the same run folder "
                                    f"{name}; make them differ in letters or digits")
                cfg = _load(plan, spec)
                if cfg.eval.report_samples <= 0:
                    raise UserError(f"run {name}: eval.report_samples={cfg.eval.report_samples}; the experiment measures "
                                    "the report's samples, set it > 0")
                names[name] = spec
    plan.runs = list(names.values())
    return plan


def _load(plan: ExperimentPlan, spec: RunSpec) -> DistillConfig:
    try:
        return load_config(plan.config, spec.overrides, DistillConfig)
    except UserError as err:
        raise type(err)(f"run {spec.name}: {err}") from None


def _comparable(cfg: DistillConfig) -> dict[str, Any]:
    """The resolved config a finished run is matched by (its folder may move with the experiment)."""
    data = to_dict(cfg)
    data.pop("out_dir")
    data["eval"].pop("teacher_cache", None)  # where the teacher's samples are kept does not change them
    return data


def finished_record(plan: ExperimentPlan, spec: RunSpec) -> dict[str, Any] | None:
    """The run's record when it finished with this very config, else None (it must run or resume)."""
    path = plan.run_dir(spec) / RUN_RECORD
    if not path.is_file():
        return None
    try:
        record = read_json(path)
    except UserError:
        return None  # damaged: measure again
    if not _same_settings(record.get("config"), _comparable(_load(plan, spec))):
        return None
    return record


def _same_settings(recorded: Any, current: Any) -> bool:
    """Equal on every key both configs have: a key the schema gained (or lost) since the run does not make a
    finished run unfinished; any changed value does."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        return all(_same_settings(recorded[k], current[k]) for k in recorded.keys() & current.keys())
    if isinstance(recorded, list | tuple) and isinstance(current, list | tuple):
        return len(recorded) == len(current) and all(_same_settings(a, b) for a, b in zip(recorded, current))
    return recorded == current


# ------------------------------------------------------------------------------------------- one run
_DETAIL_CACHE: dict[str, dict[str, Any]] = {}  # evaluate_detail of a sample file, by content (teacher sets repeat)


def _detail(path: Path, reference, device: str) -> dict[str, Any]:
    from dmd_dar.image_io import load_images
    from dmd_dar.metrics.quality import evaluate_detail

    digest = hashlib.sha1(path.read_bytes()).hexdigest() + f"|{getattr(reference, 'name', '')}|{len(reference)}"
    if digest not in _DETAIL_CACHE:
        result = evaluate_detail(load_images(path), reference, device=device)
        _DETAIL_CACHE[digest] = {k: v for k, v in result.items() if isinstance(v, int | float | str)}
    return _DETAIL_CACHE[digest]


_REFERENCES: dict[str, Any] = {}


def _quality_reference(spec: str):
    from dmd_dar.metrics.quality import load_reference

    if spec not in _REFERENCES:
        _REFERENCES[spec] = load_reference(spec)
    return _REFERENCES[spec]


def _spectral_part(candidate: dict[str, Any]) -> dict[str, Any]:
    keys = ("hf_retention", "hf_retention_ci", "hf_ratio_retention", "candidate_hf_ratio", "band_labels",
            "band_energy_ratio", "log_spectral_distance_db", "log_spectral_distance_db_per_band",
            "candidate_spectral_slope", "reference_spectral_slope", "radial_frequencies_cycles_per_pixel",
            "candidate_radial_power")
    return {k: candidate[k] for k in keys if k in candidate}


def flat_metrics(quality: dict[str, Any], spectral: dict[str, Any], detail: dict[str, Any]) -> dict[str, float]:
    """One set's numbers under the experiment's metric names (the columns of the tables)."""
    out: dict[str, float] = {}
    for source, keys in ((quality, QUALITY_KEYS), (detail, DETAIL_KEYS)):
        out.update({k: float(source[k]) for k in keys if source.get(k) is not None})
    for cutoff, value in spectral.get("hf_retention", {}).items():
        out[f"hf_retention@{cutoff}"] = float(value)
    for band, value in zip(spectral.get("band_labels", []), spectral.get("band_energy_ratio", [])):
        out[f"band_ratio@{band}"] = float(value)
    if spectral.get("log_spectral_distance_db") is not None:
        out["lsd_db"] = float(spectral["log_spectral_distance_db"])
    if spectral.get("candidate_spectral_slope") is not None:
        out["slope"] = float(spectral["candidate_spectral_slope"])
    return out


def collect_run(cfg: DistillConfig, run_dir: Path, device: str = "cpu") -> dict[str, Any]:
    """The measurements of a finished distillation run: its student's and its teacher's report samples."""
    summary = read_json(run_dir / "summary.json")
    mode = cfg.student.routing.mode
    student_set, teacher_set = f"student_{mode}_{len(cfg.student.timesteps)}step", f"teacher_{cfg.eval.teacher_steps}step"
    quality = read_json(run_dir / "quality.json") if cfg.eval.quality else {}
    spectral = read_json(run_dir / "report" / "metrics.json")["candidates"]
    samples = run_dir / "samples"
    try:
        if cfg.eval.reference:
            reference = _quality_reference(cfg.eval.reference)
        else:  # the teacher's samples are the reference of the report and of the quality
            from dmd_dar.metrics.quality import load_reference

            reference = load_reference(samples / f"{teacher_set}.npz")
    except UserError as err:  # e.g. a reference of latents, which only the trainer's family decodes
        reference, detail_error = None, f"no detail metrics: the reference cannot be read as images ({err})"
    sets = {"student": student_set} | ({"teacher": teacher_set} if cfg.eval.reference else {})
    record: dict[str, Any] = {"train_seconds": summary.get("seconds"), "exported_step": summary["arms"][mode].get("exported_step"),
                              "skipped_steps": summary["arms"][mode].get("skipped_steps")}
    for role, name in sets.items():
        q = {k: v for k, v in quality.get(name, {}).items() if isinstance(v, int | float | str)}
        s = _spectral_part(spectral[name]) if name in spectral else {}
        d = _detail(samples / f"{name}.npz", reference, device) if reference is not None else {"error": detail_error}
        record[role] = {"set": name, "quality": q, "spectral": s, "detail": d, "metrics": flat_metrics(q, s, d)}
    return record


def execute_run(plan: ExperimentPlan, spec: RunSpec, log_file: Path) -> dict[str, Any]:
    """Distill (or resume) one run, measure it and write its run.json; the trainer's output goes to `log_file`."""
    from dmd_dar.dmd.trainer import run_distillation

    cfg = _load(plan, spec)
    run_dir = plan.run_dir(spec)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log_file, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        print(f"--- {spec.name}: {_dt.datetime.now().isoformat(timespec='seconds')}, overrides {' '.join(spec.overrides)}")
        run_distillation(cfg)
        measured = collect_run(cfg, run_dir)
    record = {"name": spec.name, "arm": spec.arm, "seed": spec.seed, "group": spec.group, "vary": dict(spec.vary),
              "routing": cfg.student.routing.to_dict(), "wall_seconds": round(time.time() - start, 1),
              "finished_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "config": _comparable(cfg), **measured}
    write_json(run_dir / RUN_RECORD, record)
    return record


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _execute_in_worker(plan: ExperimentPlan, spec: RunSpec, log_file: Path) -> dict[str, Any]:
    try:
        return execute_run(plan, spec, log_file)
    except Exception as err:  # reported by the parent in one line; the traceback is in the run's log
        with open(log_file, "a") as log:
            traceback.print_exc(file=log)
        return {"name": spec.name, "error": f"{type(err).__name__}: {' '.join(str(err).split())}"}


# ------------------------------------------------------------------------------------------- the loop
def progress_bar(done: int, total: int, width: int = 20) -> str:
    filled = round(width * done / total) if total else width
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


def describe_run(record: dict[str, Any]) -> str:
    """The finished run's line: its headline numbers and its time."""
    m = record["student"]["metrics"]
    parts = []
    for key, fmt in (("fd", "FD {:.2f}"), ("fid", "FID {:.2f}"), ("kid", "KID {:.4f}"), ("accuracy", "acc {:.3f}"),
                     ("precision", "P {:.3f}"), ("recall", "R {:.3f}"), ("hp_fd", "hp-FD {:.3g}"),
                     ("hf_retention@0.25", "HF@0.25 {:.3f}"), ("patch_fid", "patch-FID {:.2f}")):
        if key in m:
            parts.append(fmt.format(m[key]))
    return f"{record['name']}: " + "  ".join(parts) + f"  ({record.get('wall_seconds', 0):.0f} s)"


def run_experiment(plan: ExperimentPlan, processes: int = 1, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every unfinished run of the plan (one after another, or in `processes` worker processes), printing one
    line per run with a progress bar; rewrite the results after each. Returns the experiment's summary.
    Failed runs are named at the end (UserError) after the others have finished; their logs hold the tracebacks."""
    if processes < 1:
        raise UserError(f"--processes {processes}: must be >= 1")
    plan.out.mkdir(parents=True, exist_ok=True)
    with run_lock(plan.out):
        records: dict[str, dict[str, Any]] = {}
        pending = []
        total, done = len(plan.runs), 0
        for spec in plan.runs:
            record = finished_record(plan, spec)
            if record is None:
                pending.append(spec)
            else:
                records[spec.name] = record
                done += 1
                echo(f"{progress_bar(done, total)}  {spec.name}: finished earlier (skipped)")
        failures: dict[str, str] = {}

        def finish(spec: RunSpec, record: dict[str, Any]) -> None:
            nonlocal done
            done += 1
            if "error" in record:
                failures[spec.name] = record["error"]
                echo(f"{progress_bar(done, total)}  {spec.name}: FAILED ({record['error']}); log: {log_path(plan, spec)}")
            else:
                records[spec.name] = record
                echo(f"{progress_bar(done, total)}  {describe_run(record)}")
                write_results(plan, records)

        if pending and processes == 1:
            for spec in pending:
                finish(spec, _execute_in_worker(plan, spec, log_path(plan, spec)))
        elif pending:
            threads = max(1, (os.cpu_count() or 1) // processes)
            context = multiprocessing.get_context("spawn")  # no forked torch thread pools
            with ProcessPoolExecutor(max_workers=min(processes, len(pending)), mp_context=context,
                                     initializer=_worker_init, initargs=(threads,)) as pool:
                futures = {pool.submit(_execute_in_worker, plan, spec, log_path(plan, spec)): spec for spec in pending}
                remaining = set(futures)
                try:
                    while remaining:
                        finished, remaining = wait(remaining, return_when=FIRST_COMPLETED)
                        for future in finished:
                            spec = futures[future]
                            try:
                                record = future.result()
                            except Exception as err:  # the worker process itself died (killed, out of memory)
                                record = {"name": spec.name, "error": f"{type(err).__name__}: {err}"}
                            finish(spec, record)
                except BaseException:
                    for future in remaining:
                        future.cancel()
                    raise
        summary = write_results(plan, records)
    if failures:
        raise UserError(f"{len(failures)} of {total} runs failed ({', '.join(failures)}); their logs are in {plan.out / 'logs'}; "
                        "run the same command again to retry them")
    return summary


def log_path(plan: ExperimentPlan, spec: RunSpec) -> Path:
    return plan.out / "logs" / f"{spec.name}.log"


# ------------------------------------------------------------------------------------------- statistics
def _metric_names(records: Sequence[dict[str, Any]], role: str = "student") -> list[str]:
    seen: dict[str, None] = {}
    for r in records:
        for k in r.get(role, {}).get("metrics", {}):
            seen.setdefault(k, None)
    names = list(seen)
    order = {k: i for i, k in enumerate((*QUALITY_KEYS, *DETAIL_KEYS))}

    def key(name: str) -> tuple:
        if name in order:
            return (0, order[name], name)
        if name.startswith("hf_retention@"):
            return (1, float(name.split("@")[1]), name)
        if name in ("lsd_db", "slope"):
            return (2, ("lsd_db", "slope").index(name), name)
        if name.startswith("band_ratio@"):  # in band order: by the lower edge of "lo-hi"
            return (3, float(name.split("@")[1].split("-")[0]), name)
        return (4, 0, name)

    return sorted(names, key=key)


def summarise(plan: ExperimentPlan, records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per group: per arm (and the teacher) the t interval across seeds of every metric; per arm other than the
    baseline the paired differences arm - baseline, seed by seed, with their t interval."""
    out: dict[str, Any] = {}
    for group in plan.groups:
        runs = [records[s.name] for s in plan.runs if s.group == group and s.name in records]
        metrics = _metric_names(runs)
        by_arm: dict[str, dict[int, dict[str, float]]] = {}
        for r in runs:
            by_arm.setdefault(r["arm"], {})[r["seed"]] = r["student"]["metrics"]
        teacher: dict[int, dict[str, float]] = {}
        for r in runs:
            if "teacher" in r:
                teacher.setdefault(r["seed"], r["teacher"]["metrics"])
        arms = {}
        for arm in plan.arms:
            seeds = by_arm.get(arm, {})
            arms[arm] = {"seeds": sorted(seeds),
                         "metrics": {m: t_interval([v.get(m) for v in seeds.values()], plan.confidence).to_dict()
                                     for m in metrics}}
        entry: dict[str, Any] = {"arms": arms, "metric_names": metrics}
        if teacher:
            names = _metric_names(runs, "teacher")
            entry["teacher"] = {"seeds": sorted(teacher),
                                "metrics": {m: t_interval([v.get(m) for v in teacher.values()], plan.confidence).to_dict()
                                            for m in names}}
        if plan.baseline is not None:
            base = by_arm.get(plan.baseline, {})
            paired = {}
            for arm in plan.arms:
                if arm == plan.baseline:
                    continue
                other = by_arm.get(arm, {})
                paired[arm] = {}
                for m in metrics:
                    diffs, interval = paired_interval({s: v.get(m) for s, v in other.items()},
                                                      {s: v.get(m) for s, v in base.items()}, plan.confidence)
                    paired[arm][m] = {"per_seed": {str(s): d for s, d in diffs.items()}, **interval.to_dict()}
            entry["paired"] = {"baseline": plan.baseline, "arms": paired}
        out[group] = entry
    return out


# ------------------------------------------------------------------------------------------- the results
def write_results(plan: ExperimentPlan, records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """experiment.json, results.md and results.html from the records so far; returns the summary."""
    from dmd_dar.checkpoint import atomic_write_bytes

    summary = summarise(plan, records)
    data = {
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(sys.argv) if sys.argv and sys.argv[0].endswith("experiment.py") else None,
        "config": plan.config, "overrides": plan.overrides, "seeds": plan.seeds,
        "arms": {a: ARMS[a] for a in plan.arms}, "vary": {k: v for k, v in plan.vary}, "baseline": plan.baseline,
        "confidence": plan.confidence, "runs_planned": len(plan.runs), "runs_finished": len(records),
        "runs": [{k: v for k, v in records[s.name].items() if k != "config"} for s in plan.runs if s.name in records],
        "pending": [s.name for s in plan.runs if s.name not in records],
        "summary": summary,
    }
    write_json(plan.out / "experiment.json", data)
    atomic_write_bytes(plan.out / "results.md", render_markdown(plan, data).encode())
    atomic_write_bytes(plan.out / "results.html", render_html(plan, data).encode())
    return summary


def _fmt(interval: dict[str, Any] | None, metric: str = "", signed: bool = False) -> str:
    if not interval or interval.get("mean") is None:
        return "-"
    digits = _digits(metric, interval["mean"])
    text = Interval(**{k: interval[k] for k in ("mean", "low", "high", "n", "sd", "confidence")}).format(digits)
    return ("+" + text if signed and interval["mean"] >= 0 else text)


def _digits(metric: str, value: float | None = None) -> int:
    """Decimals shown: KIDs 4; otherwise 3, fewer for large values (an FD of 10,886 needs none)."""
    if metric in ("kid", "hp_kid"):
        return 4
    if value is not None and math.isfinite(value) and abs(value) >= 10:
        return max(0, 3 - int(math.log10(abs(value))))
    return 3


def _headline(metrics: Sequence[str]) -> list[str]:
    return [m for m in metrics if not m.startswith("band_ratio@")]


def _tables(plan: ExperimentPlan, entry: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]], str]]:
    """(title, header, rows, note) of one group's tables."""
    metrics = entry["metric_names"]
    conf = f"{plan.confidence:.0%}"
    headline, bands = _headline(metrics), [m for m in metrics if m.startswith("band_ratio@")]
    rows = []
    if "teacher" in entry:
        t = entry["teacher"]
        rows.append(["teacher", str(len(t["seeds"]))]
                    + [_fmt(t["metrics"].get(m), m) for m in headline])
    for arm, a in entry["arms"].items():
        rows.append([arm, str(len(a["seeds"]))] + [_fmt(a["metrics"][m], m) for m in headline])
    tables = [(f"Per arm: mean [{conf} t-interval] across seeds", ["arm", "n", *map(label, headline)], rows,
               "Student's report samples against the reference; teacher: its multi-step samples of the same noises.")]
    if "paired" in entry:
        base = entry["paired"]["baseline"]
        rows = [[f"{arm} − {base}", str(p[headline[0]]["n"]) if headline else "0"]
                + [_fmt(p[m], m, signed=True) for m in headline] for arm, p in entry["paired"]["arms"].items()]
        tables.append((f"Paired differences arm − {base}: mean [{conf} t-interval] of the per-seed differences",
                       ["difference", "pairs", *map(label, headline)], rows,
                       "Arms of the same seed share every random draw, so the comparison is paired."))
        rows = []
        for arm, p in entry["paired"]["arms"].items():
            for m in headline:
                per_seed = ", ".join(f"s{s}: {d:+.{_digits(m, p[m]['mean'])}f}" for s, d in p[m]["per_seed"].items())
                rows.append([f"{arm} − {base}", label(m), per_seed or "-", _fmt(p[m], m, signed=True)])
        tables.append(("Paired differences, seed by seed", ["difference", "metric", "per seed", "mean [interval]"], rows, ""))
    if bands:
        rows = [[arm, str(len(a["seeds"]))] + [_fmt(a["metrics"][m]) for m in bands] for arm, a in entry["arms"].items()]
        if "teacher" in entry:
            t = entry["teacher"]
            rows.insert(0, ["teacher", str(len(t["seeds"]))] + [_fmt(t["metrics"].get(m)) for m in bands])
        tables.append((f"Energy per band relative to the reference (cycles/pixel): mean [{conf} t-interval]",
                       ["arm", "n", *(m.split("@")[1] for m in bands)], rows, ""))
    return tables


def _run_rows(plan: ExperimentPlan, data: dict[str, Any], group: str) -> tuple[list[str], list[list[str]]]:
    keys = [k for k in ("fd", "fid", "kid", "accuracy", "precision", "recall", "hp_fd", "hf_retention@0.25", "lsd_db")
            if any(k in r["student"]["metrics"] for r in data["runs"])]
    def cell(metrics: dict[str, float], k: str) -> str:
        return f"{metrics[k]:.{_digits(k, metrics[k])}f}" if k in metrics else "-"

    rows = [[r["name"], r["arm"], str(r["seed"])] + [cell(r["student"]["metrics"], k) for k in keys]
            + [f"{r.get('wall_seconds', 0):.0f}"] for r in data["runs"] if r["group"] == group]
    return ["run", "arm", "seed", *map(label, keys), "wall s"], rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _intro(data: dict[str, Any]) -> list[str]:
    arms = "; ".join(f"`{a}`: " + ", ".join(f"{k}={v}" for k, v in routing.items()) for a, routing in data["arms"].items())
    lines = [f"Config `{data['config']}`" + (f" with `{' '.join(data['overrides'])}`" if data["overrides"] else "")
             + f"; seeds {', '.join(map(str, data['seeds']))}; arms (student.routing): {arms}."]
    if data["vary"]:
        lines.append("Varied: " + "; ".join(f"`{k}` in {', '.join(v)}" for k, v in data["vary"].items()) + ".")
    lines.append(f"Runs finished: {data['runs_finished']} of {data['runs_planned']}"
                 + (f" (pending: {', '.join(data['pending'])})" if data["pending"] else "") + f". Written {data['created_utc']}.")
    return lines


def render_markdown(plan: ExperimentPlan, data: dict[str, Any]) -> str:
    parts = ["# Experiment results", "", *_intro(data), ""]
    for group, entry in data["summary"].items():
        if group:
            parts += [f"## {group}", ""]
        for title, header, rows, note in _tables(plan, entry):
            parts += [f"### {title}", "", _md_table(header, rows), ""] + ([note, ""] if note else [])
        header, rows = _run_rows(plan, data, group)
        parts += ["### Runs", "", _md_table(header, rows), ""]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------- the page
def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.8 / width, right=1 - 0.25 / width, bottom=0.8 / height, top=1 - 0.45 / height, wspace=0.3)
    return fig, fig.subplots(1, ncols)


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _colors(names: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def _quality_metric(runs: Sequence[dict[str, Any]]) -> str | None:
    for key in ("fd", "fid", "kid"):
        if any(key in r["student"]["metrics"] for r in runs):
            return key
    return None


def plot_retention_vs_quality(plan: ExperimentPlan, runs: Sequence[dict[str, Any]], cutoff: str = "0.25") -> str | None:
    """HF retention (y) against the quality metric (x) for every run, one colour per arm; teachers as crosses."""
    q, hf = _quality_metric(runs), f"hf_retention@{cutoff}"
    points = [r for r in runs if q and q in r["student"]["metrics"] and hf in r["student"]["metrics"]]
    if not points:
        return None
    colors = _colors(plan.arms)
    fig, ax = _figure(6.4, 4.2)
    for arm in plan.arms:
        mine = [r for r in points if r["arm"] == arm]
        if mine:
            ax.scatter([r["student"]["metrics"][q] for r in mine], [r["student"]["metrics"][hf] for r in mine],
                       color=colors[arm], label=arm, s=30, zorder=3)
    teachers = {r["seed"]: r["teacher"]["metrics"] for r in points if "teacher" in r}
    teachers = {s: m for s, m in teachers.items() if q in m and hf in m}
    if teachers:
        ax.scatter([m[q] for m in teachers.values()], [m[hf] for m in teachers.values()], color="black", marker="x",
                   label="teacher", s=40, zorder=3)
    ax.axhline(1.0, color="0.5", lw=0.8, ls="--")
    ax.set(xlabel=f"{label(q)} (lower is better)", ylabel=f"HF retention f > {cutoff} (1 = real data's)",
           title="Detail against quality, every run")
    ax.grid(True, alpha=0.25)
    ax.legend(fontsize=8)
    return _png(fig)


def plot_bands(plan: ExperimentPlan, entry: dict[str, Any]) -> str | None:
    bands = [m for m in entry["metric_names"] if m.startswith("band_ratio@")]
    if not bands:
        return None
    series = {arm: a["metrics"] for arm, a in entry["arms"].items() if a["seeds"]}
    if "teacher" in entry:
        series = {"teacher": entry["teacher"]["metrics"], **series}
    colors = _colors([*plan.arms, "teacher"])
    colors["teacher"] = "black"
    fig, ax = _figure(6.4, 4.2)
    width = 0.8 / max(len(series), 1)
    for i, (name, metrics) in enumerate(series.items()):
        xs = [b + (i - (len(series) - 1) / 2) * width for b in range(len(bands))]
        means = [metrics.get(m, {}).get("mean") for m in bands]
        lows = [metrics.get(m, {}).get("low") for m in bands]
        highs = [metrics.get(m, {}).get("high") for m in bands]
        ys = [v if v is not None else math.nan for v in means]
        err = [[(v - lo) if lo is not None and v is not None else 0 for v, lo in zip(means, lows)],
               [(hi - v) if hi is not None and v is not None else 0 for v, hi in zip(means, highs)]]
        ax.bar(xs, ys, width=width * 0.95, color=colors[name], label=name, yerr=err, capsize=3, error_kw={"lw": 1})
    ax.axhline(1.0, color="0.4", lw=0.8, ls="--")
    ax.set_yscale("log")  # ratios: 0.5 and 2 are equally far from 1
    ax.set_xticks(range(len(bands)), [m.split("@")[1] for m in bands])
    ax.set(xlabel="band (cycles/pixel)", ylabel="energy / reference",
           title=f"Energy per band (mean, {plan.confidence:.0%} t-interval)")
    ax.grid(True, axis="y", alpha=0.25)
    ax.legend(fontsize=8)
    return _png(fig)


def plot_paired(plan: ExperimentPlan, entry: dict[str, Any]) -> str | None:
    """The paired differences of the headline metrics, one panel per metric, one row per arm (forest plot)."""
    if "paired" not in entry or not entry["paired"]["arms"]:
        return None
    q = next((m for m in ("fd", "fid", "kid") if m in entry["metric_names"]), None)
    keys = [m for m in (q, "hp_fd", "hf_retention@0.25") if m and m in entry["metric_names"]]
    if not keys:
        return None
    arms = list(entry["paired"]["arms"])
    fig, axes = _figure(3.3 * len(keys) + 0.8, 0.5 * len(arms) + 1.6, ncols=len(keys))
    axes = axes if len(keys) > 1 else [axes]
    colors = _colors(plan.arms)
    for ax, m in zip(axes, keys):
        for i, arm in enumerate(arms):
            p = entry["paired"]["arms"][arm][m]
            if p["mean"] is None:
                continue
            if p["low"] is not None:
                ax.plot([p["low"], p["high"]], [i, i], color=colors[arm], lw=2)
            ax.plot([p["mean"]], [i], "o", color=colors[arm])
            for d in p["per_seed"].values():
                ax.plot([d], [i], "|", color="0.3", ms=8)
        ax.axvline(0.0, color="0.4", lw=0.8, ls="--")
        ax.set_yticks(range(len(arms)), arms if ax is axes[0] else [""] * len(arms), fontsize=8)
        ax.set_ylim(-0.6, len(arms) - 0.4)
        ax.set_title(f"{label(m)}: arm − {entry['paired']['baseline']}", fontsize=9)
        ax.grid(True, axis="x", alpha=0.25)
    height = 0.5 * len(arms) + 1.6
    fig.subplots_adjust(left=1.6 / (3.3 * len(keys) + 0.8), bottom=0.5 / height)
    return _png(fig)


_CSS = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1180px;
       color: #222; line-height: 1.4; padding: 0 16px; }
table { border-collapse: collapse; margin: 8px 0 4px; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
p.note { color: #555; font-size: 0.88em; margin-top: 0; }
figure { margin: 10px 0; display: inline-block; } figure img { max-width: 100%; border: 1px solid #eee; }
"""


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(plan: ExperimentPlan, data: dict[str, Any]) -> str:
    """One self-contained page: the tables of results.md and the plots as inline PNGs."""
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Experiment results</title>",
             f"<style>{_CSS}</style></head><body><h1>Experiment results</h1>"]
    parts += [f"<p>{html.escape(line)}</p>" for line in _intro(data)]
    for group, entry in data["summary"].items():
        if group:
            parts.append(f"<h2>{html.escape(group)}</h2>")
        for title, header, rows, note in _tables(plan, entry):
            parts.append(f"<h3>{html.escape(title)}</h3>{_html_table(header, rows)}")
            if note:
                parts.append(f"<p class='note'>{html.escape(note)}</p>")
        runs = [r for r in data["runs"] if r["group"] == group]
        figures = [(plot_retention_vs_quality(plan, runs), "HF retention above 0.25 cycles/pixel against the quality metric, "
                    "one point per run (crosses: the teacher's samples of each seed)."),
                   (plot_bands(plan, entry), "Energy per radial band relative to the reference, per arm across seeds."),
                   (plot_paired(plan, entry), "Paired differences per arm (dot: mean, bar: t-interval, ticks: the seeds).")]
        parts.append("<h3>Plots</h3>")
        for png, caption in figures:
            if png:
                parts.append(f"<figure><img alt='plot' src='data:image/png;base64,{png}'>"
                             f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        header, rows = _run_rows(plan, data, group)
        parts.append(f"<h3>Runs</h3>{_html_table(header, rows)}")
    parts.append("</body></html>\n")
    return "\n".join(parts)
