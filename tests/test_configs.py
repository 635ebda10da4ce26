"""Every shipped config parses under its schema (a renamed key would otherwise only fail at run time)."""
from pathlib import Path

import pytest

from dmd_dar.config import load_config
from dmd_dar.dmd.config import DistillConfig
from dmd_dar.teacher.training import TeacherTrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TEACHER_CONFIGS = sorted(p.name for p in CONFIGS.glob("teacher_*.yaml"))
# every other yaml is a distillation config, except accelerate's launch configs
DISTILL_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.yaml")
                         if p.name not in TEACHER_CONFIGS and not p.name.startswith("accelerate_"))


@pytest.mark.parametrize("path", DISTILL_CONFIGS)
def test_distill_configs_load(path):
    cfg = load_config(CONFIGS / path, [], DistillConfig)
    assert cfg.student.timesteps[0] == 1.0 and cfg.steps > 0


@pytest.mark.parametrize("path", TEACHER_CONFIGS)
def test_teacher_configs_load(path):
    cfg = load_config(CONFIGS / path, [], TeacherTrainConfig)
    assert cfg.model.input_size % cfg.model.patch_size == 0
    if cfg.init not in (None, "bundled"):  # a continued stage starts from committed weights (relative to the repo root)
        assert (CONFIGS.parent / cfg.init / "config.json").is_file(), cfg.init


def test_default_job_is_a_one_step_dar_student_of_the_bundled_teacher():
    cfg = load_config(CONFIGS / "default.yaml", [], DistillConfig)
    assert (cfg.teacher, cfg.student.routing.mode, cfg.student.timesteps) == ("bundled", "dar", [1.0])
    assert (Path(__file__).resolve().parents[1] / "dmd_dar" / "assets" / "teacher" / "model.safetensors").is_file()
