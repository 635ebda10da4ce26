"""Every shipped config parses under its schema (a renamed key would otherwise only fail at run time)."""
from pathlib import Path

import pytest

from dmd_dar.config import load_config
from dmd_dar.dmd.config import DistillConfig
from dmd_dar.teacher.training import TeacherTrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TEACHER_CONFIGS = ["teacher_mnist.yaml", "teacher_tiny.yaml"]


@pytest.mark.parametrize("path", sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name.startswith(("default", "dmd_"))))
def test_distill_configs_load(path):
    cfg = load_config(CONFIGS / path, [], DistillConfig)
    assert cfg.student.timesteps[0] == 1.0 and cfg.steps > 0


@pytest.mark.parametrize("path", TEACHER_CONFIGS)
def test_teacher_configs_load(path):
    cfg = load_config(CONFIGS / path, [], TeacherTrainConfig)
    assert cfg.model.input_size % cfg.model.patch_size == 0


def test_default_job_is_a_one_step_dar_student_of_the_bundled_teacher():
    cfg = load_config(CONFIGS / "default.yaml", [], DistillConfig)
    assert (cfg.teacher, cfg.student.routing.mode, cfg.student.timesteps) == ("bundled", "dar", [1.0])
    assert (Path(__file__).resolve().parents[1] / "dmd_dar" / "assets" / "teacher" / "model.safetensors").is_file()
