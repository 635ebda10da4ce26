"""The bad-input battery (issue 15): every entry point (scripts/*.py, eval/*.py), fed one mistake at a time.

Each case asserts the project's promise for a user's mistake: exit status 2, exactly one line on stderr (an
`error:` line), no traceback, and nothing written (the case's output path is absent afterwards, or byte for byte
what it was before: a tree snapshot with content hashes). The shared inputs of the battery are checked unchanged
at the end.

Speed: a Python start that imports torch costs 2-4 s of CPU, ~100 of them would take minutes on 2 cores. So the
cases run in forked children of one "zygote" process that has imported torch and numpy once (nothing of
dmd_dar, so every import-time message of the project and of diffusers still reaches the child's stderr). A
child runs the script file as `python scripts/X.py ARGS` would (`runpy.run_path` with `__main__`, sys.argv,
sys.path[0] = the script's folder, the repository as working directory) with its stdout/stderr on files;
an exception that escapes it is printed as Python prints it (a traceback) and exits 1. Two cases also run as
real `python scripts/X.py` subprocesses and must give the same result (`test_the_zygote_matches_real_runs`).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
CASE_TIMEOUT_S = 120

ZYGOTE = r"""
import json, os, runpy, select, signal, sys, time, traceback
import numpy, torch  # the expensive imports, once; children inherit them
jobs = json.loads(sys.stdin.read())
workers, timeout = int(os.environ.get("BATTERY_WORKERS", "2")), float(os.environ.get("BATTERY_TIMEOUT", "120"))
pending, running, results = list(jobs), {}, {}

def child(job):
    os.chdir(job["cwd"])
    for fd, name in ((1, "stdout"), (2, "stderr")):
        f = os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    os.environ.update(job["env"])
    script = os.path.abspath(job["argv"][0])
    sys.argv = [job["argv"][0], *job["argv"][1:]]
    sys.path[0] = os.path.dirname(script)
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_:
        c = exit_.code
        code = c if isinstance(c, int) else (0 if c is None else (print(c, file=sys.stderr) or 1))
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

while pending or running:
    while pending and len(running) < workers:
        job = pending.pop(0)
        pid = os.fork()
        if pid == 0:
            child(job)
        running[pid] = (job, time.time())
    pid, status = os.waitpid(-1, os.WNOHANG)
    if pid == 0:
        time.sleep(0.02)
        for pid, (job, start) in list(running.items()):
            if time.time() - start > timeout:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                results[job["id"]] = {"rc": "timeout", "seconds": time.time() - start}
                del running[pid]
        continue
    job, start = running.pop(pid)
    rc = os.waitstatus_to_exitcode(status)
    results[job["id"]] = {"rc": rc, "seconds": round(time.time() - start, 2)}
print(json.dumps(results))
"""


# ------------------------------------------------------------------------------------------ the inputs
def _dit(folder: Path, seed: int = 0, **overrides) -> Path:
    from dmd_dar.models import DiT

    torch.manual_seed(seed)
    kw = dict(input_size=16, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=3)
    kw.update(overrides)
    model = DiT(**kw)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("router."):
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


def _edit_config(folder: Path, **changes) -> Path:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _nan_weights(folder: Path) -> Path:
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    name = next(k for k in state if k.endswith("weight") and not k.startswith("router."))
    state[name][0] = float("nan")
    save_file(state, str(folder / "model.safetensors"))  # around our writer, which refuses non-finite weights
    return folder


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _fake_checkpoint(run: Path, routing: dict, step: int = 2) -> Path:
    """A complete-looking run checkpoint (meta.json + trainer_state.pt) of a distillation arm with `routing`."""
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": step, "skipped_steps": 0, "routing": routing}))
    torch.save({"student_opt": {}, "fake_opt": {}}, ckpt / "trainer_state.pt")
    return ckpt


def build_world(root: Path) -> dict[str, str]:
    """Every input the cases read, under root/in (never written by a case), and the names the table uses."""
    import yaml
    from PIL import Image

    from dmd_dar.models import DiT

    inp = root / "in"
    inp.mkdir(parents=True)
    w: dict[str, Path] = {"in": inp, "out": root / "out"}
    w["teacher"] = _dit(inp / "teacher")
    w["teacher_wide"] = _dit(inp / "teacher_wide", hidden_size=64)
    w["teacher_nan"] = _nan_weights(_copy(w["teacher"], inp / "teacher_nan"))
    w["teacher_unknown_field"] = _edit_config(_copy(w["teacher"], inp / "teacher_unknown_field"), window=7)
    w["teacher_big"] = _edit_config(_copy(w["teacher"], inp / "teacher_big"), hidden_size="big")
    w["teacher_truncated"] = _copy(w["teacher"], inp / "teacher_truncated")
    _truncate(w["teacher_truncated"] / "model.safetensors")
    w["teacher_bad_routing"] = _edit_config(_copy(w["teacher"], inp / "teacher_bad_routing"),
                                            routing={"mode": "dar", "query": "learned"})
    dar = DiT.from_pretrained(w["teacher"], routing={"mode": "dar", "query": "static_t"})
    dar.save_pretrained(inp / "student_dar")
    w["student_stripped"] = _edit_config(_copy(inp / "student_dar", inp / "student_stripped"),
                                         routing={"mode": "residual"})  # DAR weights, residual config: refused

    g = np.random.default_rng(0)
    grey = (g.random((16, 16, 16, 1)) * 255).astype(np.uint8)
    np.savez(inp / "good.npz", arr_0=grey, arr_1=np.arange(16) % 3)
    w["good_npz"] = inp / "good.npz"
    np.savez(inp / "rgb32.npz", arr_0=(g.random((16, 32, 32, 3)) * 255).astype(np.uint8))
    w["rgb32_npz"] = inp / "rgb32.npz"
    np.savez(inp / "trunc.npz", arr_0=grey)
    w["trunc_npz"] = _truncate(inp / "trunc.npz", 0.6)
    with zipfile.ZipFile(inp / "notnpz.npz", "w") as z:
        z.writestr("readme.txt", "a zip file, not numpy arrays")
    w["notnpz"] = inp / "notnpz.npz"
    np.savez(inp / "rank3.npz", arr_0=grey[..., 0])
    w["rank3_npz"] = inp / "rank3.npz"
    np.savez(inp / "float.npz", arr_0=grey.astype(np.float32) * 4.0)  # floats in [0, 1020]: not uint8 images
    w["float_npz"] = inp / "float.npz"
    np.savez(inp / "nokey.npz", images=grey)
    w["nokey_npz"] = inp / "nokey.npz"
    (inp / "pngs_mixed").mkdir()
    Image.fromarray(grey[0, ..., 0]).save(inp / "pngs_mixed" / "a.png")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(inp / "pngs_mixed" / "b.png")
    w["pngs_mixed"] = inp / "pngs_mixed"
    (inp / "empty_dir").mkdir()
    w["empty_dir"] = inp / "empty_dir"
    (inp / "not_a_png.png").write_text("text")
    (inp / "pngs_broken").mkdir()
    (inp / "pngs_broken" / "x.png").write_text("not an image")
    w["pngs_broken"] = inp / "pngs_broken"

    w["a_file"] = inp / "a_file"
    w["a_file"].write_text("mine\n")
    w["not_a_config"] = inp / "not_a_config.yaml"
    w["not_a_config"].write_text("- just\n- a list\n")
    w["bad_yaml"] = inp / "bad.yaml"
    w["bad_yaml"].write_text("steps: [1, 2\nbatch_size: {\n")

    distill = {
        "seed": 0, "teacher": str(w["teacher"]), "steps": 2, "batch_size": 4, "log_every": 1, "sample_every": 2,
        "checkpoint_every": 2, "student": {"routing": {"mode": "dar", "query": "static_t"}, "optim": {"lr": 1e-3}},
        "fake": {"updates_per_student_step": 1, "optim": {"lr": 1e-3}},
        "eval": {"grid_images": 6, "teacher_steps": 2, "report_samples": 0, "reference": "", "every": 2, "batch": 6,
                 "quality": False},
    }
    w["distill_yaml"] = inp / "distill.yaml"
    w["distill_yaml"].write_text(yaml.safe_dump(distill))
    teacher = {
        "steps": 2, "batch_size": 4, "log_every": 1, "sample_every": 2, "checkpoint_every": 2, "ema_decay": 0.9,
        "data": {"dataset": str(w["good_npz"]), "image_size": 16, "heldout_fraction": 0.25},
        "model": {"input_size": 16, "patch_size": 4, "in_channels": 1, "hidden_size": 32, "depth": 2, "num_heads": 2,
                  "num_classes": 3},
        "optim": {"lr": 1e-3}, "sample": {"steps": 2, "num_images": 3},
    }
    w["teacher_yaml"] = inp / "teacher.yaml"
    w["teacher_yaml"].write_text(yaml.safe_dump(teacher))
    return {k: str(v) for k, v in w.items()}


# ------------------------------------------------------------------------------------------ the table
@dataclass
class Case:
    id: str
    argv: list[str]  # script path, then arguments; {name} = a world path, {out} = this case's own output path
    needle: str  # a piece of the one error line
    out: str = "{out}"  # the path that must be absent afterwards, or unchanged (`setup` may create it); the case's
    # working directory (an empty folder of its own) must stay empty too
    setup: str | None = None  # name of a function in SETUPS that prepares {out} before the run
    env: dict[str, str] = field(default_factory=dict)
    xfail: str | None = None  # strict xfail: a known fix that belongs to another file's owner (see the reason)


D, T = "scripts/distill.py", "scripts/train_teacher.py"
DCFG, TCFG = ["--config", "{distill_yaml}", "out_dir={out}"], ["--config", "{teacher_yaml}", "out_dir={out}"]
DIAG = ["scripts/diagnose.py", "--checkpoint", "{teacher}", "--dataset", "gaussian", "--n", "4", "--t-grid", "3"]
PAIRS = ["scripts/make_regression_pairs.py", "--config", "{distill_yaml}", "--n", "2"]
CLF = "scripts/train_classifier.py"
SAMPLE = ["scripts/sample.py", "{teacher}", "--steps", "2"]
QUAL, SPEC, FID = "eval/quality.py", "eval/spectral_report.py", "eval/fid.py"
SPEC_OK = [SPEC, "--reference", "{good_npz}", "--candidate", "c={good_npz}", "--bootstrap", "10"]

CASES = [
    # ---- distill: exit 0 with output written, tracebacks, validation too late
    Case("distill-steps-0", [D, *DCFG, "steps=0"], "steps"),
    Case("distill-batch-0", [D, *DCFG, "batch_size=0"], "batch_size"),
    Case("distill-batch-negative", [D, *DCFG, "batch_size=-4"], "batch_size"),
    Case("distill-checkpoint-every-0", [D, *DCFG, "checkpoint_every=0"], "checkpoint_every"),
    Case("distill-keep-last-negative", [D, *DCFG, "keep_last=-1"], "keep_last"),
    Case("distill-lr-negative", [D, *DCFG, "student.optim.lr=-1"], "lr"),
    Case("distill-lr-huge", [D, *DCFG, "student.optim.lr=1e39"], "lr"),
    Case("distill-teacher-steps-0", [D, *DCFG, "eval.teacher_steps=0"], "teacher_steps"),
    Case("distill-teacher-sampler", [D, *DCFG, "eval.teacher_sampler=bogus"], "teacher_sampler"),
    Case("distill-reference-unknown", [D, *DCFG, "eval.reference=bogus"], "eval.reference"),
    Case("distill-init-missing", [D, *DCFG, "student.init=/nonexistent/student"], "student.init"),
    Case("distill-init-other-architecture", [D, *DCFG, "student.init={teacher_wide}"], "do not fit"),
    Case("distill-gan-dataset", [D, *DCFG, "gan.enabled=true", "gan.dataset=bogus"], "gan.dataset"),
    Case("distill-regression-pairs-missing", [D, *DCFG, "regression.enabled=true", "regression.pairs=/nonexistent/pairs.npz"],
         "regression.pairs"),
    Case("distill-regression-pairs-unset", [D, *DCFG, "regression.enabled=true"], "regression.pairs"),
    Case("distill-regression-pairs-not-npz", [D, *DCFG, "regression.enabled=true", "regression.pairs={notnpz}"], "notnpz"),
    Case("distill-unknown-key", [D, *DCFG, "student.optim.lrr=1"], "lrr"),
    Case("distill-wrong-type", [D, *DCFG, "steps=many"], "steps"),
    Case("distill-override-without-value", [D, *DCFG, "steps"], "key=value"),
    Case("distill-query-unknown", [D, *DCFG, "student.routing.query=learned"], "query"),
    Case("distill-timesteps-order", [D, *DCFG, "student.timesteps=[0.5,1.0]"], "timesteps"),
    Case("distill-fake-updates-0", [D, *DCFG, "fake.updates_per_student_step=0"], "updates_per_student_step"),
    Case("distill-dm-range", [D, *DCFG, "dm.t_min=0.9", "dm.t_max=0.1"], "t_min"),
    Case("distill-mixed-precision", [D, *DCFG, "mixed_precision=fp8"], "mixed_precision"),
    Case("distill-arms-twice", [D, *DCFG, "arms=[dar,dar]"], "twice"),
    Case("distill-ema-decay", [D, *DCFG, "student.ema_decay=1.5"], "ema_decay"),
    Case("distill-select-unknown", [D, *DCFG, "eval.select=bogus"], "eval.select"),
    Case("distill-report-negative", [D, *DCFG, "eval.report_samples=-1"], "report_samples"),
    Case("distill-backbone", [D, *DCFG, "backbone=unet"], "backbone"),
    Case("distill-teacher-missing", [D, *DCFG, "teacher=/nonexistent/teacher"], "teacher"),
    Case("distill-teacher-unknown-field", [D, *DCFG, "teacher={teacher_unknown_field}"], "window"),
    Case("distill-teacher-field-type", [D, *DCFG, "teacher={teacher_big}"], "hidden_size"),
    Case("distill-teacher-nan", [D, *DCFG, "teacher={teacher_nan}"], "non-finite"),
    Case("distill-teacher-truncated", [D, *DCFG, "teacher={teacher_truncated}"], "model.safetensors"),
    Case("distill-teacher-bad-routing", [D, *DCFG, "teacher={teacher_bad_routing}"], "routing"),
    Case("distill-teacher-hub-offline", [D, *DCFG, "backbone=diffusers", "teacher=nobody/no-such-model"], "offline",
         env={"HF_HUB_OFFLINE": "1"}),
    Case("distill-out-is-a-file", [D, "--config", "{distill_yaml}", "out_dir={a_file}"], "not a folder", out="{a_file}"),
    Case("distill-out-under-a-file", [D, "--config", "{distill_yaml}", "out_dir={a_file}/run"], "a_file", out="{a_file}"),
    Case("distill-teacher-cache-is-a-file", [D, *DCFG, "eval.teacher_cache={a_file}"], "eval.teacher_cache"),
    Case("distill-resume-other-routing", [D, *DCFG, "student.routing.query=dynamic"], "resume=false", setup="static_t_run"),
    Case("distill-config-missing", [D, "--config", "/nonexistent/config.yaml", "out_dir={out}"], "not found"),
    Case("distill-config-bad-yaml", [D, "--config", "{bad_yaml}", "out_dir={out}"], "bad.yaml"),
    Case("distill-config-not-a-mapping", [D, "--config", "{not_a_config}", "out_dir={out}"], "not_a_config"),
    Case("distill-no-config", [D, "out_dir={out}"], "--config"),
    Case("distill-unknown-flag", [D, *DCFG, "--bogus"], "--bogus"),
    # ---- train_teacher
    Case("teacher-steps-0", [T, *TCFG, "steps=0"], "steps"),
    Case("teacher-batch-0", [T, *TCFG, "batch_size=0"], "batch_size"),
    Case("teacher-batch-negative", [T, *TCFG, "batch_size=-4"], "batch_size"),
    Case("teacher-checkpoint-every-0", [T, *TCFG, "checkpoint_every=0"], "checkpoint_every"),
    Case("teacher-keep-last-negative", [T, *TCFG, "keep_last=-1"], "keep_last"),
    Case("teacher-lr-negative", [T, *TCFG, "optim.lr=-1"], "lr"),
    Case("teacher-lr-huge", [T, *TCFG, "optim.lr=1e39"], "lr"),
    Case("teacher-unknown-key", [T, *TCFG, "model.depht=3"], "depht"),
    Case("teacher-wrong-type", [T, *TCFG, "model.hidden_size=big"], "hidden_size"),
    Case("teacher-heads", [T, *TCFG, "model.num_heads=3"], "num_heads"),
    Case("teacher-sampler", [T, *TCFG, "sample.sampler=bogus"], "sampler"),
    Case("teacher-repa-no-encoder", [T, *TCFG, "repa.enabled=true", "repa.encoder=dinov2"], "encoder_path"),
    Case("teacher-dataset-missing", [T, *TCFG, "data.dataset=/nonexistent/data.npz"], "data.npz"),
    Case("teacher-dataset-truncated", [T, *TCFG, "data.dataset={trunc_npz}"], "trunc.npz"),
    Case("teacher-dataset-not-npz", [T, *TCFG, "data.dataset={notnpz}"], "notnpz.npz"),
    Case("teacher-dataset-rank3", [T, *TCFG, "data.dataset={rank3_npz}"], "rank3.npz"),
    Case("teacher-dataset-float", [T, *TCFG, "data.dataset={float_npz}"], "float.npz"),
    Case("teacher-dataset-no-arr0", [T, *TCFG, "data.dataset={nokey_npz}"], "arr_0"),
    Case("teacher-dataset-wrong-shape", [T, *TCFG, "data.dataset={rgb32_npz}"], "channels"),
    Case("teacher-init-missing", [T, *TCFG, "init=/nonexistent/teacher"], "init"),
    Case("teacher-init-other-architecture", [T, *TCFG, "init={teacher_wide}"], "hidden_size"),
    Case("teacher-out-is-a-file", [T, "--config", "{teacher_yaml}", "out_dir={a_file}"], "not a folder", out="{a_file}"),
    Case("teacher-out-under-a-file", [T, "--config", "{teacher_yaml}", "out_dir={a_file}/run"], "a_file", out="{a_file}"),
    Case("teacher-config-bad-yaml", [T, "--config", "{bad_yaml}"], "bad.yaml"),
    Case("teacher-resume-other-model", [T, *TCFG, "model.hidden_size=64"], "resume=false", setup="teacher_run"),
    # ---- diagnose
    Case("diagnose-no-out", DIAG, "--out"),
    Case("diagnose-out-is-a-file", [*DIAG, "--out", "{a_file}"], "not a folder", out="{a_file}"),
    Case("diagnose-out-foreign-folder", [*DIAG, "--out", "{out}"], "other files", setup="foreign_folder"),
    Case("diagnose-checkpoint-missing", ["scripts/diagnose.py", "--checkpoint", "/nonexistent/dit", "--out", "{out}"], "--checkpoint"),
    Case("diagnose-checkpoint-nan", ["scripts/diagnose.py", "--checkpoint", "{teacher_nan}", "--dataset", "gaussian",
                                     "--out", "{out}"], "non-finite"),
    Case("diagnose-checkpoint-unknown-field", ["scripts/diagnose.py", "--checkpoint", "{teacher_unknown_field}",
                                               "--dataset", "gaussian", "--out", "{out}"], "window"),
    Case("diagnose-checkpoint-stripped-routing", ["scripts/diagnose.py", "--checkpoint", "{student_stripped}",
                                                  "--dataset", "gaussian", "--out", "{out}"], "router"),
    Case("diagnose-compare-missing", [*DIAG, "--compare", "/nonexistent/dit", "--out", "{out}"], "--compare"),
    Case("diagnose-device", [*DIAG, "--device", "cuda", "--out", "{out}"], "cuda"),
    Case("diagnose-n-0", [*DIAG, "--n", "0", "--out", "{out}"], "--n"),
    Case("diagnose-t-grid-1", [*DIAG, "--t-grid", "1", "--out", "{out}"], "--t-grid"),
    Case("diagnose-batch-0", [*DIAG, "--batch-size", "0", "--out", "{out}"], "--batch-size"),
    Case("diagnose-sublayers-text", [*DIAG, "--sublayers", "one,two", "--out", "{out}"], "--sublayers"),
    Case("diagnose-sublayers-range", [*DIAG, "--sublayers", "99", "--out", "{out}"], "99"),
    Case("diagnose-dataset-unknown", ["scripts/diagnose.py", "--checkpoint", "{teacher}", "--dataset", "bogus", "--out", "{out}"],
         "bogus"),
    Case("diagnose-threads-0", [*DIAG, "--threads", "0", "--out", "{out}"], "--threads"),
    # ---- make_regression_pairs
    Case("pairs-n-0", [*PAIRS[:-1], "0", "--out", "{out}"], "--n"),
    Case("pairs-batch-negative", [*PAIRS, "--batch", "-1", "--out", "{out}"], "--batch"),
    Case("pairs-no-out", PAIRS, "--out"),
    Case("pairs-out-is-a-folder", [*PAIRS, "--out", "{empty_dir}"], "folder", out="{empty_dir}"),
    Case("pairs-out-under-a-file", [*PAIRS, "--out", "{a_file}/pairs.npz"], "a_file", out="{a_file}"),
    Case("pairs-out-not-npz", [*PAIRS, "--out", "{out}.txt"], ".npz", out="{out}.txt"),
    Case("pairs-teacher-missing", [*PAIRS, "--out", "{out}.npz", "teacher=/nonexistent/teacher"], "teacher", out="{out}.npz"),
    Case("pairs-unknown-key", [*PAIRS, "--out", "{out}.npz", "eval.teacher_stepz=2"], "teacher_stepz", out="{out}.npz"),
    Case("pairs-sampler", [*PAIRS, "--out", "{out}.npz", "eval.teacher_sampler=bogus"], "teacher_sampler", out="{out}.npz"),
    Case("pairs-config-missing", ["scripts/make_regression_pairs.py", "--config", "/nonexistent.yaml", "--out", "{out}.npz"], "not found",
         out="{out}.npz"),
    # ---- train_classifier (never without --out: the default is the bundled classifier)
    Case("classifier-epochs-0", [CLF, "--out", "{out}", "--epochs", "0"], "--epochs"),
    Case("classifier-batch-negative", [CLF, "--out", "{out}", "--batch-size", "-1"], "--batch-size"),
    Case("classifier-lr-negative", [CLF, "--out", "{out}", "--lr", "-1"], "--lr"),
    Case("classifier-weight-decay-negative", [CLF, "--out", "{out}", "--weight-decay", "-1"], "--weight-decay"),
    Case("classifier-min-accuracy", [CLF, "--out", "{out}", "--min-accuracy", "2"], "--min-accuracy"),
    Case("classifier-threads-0", [CLF, "--out", "{out}", "--threads", "0"], "--threads"),
    Case("classifier-out-is-a-file", [CLF, "--out", "{a_file}", "--epochs", "1"], "not a folder", out="{a_file}"),
    Case("classifier-out-foreign-folder", [CLF, "--out", "{out}", "--epochs", "1"], "other files", setup="foreign_folder"),
    # ---- sample.py (owned elsewhere: failures are strict xfails naming the fix)
    Case("sample-n-0", [*SAMPLE, "--n", "0", "--out", "{out}"], "--n"),
    Case("sample-device", [*SAMPLE, "--device", "cuda", "--out", "{out}"], "cuda"),
    Case("sample-model-missing", ["scripts/sample.py", "/nonexistent/dit", "--out", "{out}"], "not found"),
    Case("sample-model-nan", ["scripts/sample.py", "{teacher_nan}", "--steps", "2", "--out", "{out}"], "non-finite"),
    Case("sample-model-stripped-routing", ["scripts/sample.py", "{student_stripped}", "--steps", "2", "--out", "{out}"], "router"),
    Case("sample-out-is-a-file", [*SAMPLE, "--out", "{a_file}"], "not a folder", out="{a_file}"),
    Case("sample-steps-0", [*SAMPLE, "--steps", "0", "--out", "{out}"], "--steps"),
    Case("sample-student-steps-0", [*SAMPLE, "--student-steps", "0", "--out", "{out}"], "--student-steps"),
    Case("sample-labels-range", [*SAMPLE, "--labels", "0,99", "--out", "{out}"], "--labels"),
    Case("sample-batch-0", [*SAMPLE, "--batch-size", "0", "--out", "{out}"], "--batch-size"),
    Case("sample-no-out", SAMPLE, "--out"),
    # ---- eval/quality.py
    Case("quality-set-missing", [QUAL, "/nonexistent/set.npz", "--out", "{out}.json"], "set.npz", out="{out}.json"),
    Case("quality-set-truncated", [QUAL, "{trunc_npz}", "--out", "{out}.json"], "trunc.npz", out="{out}.json"),
    Case("quality-set-not-npz", [QUAL, "{notnpz}", "--out", "{out}.json"], "notnpz.npz", out="{out}.json"),
    Case("quality-set-float", [QUAL, "{float_npz}", "--out", "{out}.json"], "float.npz", out="{out}.json"),
    Case("quality-set-mixed-sizes", [QUAL, "{pngs_mixed}", "--out", "{out}.json"], "pngs_mixed", out="{out}.json"),
    Case("quality-set-broken-png", [QUAL, "{pngs_broken}", "--out", "{out}.json"], "x.png", out="{out}.json"),
    Case("quality-set-empty-folder", [QUAL, "{empty_dir}", "--out", "{out}.json"], "empty_dir", out="{out}.json"),
    Case("quality-k-0", [QUAL, "{good_npz}", "--k", "0", "--out", "{out}.json"], "--k", out="{out}.json"),
    Case("quality-limit-1", [QUAL, "{good_npz}", "--limit", "1", "--out", "{out}.json"], "--limit", out="{out}.json"),
    Case("quality-out-is-a-folder", [QUAL, "{good_npz}", "--out", "{empty_dir}"], "folder", out="{empty_dir}"),
    Case("quality-out-under-a-file", [QUAL, "{good_npz}", "--out", "{a_file}/q.json"], "a_file", out="{a_file}"),
    Case("quality-device", [QUAL, "{good_npz}", "--device", "cuda", "--out", "{out}.json"], "cuda", out="{out}.json"),
    Case("quality-reference-unknown", [QUAL, "{good_npz}", "--reference", "bogus", "--out", "{out}.json"], "bogus",
         out="{out}.json"),
    Case("quality-classifier-missing", [QUAL, "{good_npz}", "--classifier", "/nonexistent/clf", "--out", "{out}.json"],
         "/nonexistent/clf", out="{out}.json"),
    # ---- eval/speckle.py
    Case("speckle-set-missing", ["eval/speckle.py", "/nonexistent/set.npz", "--out", "{out}.json"], "set.npz", out="{out}.json"),
    Case("speckle-set-truncated", ["eval/speckle.py", "{trunc_npz}", "--out", "{out}.json"], "trunc.npz", out="{out}.json"),
    Case("speckle-set-float", ["eval/speckle.py", "{float_npz}", "--out", "{out}.json"], "float.npz", out="{out}.json"),
    Case("speckle-out-is-a-folder", ["eval/speckle.py", "{good_npz}", "--out", "{empty_dir}"], "folder", out="{empty_dir}"),
    # ---- eval/spectral_report.py
    Case("spectral-reference-not-npz", [SPEC, "--reference", "{notnpz}", "--candidate", "c={good_npz}", "--out", "{out}"],
         "notnpz.npz"),
    Case("spectral-reference-truncated", [SPEC, "--reference", "{trunc_npz}", "--candidate", "c={good_npz}", "--out", "{out}"],
         "trunc.npz"),
    Case("spectral-candidate-rank3", [SPEC, "--reference", "{good_npz}", "--candidate", "c={rank3_npz}", "--out", "{out}"],
         "rank3.npz"),
    Case("spectral-candidate-no-name", [SPEC, "--reference", "{good_npz}", "--candidate", "{good_npz}", "--out", "{out}"],
         "NAME=PATH"),
    Case("spectral-sizes-differ", [SPEC, "--reference", "{good_npz}", "--candidate", "c={rgb32_npz}", "--out", "{out}"], "32"),
    Case("spectral-cutoffs-text", [*SPEC_OK, "--cutoffs", "high", "--out", "{out}"], "--cutoffs"),
    Case("spectral-cutoffs-range", [*SPEC_OK, "--cutoffs", "0.7", "--out", "{out}"], "0.7"),
    Case("spectral-bootstrap-negative", [*SPEC_OK[:-1], "-1", "--out", "{out}"], "--bootstrap"),
    Case("spectral-limit-0", [*SPEC_OK, "--limit", "0", "--out", "{out}"], "--limit"),
    Case("spectral-names-twice", [*SPEC_OK, "--candidate", "c={good_npz}", "--out", "{out}"], "unique"),
    Case("spectral-out-is-a-file", [*SPEC_OK, "--out", "{a_file}"], "not a folder", out="{a_file}"),
    Case("spectral-out-foreign-folder", [*SPEC_OK, "--out", "{out}"], "other files", setup="foreign_folder"),
    Case("spectral-missing-flag", [SPEC, "--candidate", "c={good_npz}", "--out", "{out}"], "--reference"),
    # ---- eval/bench_spectral.py (writes nothing: a mistake must still be one line and status 2)
    Case("bench-sizes-text", ["eval/bench_spectral.py", "--sizes", "big"], "--sizes"),
    Case("bench-sizes-0", ["eval/bench_spectral.py", "--sizes", "0"], "--sizes"),
    Case("bench-count-mismatch", ["eval/bench_spectral.py", "--sizes", "8,16", "--count", "4"], "--count"),
    Case("bench-count-0", ["eval/bench_spectral.py", "--sizes", "8", "--count", "0"], "--count"),
    Case("bench-threads-0", ["eval/bench_spectral.py", "--sizes", "8", "--count", "4", "--threads", "0"], "--threads"),
    Case("bench-repeats-0", ["eval/bench_spectral.py", "--sizes", "8", "--count", "4", "--repeats", "0"], "--repeats"),
    Case("bench-unknown-flag", ["eval/bench_spectral.py", "--bogus"], "--bogus"),
    # ---- eval/fid.py (owned elsewhere: failures are strict xfails naming the fix)
    Case("fid-n-1", [FID, "--real", "{good_npz}", "--fake", "{good_npz}", "--n", "1"], "--n"),
    Case("fid-fake-missing", [FID, "--real", "{good_npz}", "--fake", "/nonexistent/fake.npz"], "fake.npz"),
    Case("fid-fake-truncated", [FID, "--real", "{good_npz}", "--fake", "{trunc_npz}"], "trunc.npz"),
    Case("fid-device", [FID, "--real", "{good_npz}", "--fake", "{good_npz}", "--device", "cuda"], "cuda"),
    Case("fid-weights-missing", [FID, "--real", "{good_npz}", "--fake", "{good_npz}", "--weights", "/nonexistent/w.pt"],
         "w.pt"),
    Case("fid-batch-0", [FID, "--real", "{good_npz}", "--fake", "{good_npz}", "--batch-size", "0"], "--batch-size"),
    Case("fid-real-unknown", [FID, "--real", "bogus", "--fake", "{good_npz}"], "bogus"),
]
XFAIL: dict[str, str] = {}  # case id -> the fix needed in a file this battery's owner does not edit


# ------------------------------------------------------------------------------------------ setups
def _static_t_run(out: Path, world: dict[str, str]) -> None:
    """An existing distillation run (arm dar) whose checkpoint has query=static_t."""
    from dmd_dar.routing import RoutingConfig

    _fake_checkpoint(out / "dar", RoutingConfig(mode="dar", query="static_t").to_dict())


def _teacher_run(out: Path, world: dict[str, str]) -> None:
    """An existing teacher run whose checkpoint holds a hidden_size=32 model (the config asks for 64)."""
    from dmd_dar.models import DiT

    ckpt = out / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    model = DiT.from_pretrained(world["teacher"])
    model.save_pretrained(ckpt / "model")
    model.save_pretrained(ckpt / "ema")
    torch.save({"optimizer": {}, "scheduler": {}}, ckpt / "trainer_state.pt")
    (ckpt / "meta.json").write_text(json.dumps({"step": 2, "skipped_steps": 0}))


def _foreign_folder(out: Path, world: dict[str, str]) -> None:
    out.mkdir(parents=True)
    (out / "my_thesis.tex").write_text("not ours\n")


SETUPS = {"static_t_run": _static_t_run, "teacher_run": _teacher_run, "foreign_folder": _foreign_folder}


# ------------------------------------------------------------------------------------------ running
def snapshot(path: Path) -> dict[str, str] | None:
    """Every entry under `path` with a hash of its bytes (folders as 'dir'); None when `path` does not exist."""
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    tree = {".": "dir"}
    for p in sorted(path.rglob("*")):
        tree[str(p.relative_to(path))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return tree


def fill(text: str, names: dict[str, str]) -> str:
    for key, value in names.items():
        text = text.replace("{" + key + "}", value)
    return text


def run_in_zygote(jobs: list[dict], workers: int) -> dict[str, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BATTERY_WORKERS": str(workers), "BATTERY_TIMEOUT": str(CASE_TIMEOUT_S)}
    res = subprocess.run([PYTHON, "-c", ZYGOTE], input=json.dumps(jobs), capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=CASE_TIMEOUT_S * len(jobs) / workers + 120)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def battery(tmp_path_factory):
    """Build the inputs, run every case (in parallel, in the zygote's children) and return their outcomes."""
    root = tmp_path_factory.mktemp("battery")
    world = build_world(root)
    logs = root / "logs"
    logs.mkdir()
    jobs, before, watched = [], {}, {}
    only = set(filter(None, os.environ.get("BATTERY_ONLY", "").split(",")))  # debugging: run just these case ids
    for case in CASES:
        if only and case.id not in only:
            continue
        names = {**world, "out": str(root / "out" / case.id)}
        if case.setup:
            SETUPS[case.setup](Path(names["out"]), world)
        cwd = root / "cwd" / case.id  # each case runs in an empty folder of its own: nothing may appear there either
        cwd.mkdir(parents=True)
        watched[case.id] = [Path(fill(case.out, names)), cwd]
        before[case.id] = [snapshot(p) for p in watched[case.id]]
        argv = [str(REPO / case.argv[0]), *(fill(a, names) for a in case.argv[1:])]
        jobs.append({"id": case.id, "argv": argv, "cwd": str(cwd),
                     "stdout": str(logs / f"{case.id}.out"), "stderr": str(logs / f"{case.id}.err"),
                     "env": {"HF_HUB_OFFLINE": "1", **case.env}})
    inputs_before = snapshot(Path(world["in"]))
    workers = max(2, min(4, os.cpu_count() or 2))
    outcomes = run_in_zygote(jobs, workers)
    for case in CASES:
        if case.id not in outcomes:
            continue
        outcomes[case.id].update(stderr=(logs / f"{case.id}.err").read_text(errors="replace"),
                                 stdout=(logs / f"{case.id}.out").read_text(errors="replace"),
                                 before=before[case.id], after=[snapshot(p) for p in watched[case.id]],
                                 watched=[str(p) for p in watched[case.id]])
    if os.environ.get("BATTERY_DUMP"):
        Path(os.environ["BATTERY_DUMP"]).write_text(json.dumps(outcomes, indent=1))
    return {"world": world, "outcomes": outcomes, "inputs_before": inputs_before, "jobs": {j["id"]: j for j in jobs}}


def check_outcome(case: Case, outcome: dict) -> None:
    lines = [ln for ln in outcome["stderr"].splitlines() if ln.strip()]
    detail = f"{case.id}: rc={outcome['rc']} ({outcome['seconds']} s)\nstderr:\n{outcome['stderr'][-2500:]}"
    assert "Traceback" not in outcome["stderr"], detail
    assert outcome["rc"] == 2, detail
    assert len(lines) == 1, detail
    assert lines[0].startswith("error: ") and case.needle in lines[0], detail
    assert outcome["after"] == outcome["before"], f"{case.id} changed {outcome['watched']}: {detail}"


def _params():
    for case in CASES:
        marks = []
        reason = XFAIL.get(case.id) or case.xfail
        if reason:
            marks.append(pytest.mark.xfail(strict=True, reason=reason))
        if "cuda" in case.argv and torch.cuda.is_available():
            marks.append(pytest.mark.skip(reason="this machine has CUDA"))
        yield pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", list(_params()))
def test_bad_input_is_one_line_status_2_and_writes_nothing(battery, case):
    if case.id not in battery["outcomes"]:
        pytest.skip("not selected by BATTERY_ONLY")
    check_outcome(case, battery["outcomes"][case.id])


def test_the_battery_covers_every_entry_point_with_enough_cases():
    scripts = {str(p.relative_to(REPO)) for p in [*REPO.glob("scripts/*.py"), *REPO.glob("eval/*.py")]}
    covered = {case.argv[0] for case in CASES}
    assert scripts - covered <= OTHER_ENTRY_POINTS, f"entry points without a case: {sorted(scripts - covered - OTHER_ENTRY_POINTS)}"
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


def test_no_case_touched_the_shared_inputs(battery):
    now, then = snapshot(Path(battery["world"]["in"])), battery["inputs_before"]
    assert now == then, sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))


def test_the_zygote_matches_real_runs(battery):
    """Two cases again as plain `python SCRIPT ARGS` subprocesses: same status, same stderr."""
    for case_id in ("distill-batch-0", "diagnose-no-out"):
        job, outcome = battery["jobs"][case_id], battery["outcomes"][case_id]
        res = subprocess.run([PYTHON, *job["argv"]], cwd=job["cwd"], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1", **job["env"]})
        assert (res.returncode, res.stderr) == (outcome["rc"], outcome["stderr"]), res.stderr[-2000:]


# Entry points added by others while this battery was written; each gets its cases from its owner.
OTHER_ENTRY_POINTS = {"scripts/import_checkpoint.py", "scripts/extract_latents.py", "scripts/experiment.py"}


def test_dit_from_pretrained_refuses_a_routing_it_cannot_build_or_whose_weights_do_not_fit(tmp_path):
    """One UserError naming the folder; an explicit routing= still swaps the routing on purpose."""
    from dmd_dar.errors import UserError
    from dmd_dar.models import DiT

    teacher = _dit(tmp_path / "teacher")
    DiT.from_pretrained(teacher, routing={"mode": "dar", "query": "static_t"}).save_pretrained(tmp_path / "student")
    cases = {"query": {"mode": "dar", "query": "learned"}, "key": {"mode": "dar", "window": 3}, "text": "dar",
             "stripped": {"mode": "residual"}, "other_query": {"mode": "dar", "query": "dynamic"}}
    for name, routing in cases.items():
        folder = _edit_config(_copy(tmp_path / "student", tmp_path / name), routing=routing)
        with pytest.raises(UserError, match=str(folder)):
            DiT.from_pretrained(folder)
    backbone = DiT.from_pretrained(tmp_path / "stripped", routing={"mode": "residual"})  # on purpose: the backbone alone
    assert backbone.routing.mode == "residual"
    assert DiT.from_pretrained(tmp_path / "student").routing.query == "static_t"
