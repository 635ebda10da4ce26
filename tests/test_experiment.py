"""The experiment runner (dmd_dar/dmd/experiment.py, scripts/experiment.py) and its statistics (dmd_dar/metrics/stats.py).

The grid test runs 2 seeds x 2 arms of a tiny teacher through the command line in 2 processes, checks the tables
against the per-run records by hand, and runs the command again to see every run skipped; the resume test
interrupts a run after its first checkpoint and continues it through the trainer's own resume."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dmd_dar.checkpoint import read_json
from dmd_dar.config import load_config
from dmd_dar.data import load_dataset
from dmd_dar.dmd.config import DistillConfig
from dmd_dar.dmd.experiment import ARMS, parse_list, parse_vary, plan_experiment, run_experiment
from dmd_dar.errors import UserError
from dmd_dar.image_io import save_images
from dmd_dar.metrics.stats import paired_interval, t_cdf, t_interval, t_quantile

REPO = Path(__file__).resolve().parents[1]
T_975_1 = 12.7062047361747  # Student t, 97.5% quantile, 1 degree of freedom (tan(0.475 pi))

# Printed tables (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2), 3 decimals.
T_TABLE = {
    0.95: {1: 6.314, 2: 2.920, 3: 2.353, 5: 2.015, 10: 1.812, 30: 1.697, 100: 1.660},
    0.975: {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
            15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 100: 1.984},
    0.995: {1: 63.657, 2: 9.925, 3: 5.841, 5: 4.032, 10: 3.169, 30: 2.750, 100: 2.626},
}


# ------------------------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("p", sorted(T_TABLE))
def test_t_quantile_matches_the_printed_table(p):
    for df, value in T_TABLE[p].items():
        assert round(t_quantile(p, df), 3) == pytest.approx(value, abs=1e-9), (p, df)
        assert t_quantile(1 - p, df) == pytest.approx(-t_quantile(p, df), rel=1e-12)


def test_t_quantile_matches_the_closed_forms_and_the_normal_limit():
    for p in (0.6, 0.9, 0.975, 0.999):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)  # Cauchy
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-10)
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)
    assert t_cdf(0.0, 3) == pytest.approx(0.5) and t_cdf(t_quantile(0.9, 7), 7) == pytest.approx(0.9, abs=1e-12)
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_t_interval_and_the_paired_difference_give_known_values():
    iv = t_interval([1, 2, 3, 4, 5])  # mean 3, sd sqrt(2.5), t(0.975, 4) = 2.776445
    assert (iv.mean, iv.n) == (3.0, 5) and iv.sd == pytest.approx(math.sqrt(2.5))
    assert (iv.low, iv.high) == pytest.approx((3 - 2.776445 * math.sqrt(0.5), 3 + 2.776445 * math.sqrt(0.5)), abs=1e-6)
    assert t_interval([7.0]).to_dict() == {"mean": 7.0, "low": None, "high": None, "n": 1, "sd": None, "confidence": 0.95}
    assert t_interval([]).mean is None and t_interval([None, 2.0]).n == 1
    # paired: only the seeds both arms have; the interval is that of the differences
    diffs, iv = paired_interval({0: 0.72, 1: 0.70, 2: 0.75, 3: 0.9}, {0: 0.68, 1: 0.69, 2: 0.70})
    assert diffs == pytest.approx({0: 0.04, 1: 0.01, 2: 0.05})
    sd = math.sqrt(((0.04 - 1 / 30) ** 2 + (0.01 - 1 / 30) ** 2 + (0.05 - 1 / 30) ** 2) / 2)
    assert iv.mean == pytest.approx(1 / 30) and iv.high - iv.mean == pytest.approx(4.302653 * sd / math.sqrt(3), rel=1e-6)
    assert t_interval([1, 2, 3], confidence=0.9).high == pytest.approx(2 + 2.919986 / math.sqrt(3), rel=1e-6)


# ------------------------------------------------------------------------------------------- planning
def test_command_line_lists_and_plan_errors(tmp_path):
    assert parse_list("0, 1,2", "--seeds") == ["0", "1", "2"]
    assert parse_vary(["student.timesteps=[1.0],[1.0,0.5]", "dm.guidance_scale=1.5,2"]) == [
        ("student.timesteps", ["[1.0]", "[1.0,0.5]"]), ("dm.guidance_scale", ["1.5", "2"])]
    for bad in (["seed=1,2"], ["x"], ["a=1", "a=2"], ["a=1,,2"]):
        with pytest.raises(UserError):
            parse_vary(bad)
    config = REPO / "configs" / "default.yaml"
    with pytest.raises(UserError, match="unknown arm"):
        plan_experiment(config, [0], ["residual", "dar_magic"], tmp_path / "x")
    with pytest.raises(UserError, match="sets seed itself"):
        plan_experiment(config, [0], ["dar"], tmp_path / "x", overrides=["seed=3"])
    with pytest.raises(UserError, match="run dar_s0"):  # every run's config is loaded before anything runs
        plan_experiment(config, [0], ["dar"], tmp_path / "x", vary=[("student.optim.lrr", ["1"])])
    plan = plan_experiment(config, [0, 1], ["residual", "dar_c4_sum"], tmp_path / "x",
                           vary=[("dm.guidance_scale", ["1.5", "2.0"])], overrides=["steps=10"])
    assert [s.name for s in plan.runs[:2]] == ["residual_s0__dm.guidance_scale=1.5", "dar_c4_sum_s0__dm.guidance_scale=1.5"]
    assert len(plan.runs) == 8 and plan.groups == ["dm.guidance_scale=1.5", "dm.guidance_scale=2.0"]
    cfg = load_config(config, plan.runs[1].overrides, DistillConfig)
    assert (cfg.steps, cfg.seed, cfg.dm.guidance_scale, cfg.arms) == (10, 0, 1.5, [])
    assert cfg.student.routing.to_dict() | ARMS["dar_c4_sum"] == cfg.student.routing.to_dict()
    assert cfg.out_dir == str(tmp_path / "x" / "runs" / plan.runs[1].name)
    assert load_config(config, plan.runs[0].overrides, DistillConfig).student.routing.mode == "residual"


# ------------------------------------------------------------------------------------------- the grid
def tiny_setup(tmp: Path) -> Path:
    """A 32x32 one-channel tiny teacher (the classifier space applies: fast quality) and a 200-digit reference."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_distill import tiny_teacher

    teacher = tiny_teacher(tmp / "teacher", input_size=32, patch_size=8)
    digits = load_dataset("mnist", split="heldout").images
    save_images(digits[torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))[:200]], tmp / "ref.npz")
    cfg = {
        "teacher": str(teacher), "steps": 4, "batch_size": 4, "log_every": 1, "sample_every": 2, "checkpoint_every": 2,
        "student": {"routing": {"mode": "dar", "query": "static_t"}, "optim": {"lr": 1e-3, "beta1": 0.0}, "ema_decay": 0.9},
        "fake": {"updates_per_student_step": 1, "optim": {"lr": 1e-3, "beta1": 0.0}},
        "eval": {"grid_images": 6, "teacher_steps": 2, "report_samples": 16, "reference": str(tmp / "ref.npz"),
                 "every": 2, "batch": 8, "quality": True},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(*args):
    return subprocess.run([sys.executable, "scripts/experiment.py", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grid")
    config = tiny_setup(tmp)
    out = tmp / "exp"
    args = ["--config", str(config), "--seeds", "0,1", "--arms", "residual,dar", "--out", str(out)]
    res = run_cli(*args, "--processes", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    return config, out, args, res


def test_grid_of_two_seeds_and_two_arms_gives_the_tables_and_the_paired_differences(grid):
    config, out, args, res = grid
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("[")]
    assert len(lines) == 4 and lines[-1].startswith("[####################] 4/4"), res.stdout
    assert all(" FD " in ln and "hp-FD" in ln and "HF@0.25" in ln for ln in lines)
    data = json.loads((out / "experiment.json").read_text())
    assert data["runs_finished"] == 4 and data["pending"] == [] and data["baseline"] == "residual"
    runs = {(r["arm"], r["seed"]): read_json(out / "runs" / r["name"] / "run.json") for r in data["runs"]}
    assert set(runs) == {(a, s) for a in ("residual", "dar") for s in (0, 1)}
    assert runs[("dar", 0)]["routing"]["mode"] == "dar" and runs[("residual", 1)]["routing"]["mode"] == "residual"

    entry = data["summary"][""]
    metrics = entry["metric_names"]
    assert {"fd", "accuracy", "precision", "recall", "hp_fd", "hp_kid", "hf_retention@0.25", "lsd_db", "slope",
            "band_ratio@0.25-0.375"} <= set(metrics)
    # per arm: the t interval across the two seeds, by hand
    for arm in ("residual", "dar"):
        for m in metrics:
            a, b = runs[(arm, 0)]["student"]["metrics"][m], runs[(arm, 1)]["student"]["metrics"][m]
            got = entry["arms"][arm]["metrics"][m]
            assert got["n"] == 2 and got["mean"] == pytest.approx((a + b) / 2, rel=1e-12, abs=1e-15)
            assert got["high"] - got["mean"] == pytest.approx(T_975_1 * abs(a - b) / 2, rel=1e-9, abs=1e-15)
    # paired: dar - residual seed by seed, and the t interval of the two differences
    paired = entry["paired"]["arms"]["dar"]
    assert set(entry["paired"]["arms"]) == {"dar"}
    for m in metrics:
        d = [runs[("dar", s)]["student"]["metrics"][m] - runs[("residual", s)]["student"]["metrics"][m] for s in (0, 1)]
        assert paired[m]["per_seed"] == pytest.approx({"0": d[0], "1": d[1]}, rel=1e-12, abs=1e-15)
        assert paired[m]["mean"] == pytest.approx(sum(d) / 2, rel=1e-12, abs=1e-15)
        assert paired[m]["high"] - paired[m]["mean"] == pytest.approx(T_975_1 * abs(d[0] - d[1]) / 2, rel=1e-9, abs=1e-15)
    # the teacher: its report samples of each seed (the same for both arms of a seed)
    assert runs[("dar", 0)]["teacher"]["metrics"] == runs[("residual", 0)]["teacher"]["metrics"]
    assert entry["teacher"]["seeds"] == [0, 1]
    # the arms share their draws: at step 0 both students are the teacher's function, so the first fake-score
    # losses (same samples, noises and fake init) agree
    first = lambda arm: float((out / "runs" / f"{arm}_s0" / arm / "log.csv").read_text().splitlines()[1].split(",")[1])  # noqa: E731
    assert abs(first("dar") - first("residual")) < 1e-4

    # results.md: the per-arm table has the teacher and both arms, one column per headline metric
    md = (out / "results.md").read_text()
    table = md.split("### Per arm")[1].split("\n\n")[1].splitlines()
    headline = [m for m in metrics if not m.startswith("band_ratio@")]
    assert [row.split(" | ")[0].strip("| ") for row in table[2:]] == ["teacher", "residual", "dar"]
    assert all(row.count("|") == len(headline) + 3 for row in table)
    assert "dar − residual" in md and "s0: " in md and "### Energy per band" in md
    page = (out / "results.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "<table>" in page

    # the same command again: every run is finished, none runs again
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/run.json")}
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier (skipped)") == 4
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/run.json")}


class Interrupted(BaseException):
    """Stands for a kill: not an Exception, so nothing on the way catches it."""


def test_an_interrupted_run_resumes_through_the_trainer_and_ends_as_the_uninterrupted_one(grid, tmp_path, monkeypatch):
    import dmd_dar.dmd.method as method

    config, grid_out, _, _ = grid
    plan = plan_experiment(config, [0], ["residual"], tmp_path / "exp")
    real_step = method.DMD.train_step

    def interrupted_step(self, step):
        if step == 2:  # after the checkpoint of step 2
            raise Interrupted
        return real_step(self, step)

    monkeypatch.setattr(method.DMD, "train_step", interrupted_step)
    with pytest.raises(Interrupted):
        run_experiment(plan, echo=lambda line: None)
    run_dir = tmp_path / "exp" / "runs" / "residual_s0"
    assert (run_dir / "residual" / "checkpoints" / "step_00000002").is_dir() and not (run_dir / "run.json").exists()

    monkeypatch.setattr(method.DMD, "train_step", real_step)
    lines = []
    run_experiment(plan, echo=lines.append)
    assert len(lines) == 1 and lines[0].startswith("[####################] 1/1  residual_s0: FD")
    assert "from step 2" in (tmp_path / "exp" / "logs" / "residual_s0.log").read_text()
    resumed = read_json(run_dir / "run.json")["student"]["metrics"]
    uninterrupted = read_json(grid_out / "runs" / "residual_s0" / "run.json")["student"]["metrics"]
    assert resumed == pytest.approx(uninterrupted, rel=1e-6, abs=1e-9)


def test_twemoji_config_loads_with_a_real_reference_and_no_guidance():
    cfg = load_config(REPO / "configs" / "twemoji_dmd2.yaml", [], DistillConfig)
    assert (cfg.teacher, cfg.eval.reference, cfg.eval.quality, cfg.student.timesteps) == (
        "docs/results/teacher_twemoji", "twemoji32", True, [1.0])
    assert (REPO / cfg.teacher / "model.safetensors").is_file()  # committed: a fresh clone can run the recipe
    assert cfg.dm.guidance_scale == 1.0  # unconditional teacher: nothing to guide with
