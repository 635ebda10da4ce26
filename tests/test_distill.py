"""End-to-end DMD distillation on a tiny DiT teacher (offline, CPU)."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dmd_dar.checkpoint import load_model_files
from dmd_dar.config import load_config
from dmd_dar.dmd.config import DistillConfig
from dmd_dar.dmd.trainer import run_distillation
from dmd_dar.models import DiT
from dmd_dar.training import TrainingDiverged

REPO = Path(__file__).resolve().parents[1]


def tiny_teacher(folder: Path, seed=0, **overrides) -> Path:
    torch.manual_seed(seed)
    kw = dict(input_size=16, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=3)
    kw.update(overrides)
    model = DiT(**kw)
    with torch.no_grad():  # a "trained" teacher: open gates, non-zero head
        for name, p in model.named_parameters():
            if not name.startswith("router."):
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


def tiny_config(tmp: Path, teacher: Path, **top) -> Path:
    cfg = {
        "seed": 0, "out_dir": str(tmp / "run"), "teacher": str(teacher), "steps": 4, "batch_size": 4,
        "log_every": 1, "sample_every": 2, "checkpoint_every": 2,
        "student": {"routing": {"mode": "dar", "query": "static_t"}, "optim": {"lr": 1e-3, "beta1": 0.0}, "ema_decay": 0.9},
        "fake": {"updates_per_student_step": 2, "optim": {"lr": 1e-3, "beta1": 0.0}},
        "eval": {"grid_images": 6, "teacher_steps": 2, "report_samples": 12, "reference": "", "every": 2, "batch": 6, "quality": False},
    }
    cfg.update(top)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(args, **env):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=600)


def assert_one_line_error(res, needle: str) -> None:
    """Exit status 2 and exactly one `error:` line on stderr, naming `needle`."""
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res.stderr[-2000:]


def weights(folder: Path) -> dict:
    return load_model_files(folder).state_dict


def test_tiny_distillation_end_to_end_and_resume_gives_the_same_student(tmp_path):
    teacher = tiny_teacher(tmp_path / "teacher")
    cfg_path = tiny_config(tmp_path, teacher)
    cfg = load_config(cfg_path, [], DistillConfig)
    summary = run_distillation(cfg)
    out = Path(cfg.out_dir)
    for name in ("teacher_grid.png", "comparison.png", "summary.json", "dar/student/model.safetensors",
                 "dar/student_grid.png", "dar/log.csv", "report/report.html", "report/metrics.json",
                 "samples/student_dar_1step.npz"):
        assert (out / name).exists(), name
    student = DiT.from_pretrained(out / "dar" / "student")
    assert student.routing.mode == "dar"
    assert summary["arms"]["dar"]["skipped_steps"] == 0
    log = (out / "dar" / "log.csv").read_text().splitlines()
    assert "student_hf_ratio" in log[0] and len(log) == 5
    # the router actually trained
    assert student.router.query_static.abs().sum() > 0

    # interrupted run: 2 steps, then resume to 4 with the same config -> identical weights
    cfg2 = load_config(cfg_path, [f"out_dir={tmp_path / 'run2'}", "steps=2", "eval.report_samples=0"], DistillConfig)
    run_distillation(cfg2)
    cfg2 = load_config(cfg_path, [f"out_dir={tmp_path / 'run2'}", "eval.report_samples=0"], DistillConfig)
    run_distillation(cfg2)
    a, b = weights(out / "dar" / "student"), weights(tmp_path / "run2" / "dar" / "student")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_both_arms_share_seeds_and_end_in_one_report(tmp_path):
    teacher = tiny_teacher(tmp_path / "teacher")
    cfg = load_config(tiny_config(tmp_path, teacher), ["steps=2", "arms=[dar,residual]"], DistillConfig)
    summary = run_distillation(cfg)
    assert set(summary["arms"]) == {"dar", "residual"}
    assert DiT.from_pretrained(Path(cfg.out_dir) / "residual" / "student").routing.mode == "residual"
    metrics = json.loads((Path(cfg.out_dir) / "report" / "metrics.json").read_text())
    assert {"student_dar_1step", "student_residual_1step"} <= set(json.dumps(metrics).replace('"', " ").split())
    # same draws: at step 0 both students start as the teacher's function, so their first fake-score
    # losses (same samples, same noises, same fake init) agree
    first = lambda arm: float((Path(cfg.out_dir) / arm / "log.csv").read_text().splitlines()[1].split(",")[1])  # noqa: E731
    assert abs(first("dar") - first("residual")) < 1e-4


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import dmd_dar.dmd.losses as losses

    teacher = tiny_teacher(tmp_path / "teacher")
    cfg = load_config(tiny_config(tmp_path, teacher), ["steps=10", "max_bad_steps=2", "eval.report_samples=0"], DistillConfig)
    real_loss, calls = losses.distribution_matching_loss, {"n": 0}

    def poisoned(x, real, fake):
        calls["n"] += 1
        loss = real_loss(x, real, fake)
        return loss * float("nan") if calls["n"] > 2 else loss

    monkeypatch.setattr(losses, "distribution_matching_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="2 non-finite steps in a row"):
        run_distillation(cfg)
    ckpts = sorted((Path(cfg.out_dir) / "dar" / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step_00000002"]
    state = weights(ckpts[0] / "student")
    assert all(torch.isfinite(v).all() for v in state.values())


@pytest.mark.parametrize(
    "override,needle",
    [
        (["student.optim.lrr=1"], "lrr"),
        (["steps=many"], "steps"),
        (["teacher=/nonexistent/teacher"], "teacher"),
        (["student.init={mismatch}"], "do not fit"),
        (["student.routing.query=learned"], "query"),
        (["student.timesteps=[0.5,1.0]"], "timesteps"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(tmp_path, override, needle):
    teacher = tiny_teacher(tmp_path / "teacher")
    other = tiny_teacher(tmp_path / "other", hidden_size=64)
    cfg = tiny_config(tmp_path, teacher)
    override = [o.replace("{mismatch}", str(other)) for o in override]
    assert_one_line_error(run_cli(["scripts/distill.py", "--config", str(cfg), *override]), needle)
    assert not (tmp_path / "run" / "dar" / "student").exists()


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    """2 CPU processes (accelerate MULTI_CPU over gloo, started by torchrun: accelerate's own launcher needs
    mpirun for CPU jobs) = 1 process at the same global batch."""
    teacher = tiny_teacher(tmp_path / "teacher")
    cfg = tiny_config(tmp_path, teacher, steps=2, checkpoint_every=2)
    common = ["eval.report_samples=0"]
    one = run_cli(["scripts/distill.py", "--config", str(cfg), f"out_dir={tmp_path / 'one'}", *common])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                   "scripts/distill.py", "--config", str(cfg), f"out_dir={tmp_path / 'two'}", *common],
                  ACCELERATE_USE_CPU="1")
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "two" / "dar" / "student").is_dir()
    a, b = weights(tmp_path / "one" / "dar" / "student"), weights(tmp_path / "two" / "dar" / "student")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


def test_monitor_flags_a_collapsing_run_and_exports_the_earliest_good_student(tmp_path, monkeypatch):
    """A run made to collapse on purpose (from its second update on, the student is pushed to one constant
    image): the monitor flags it in the log, and with eval.select the exported student is the state of the
    only healthy evaluation, step 1, not the collapsed last one."""
    import dmd_dar.dmd.losses as losses

    teacher = tiny_teacher(tmp_path / "teacher")
    cfg = load_config(tiny_config(tmp_path, teacher), [
        "steps=6", "checkpoint_every=6", "eval.every=1", "eval.report_samples=0", "eval.select=hf_ratio_vs_teacher",
        "student.ema_decay=0", "student.optim.lr=0.05", "student.optim.grad_clip=0"], DistillConfig)
    real_loss, calls = losses.distribution_matching_loss, {"n": 0}

    def collapsing(x, real, fake):
        calls["n"] += 1
        return real_loss(x, real, fake) if calls["n"] == 1 else ((x.float() - 1.0) ** 2).mean()

    monkeypatch.setattr(losses, "distribution_matching_loss", collapsing)
    summary = run_distillation(cfg)
    with open(Path(cfg.out_dir) / "dar" / "log.csv") as f:
        log = list(csv.DictReader(f))
    alerts = {int(r["step"]): float(r["alert"]) for r in log if r.get("alert")}
    assert alerts[1] == 0.0 and alerts[6] == 1.0, alerts
    assert float(log[-1]["alert_collapse"]) == 1.0 or float(log[-1]["alert_saturation"]) == 1.0
    best = json.loads((Path(cfg.out_dir) / "dar" / "best.json").read_text())
    assert best["step"] == 1 and summary["arms"]["dar"]["exported_step"] == 1
    exported, kept = weights(Path(cfg.out_dir) / "dar" / "student"), weights(Path(cfg.out_dir) / "dar" / "best")
    for k in exported:
        torch.testing.assert_close(exported[k], kept[k], rtol=0, atol=0, msg=k)
    last = weights(Path(cfg.out_dir) / "dar" / "checkpoints" / "step_00000006" / "student")
    assert any(not torch.equal(exported[k], last[k]) for k in exported)


def test_quality_of_an_mnist_shaped_run_is_monitored_and_reported(tmp_path):
    """With eval.quality on a digit-shaped teacher, the monitor logs classifier FD / accuracy and the job ends
    with the quality of the teacher's and the student's report samples (same noises and labels)."""
    teacher = tiny_teacher(tmp_path / "teacher", input_size=32, patch_size=8, num_classes=10)
    cfg = load_config(tiny_config(tmp_path, teacher), [
        "steps=2", "eval.every=2", "eval.batch=8", "eval.quality=true", "eval.reference=mnist", "eval.select=fd",
        "eval.report_samples=12"], DistillConfig)
    summary = run_distillation(cfg)
    header = (Path(cfg.out_dir) / "dar" / "log.csv").read_text().splitlines()[0].split(",")
    assert {"fd", "accuracy", "precision", "recall", "alert", "diversity_vs_teacher"} <= set(header)
    assert (Path(cfg.out_dir) / "monitor.png").stat().st_size > 1000  # the monitored metrics against the step
    quality = json.loads((Path(cfg.out_dir) / "quality.json").read_text())
    assert set(quality) == {"teacher_2step", "student_dar_1step"} == set(summary["report"]["quality"])
    for q in quality.values():
        assert q["space"] == "classifier" and q["n"] == 12 and 0 <= q["accuracy"] <= 1 and q["fd"] > 0


@pytest.mark.parametrize(
    "override,needle",
    [
        (["batch_size=0"], "batch_size"),
        (["batch_size=-4"], "batch_size"),
        (["steps=0"], "steps"),
        (["checkpoint_every=0"], "checkpoint_every"),
        (["student.optim.lr=-1"], "lr"),
        (["student.optim.lr=1e39"], "lr"),
        (["eval.teacher_steps=0"], "teacher_steps"),
        (["eval.teacher_sampler=bogus"], "teacher_sampler"),
        (["eval.reference=bogus"], "eval.reference"),
        (["student.init=/nonexistent/student"], "student.init"),
        (["out_dir={file}"], "not a folder"),
        (["time_limit_min=-1"], "time_limit_min"),
        (["time_limit_min=nan"], "time_limit_min"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(tmp_path, override, needle):
    teacher = tiny_teacher(tmp_path / "teacher")
    cfg = tiny_config(tmp_path, teacher)
    (tmp_path / "a_file").write_text("mine")
    override = [o.replace("{file}", str(tmp_path / "a_file")) for o in override]
    assert_one_line_error(run_cli(["scripts/distill.py", "--config", str(cfg), *override]), needle)
    assert not (tmp_path / "run").exists() and (tmp_path / "a_file").read_text() == "mine"


def test_resuming_into_a_run_of_another_routing_is_refused_at_once(tmp_path):
    teacher = tiny_teacher(tmp_path / "teacher")
    cfg = tiny_config(tmp_path, teacher, steps=2, checkpoint_every=2)
    first = run_cli(["scripts/distill.py", "--config", str(cfg), "eval.report_samples=0"])
    assert first.returncode == 0, first.stderr[-2000:]
    before = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "run").rglob("*"))
    res = run_cli(["scripts/distill.py", "--config", str(cfg), "eval.report_samples=0", "steps=4",
                   "student.routing.query=dynamic"])
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "routing" in lines[0] and "resume=false" in lines[0], res.stderr[-2000:]
    assert sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "run").rglob("*")) == before


def test_router_lr_scale_slows_only_the_router(tmp_path):
    """Adam moves each parameter by about lr per step: at router_lr_scale=1e-6 the router barely leaves its
    zero initialisation (< 4 steps x 1e-9) while the rest of the student trains at full rate."""
    teacher = tiny_teacher(tmp_path / "teacher")
    cfg = load_config(tiny_config(tmp_path, teacher), ["eval.report_samples=0", "student.ema_decay=0",
                                                       "student.router_lr_scale=1e-6"], DistillConfig)
    run_distillation(cfg)
    student = DiT.from_pretrained(Path(cfg.out_dir) / "dar" / "student")
    start = DiT.from_pretrained(teacher, routing=student.routing)
    assert float(student.router.query_static.detach().abs().max()) < 1e-8
    moved = [float((p - q).detach().abs().max()) for (n, p), q in zip(student.named_parameters(), start.parameters())
             if not n.startswith("router.")]
    assert max(moved) > 1e-4


KILL_DURING_PRUNING = """
import os, signal, sys
from pathlib import Path
import dmd_dar.training as training
from dmd_dar.config import load_config
from dmd_dar.dmd.config import DistillConfig
from dmd_dar.dmd.trainer import run_distillation

def dying_rmtree(path, ignore_errors=False):
    files = sorted(Path(path).rglob("*.safetensors"))
    files[0].unlink()  # the deletion has begun...
    os.kill(os.getpid(), signal.SIGKILL)  # ...and the process dies in the middle of it

training.shutil.rmtree = dying_rmtree
run_distillation(load_config(sys.argv[1], sys.argv[2:], DistillConfig))
"""


def test_a_kill_during_checkpoint_pruning_resumes_to_the_same_student(tmp_path):
    """SIGKILL while keep_last prunes an old checkpoint: the half-deleted folder is never taken for a checkpoint,
    start-up removes it, and the resumed run ends with the uninterrupted run's student, bit for bit."""
    teacher = tiny_teacher(tmp_path / "teacher")
    cfg = tiny_config(tmp_path, teacher, steps=4, checkpoint_every=1, keep_last=1)
    common = ["eval.report_samples=0"]
    whole = run_cli(["scripts/distill.py", "--config", str(cfg), f"out_dir={tmp_path / 'whole'}", *common])
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = run_cli(["-c", KILL_DURING_PRUNING, str(cfg), f"out_dir={tmp_path / 'killed'}", *common])
    assert killed.returncode == -9, killed.stderr[-2000:]
    ckpts = tmp_path / "killed" / "dar" / "checkpoints"
    assert any(p.name.startswith(".step_00000001.trash-") for p in ckpts.iterdir())  # killed mid-deletion
    resumed = run_cli(["scripts/distill.py", "--config", str(cfg), f"out_dir={tmp_path / 'killed'}", *common])
    assert resumed.returncode == 0 and "resuming" in resumed.stdout + resumed.stderr, resumed.stderr[-2000:]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000004"]
    a, b = weights(tmp_path / "whole" / "dar" / "student"), weights(tmp_path / "killed" / "dar" / "student")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_a_run_whose_every_step_was_skipped_fails_and_exports_nothing(tmp_path, monkeypatch):
    import dmd_dar.dmd.losses as losses

    teacher = tiny_teacher(tmp_path / "teacher")
    cfg = load_config(tiny_config(tmp_path, teacher), ["steps=3", "max_bad_steps=10", "eval.report_samples=0"], DistillConfig)
    monkeypatch.setattr(losses, "distribution_matching_loss", lambda x, real, fake: x.float().mean() * float("nan"))
    with pytest.raises(TrainingDiverged, match="nothing was trained"):
        run_distillation(cfg)
    assert not (Path(cfg.out_dir) / "dar" / "student").exists()


def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_holder(tmp_path):
    teacher = tiny_teacher(tmp_path / "teacher")
    cfg = tiny_config(tmp_path, teacher, steps=1, checkpoint_every=1)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text(f"{os.getpid()}\n")  # held by a live process: this test
    res = run_cli(["scripts/distill.py", "--config", str(cfg), "eval.report_samples=0"])
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and f"in use by another run (pid {os.getpid()})" in lines[0], res.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]
    (tmp_path / "run" / ".lock").write_text("999999999\n")  # left by a killed run: taken over
    res = run_cli(["scripts/distill.py", "--config", str(cfg), "eval.report_samples=0"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert not (tmp_path / "run" / ".lock").exists() and (tmp_path / "run" / "dar" / "student").is_dir()


def test_a_teacher_with_non_finite_weights_is_named_and_nothing_is_written(tmp_path):
    from safetensors.torch import load_file, save_file

    teacher = tiny_teacher(tmp_path / "teacher")
    state = load_file(str(teacher / "model.safetensors"))
    name = next(k for k in state if k.endswith("weight"))
    state[name][0] = float("nan")
    save_file(state, str(teacher / "model.safetensors"))  # written around our writer, which would refuse it
    res = run_cli(["scripts/distill.py", "--config", str(tiny_config(tmp_path, teacher))])
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and f"teacher {teacher} has non-finite weights" in lines[0], res.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_teacher_samples_are_cached_by_weights_guidance_and_noises(tmp_path, monkeypatch):
    """eval.teacher_cache: a second run of the same teacher and seed reads the teacher's samples instead of
    sampling, and gets the same report; another guidance or another teacher is another entry."""
    import dmd_dar.dmd.trainer as trainer
    from dmd_dar.image_io import load_images

    teacher = tiny_teacher(tmp_path / "teacher")
    cache = tmp_path / "cache"
    base = ["steps=1", f"eval.teacher_cache={cache}"]
    cfg_path = tiny_config(tmp_path, teacher)
    run_distillation(load_config(cfg_path, [*base, f"out_dir={tmp_path / 'a'}"], DistillConfig))
    (entry,) = cache.glob("teacher_*.safetensors")

    calls = []
    real = trainer.teacher_images
    monkeypatch.setattr(trainer, "teacher_images", lambda *a, **k: calls.append(1) or real(*a, **k))
    run_distillation(load_config(cfg_path, [*base, f"out_dir={tmp_path / 'b'}"], DistillConfig))
    assert calls == [], "the second run sampled the teacher again"
    a = load_images(tmp_path / "a" / "samples" / "teacher_2step.npz")
    b = load_images(tmp_path / "b" / "samples" / "teacher_2step.npz")
    torch.testing.assert_close(a, b, rtol=0, atol=0)

    run_distillation(load_config(cfg_path, [*base, f"out_dir={tmp_path / 'c'}", "dm.guidance_scale=3.0"], DistillConfig))
    other = tiny_teacher(tmp_path / "teacher2", seed=1)
    run_distillation(load_config(cfg_path, [*base, f"out_dir={tmp_path / 'd'}", f"teacher={other}"], DistillConfig))
    assert len(calls) == 2 and len(list(cache.glob("teacher_*.safetensors"))) == 3


@pytest.mark.parametrize("head", ["pooled", "tokens"])
def test_gan_start_step_adds_the_gan_terms_only_from_that_student_step(tmp_path, head):
    """DMD2's second stage in one run: the discriminator and generator GAN losses are logged (and trained) only
    from student update `gan.start_step` on, and the head trains from there."""
    import numpy as np

    teacher = tiny_teacher(tmp_path / "teacher")
    real = np.random.default_rng(0).integers(0, 256, size=(16, 16, 16, 1), dtype=np.uint8)
    np.savez(tmp_path / "real.npz", real, np.arange(16) % 3)
    cfg = load_config(tiny_config(tmp_path, teacher, steps=4, checkpoint_every=2),
                      ["eval.report_samples=0", "gan.enabled=true", f"gan.dataset={tmp_path / 'real.npz'}",
                       "gan.start_step=2", "gan.discriminator_weight=0.01", f"gan.head={head}", "gan.head_lr_scale=10"], DistillConfig)
    run_distillation(cfg)
    with open(Path(cfg.out_dir) / "dar" / "log.csv") as f:
        rows = {int(r["step"]): r for r in csv.DictReader(f)}
    assert [bool(rows[s]["disc_loss"]) for s in (1, 2, 3, 4)] == [False, False, True, True]
    assert [bool(rows[s]["gan_loss"]) for s in (1, 2, 3, 4)] == [False, False, True, True]
    ckpts = sorted((Path(cfg.out_dir) / "dar").glob("checkpoints/*"))
    assert len(ckpts) == 2
    first, last = weights(ckpts[0] / "gan_head"), weights(ckpts[1] / "gan_head")
    assert any(not torch.equal(first[k], last[k]) for k in first)
    from dmd_dar.training import load_run_checkpoint

    groups = load_run_checkpoint(ckpts[1])[1]["fake_opt"]["param_groups"]  # the head in its own group, at 10x the fake lr
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(10 * groups[0]["lr"], rel=1e-12)
    assert len(groups[1]["params"]) == len(first)


def test_discriminator_sees_each_real_image_under_its_own_label_at_the_gan_times(tmp_path, monkeypatch):
    """The discriminator's real batch is conditioned on the real images' labels (not the generated batch's), and
    every GAN call (discriminator and generator) uses t in [gan.t_min, gan.t_max]."""
    import numpy as np

    from dmd_dar.dmd.method import FakeScore

    teacher = tiny_teacher(tmp_path / "teacher")
    real = np.random.default_rng(0).integers(0, 256, size=(16, 16, 16, 1), dtype=np.uint8)
    np.savez(tmp_path / "real.npz", real, np.full(16, 2))  # every real digit is class 2
    calls, original = [], FakeScore.gan_logits
    monkeypatch.setattr(FakeScore, "gan_logits", lambda self, x_t, t, cond: calls.append((t.clone(), cond.clone())) or original(self, x_t, t, cond))
    cfg = load_config(tiny_config(tmp_path, teacher, steps=3, batch_size=8, checkpoint_every=3),
                      ["eval.report_samples=0", "gan.enabled=true", f"gan.dataset={tmp_path / 'real.npz'}",
                       "gan.t_min=0.1", "gan.t_max=0.2"], DistillConfig)
    run_distillation(cfg)
    per_step = 2 * 2 + 1  # 2 fake updates x (real, generated) + the generator's call
    assert len(calls) == 3 * per_step
    for step in range(3):
        group = calls[step * per_step:(step + 1) * per_step]
        real_calls, generated_calls = group[0:4:2], [*group[1:4:2], group[4]]
        assert all(bool((c == 2).all()) for _, c in real_calls)
        assert any(bool((c != 2).any()) for _, c in generated_calls)  # the draw's labels, over 0-2
        assert all(bool(((t >= 0.1) & (t <= 0.2)).all()) for t, _ in group)


def test_gan_dataset_without_labels_for_a_class_conditional_teacher_is_refused_before_writing(tmp_path):
    import numpy as np

    teacher = tiny_teacher(tmp_path / "teacher")
    np.savez(tmp_path / "real.npz", np.zeros((8, 16, 16, 1), dtype=np.uint8))
    cfg = tiny_config(tmp_path, teacher)
    assert_one_line_error(run_cli(["scripts/distill.py", "--config", str(cfg), "gan.enabled=true",
                                   f"gan.dataset={tmp_path / 'real.npz'}"]), "has no labels")
    assert not (tmp_path / "run").exists()


def test_gan_t_range_is_checked():
    from dmd_dar.dmd.config import GanConfig
    from dmd_dar.errors import ConfigError

    with pytest.raises(ConfigError, match="gan.t_min=0.5, gan.t_max=0.2"):
        GanConfig(t_min=0.5, t_max=0.2)


def test_gan_start_step_past_the_run_is_refused(tmp_path):
    teacher = tiny_teacher(tmp_path / "teacher")
    cfg = tiny_config(tmp_path, teacher)
    assert_one_line_error(run_cli(["scripts/distill.py", "--config", str(cfg), "gan.enabled=true", "gan.start_step=4"]),
                          "gan.start_step")
    assert not (tmp_path / "run").exists()


def test_a_time_limit_stops_with_a_checkpoint_and_the_same_command_resumes_to_the_uninterrupted_student(tmp_path):
    """time_limit_min: the loop stops after the first step past the budget (here: every step is past it), writes a
    checkpoint there, exports and reports that student; the same command without the limit resumes to `steps` and
    ends at exactly the student of a run that was never stopped."""
    teacher = tiny_teacher(tmp_path / "teacher")
    cfg_path = tiny_config(tmp_path, teacher, steps=4, checkpoint_every=4)
    whole = load_config(cfg_path, [f"out_dir={tmp_path / 'whole'}", "eval.report_samples=0"], DistillConfig)
    run_distillation(whole)
    cut = [f"out_dir={tmp_path / 'cut'}", "eval.report_samples=0"]
    summary = run_distillation(load_config(cfg_path, [*cut, "time_limit_min=1e-9"], DistillConfig))
    arm = summary["arms"]["dar"]
    assert arm["steps_done"] == 1 and arm["exported_step"] == 1 and arm["steps"] == 4
    assert [p.name for p in (tmp_path / "cut" / "dar" / "checkpoints").iterdir()] == ["step_00000001"]
    assert (tmp_path / "cut" / "dar" / "student" / "model.safetensors").is_file()
    summary = run_distillation(load_config(cfg_path, cut, DistillConfig))
    assert summary["arms"]["dar"]["steps_done"] == 4
    a, b = weights(tmp_path / "whole" / "dar" / "student"), weights(tmp_path / "cut" / "dar" / "student")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_gan_head_tokens_gives_one_logit_per_token_from_the_same_mlp_the_pooled_head_uses(tmp_path):
    """`gan.head=pooled`: head(mean of the fake score's tokens), [B]; `tokens`: head on every token, [B, N]
    (N = (16 / 4)^2 patches), token by token the same function of that token's feature."""
    from dmd_dar.dmd.config import GanConfig
    from dmd_dar.dmd.family import DiTFamily
    from dmd_dar.dmd.method import FakeScore, make_gan_head
    from dmd_dar.errors import ConfigError

    family = DiTFamily(str(tiny_teacher(tmp_path / "teacher")), torch.device("cpu"))
    model = family.teacher()
    torch.manual_seed(0)
    head = make_gan_head(family.feature_dim)
    x_t, t, cond = torch.randn(3, 1, 16, 16), torch.tensor([0.2, 0.5, 0.9]), family.conditions(torch.tensor([0, 1, 2]))
    with torch.no_grad():
        tokens = family.hidden_features(model, x_t, t, cond)
        pooled = FakeScore(family, model, head, "pooled").gan_logits(x_t, t, cond)
        per_token = FakeScore(family, model, head, "tokens").gan_logits(x_t, t, cond)
        assert tokens.shape == (3, 16, family.feature_dim) and pooled.shape == (3,) and per_token.shape == (3, 16)
        torch.testing.assert_close(pooled, head(tokens.mean(1)).squeeze(-1), rtol=0, atol=0)
        for i in (0, 7, 15):
            torch.testing.assert_close(per_token[:, i], head(tokens[:, i]).squeeze(-1), rtol=1e-6, atol=1e-6)
    with pytest.raises(ConfigError, match="gan.head='conv' is unknown; use one of pooled, tokens"):
        GanConfig(head="conv")
