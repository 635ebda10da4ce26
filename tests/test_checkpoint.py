"""The one atomic writer (dmd_dar/checkpoint.py): files and folders appear complete or not at all, an
existing folder is replaced only when it holds our own files, and the offline switch is read in one place."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from dmd_dar import checkpoint as C
from dmd_dar.errors import UserError


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_keeps_the_suffix_and_leaves_nothing_on_error(tmp_path):
    # np.save / np.savez append their suffix to any other name: the temporary file must already have it.
    C.atomic_write(tmp_path / "a.npy", lambda tmp: np.save(tmp, np.arange(3)))
    C.atomic_write(tmp_path / "b.npz", lambda tmp: np.savez(tmp, arr_0=np.arange(2)))
    assert names(tmp_path) == ["a.npy", "b.npz"]
    assert np.load(tmp_path / "a.npy").tolist() == [0, 1, 2]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.npy").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600

    def broken(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        C.atomic_write(tmp_path / "a.npy", broken)
    assert names(tmp_path) == ["a.npy", "b.npz"] and np.load(tmp_path / "a.npy").tolist() == [0, 1, 2]
    C.save_torch_state(tmp_path / "state.pt", {"step": 3, "w": torch.ones(2)})
    assert C.load_torch_state(tmp_path / "state.pt")["step"] == 3
    C.write_json(tmp_path / "x.json", {"b": 1})
    assert C.read_json(tmp_path / "x.json") == {"b": 1}


def test_atomic_dir_replaces_whole_folders_and_keeps_the_old_one_on_error(tmp_path):
    out = tmp_path / "out"
    with C.atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700
    with C.atomic_dir(out) as tmp:
        (tmp / "b.txt").write_text("2")
    assert names(out) == ["b.txt"]
    with pytest.raises(RuntimeError), C.atomic_dir(out) as tmp:
        (tmp / "c.txt").write_text("3")
        raise RuntimeError("crash while writing")
    assert names(out) == ["b.txt"] and names(tmp_path) == ["out"]  # no temporary or old folder left


def test_atomic_dir_puts_the_old_folder_back_when_the_swap_fails(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with C.atomic_dir(out) as tmp:
        (tmp / "old.txt").write_text("old")
    real_replace, calls = os.replace, []

    def replace_failing_second(src, dst):  # 1st: old folder aside, 2nd: new folder into place
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(C.os, "replace", replace_failing_second)
    with pytest.raises(OSError), C.atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert names(out) == ["old.txt"] and names(tmp_path) == ["out"]


def test_atomic_dir_replaces_only_a_folder_of_its_own_files(tmp_path):
    out = tmp_path / "report"
    with C.atomic_dir(out, own_files={"metrics.json"}) as tmp:
        (tmp / "metrics.json").write_text("{}")
    with C.atomic_dir(out, own_files={"metrics.json"}) as tmp:  # a previous output: replaced
        (tmp / "metrics.json").write_text("[]")
    assert (out / "metrics.json").read_text() == "[]"
    for name in ("notes.txt", "b.txt", "c.txt", "d.txt"):
        (out / name).write_text("mine")
    wrote = []
    with pytest.raises(UserError) as err, C.atomic_dir(out, own_files=lambda n: n.endswith(".json"),
                                                       previous="a previous report") as tmp:
        wrote.append(tmp)
    msg = str(err.value)
    assert "\n" not in msg and str(out) in msg and "not a previous report" in msg and "choose an empty or new folder" in msg
    assert "b.txt, c.txt, d.txt" in msg and "notes.txt" not in msg  # up to three foreign names
    assert not wrote and names(tmp_path) == ["report"]  # the guard runs before anything is written
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder"), C.atomic_dir(tmp_path / "file"):
        pass
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize(
    ("env", "offline"),
    [({}, False), ({"HF_HUB_OFFLINE": "1"}, True), ({"TRANSFORMERS_OFFLINE": "true"}, True),
     ({"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "1"}, False), ({"DIFFUSERS_OFFLINE": "yes"}, True)],
)
def test_hub_offline_reads_the_hugging_face_switches(monkeypatch, env, offline):
    for name in C.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert C.hub_offline() is offline


def test_model_files_get_the_usual_permissions(tmp_path):
    """safetensors writes its file 0600; a saved model is readable like any other file the user writes."""
    import stat

    C.save_model(tmp_path / "m", {"class": "x"}, {"w": torch.zeros(2)})
    mask = os.umask(0)
    os.umask(mask)
    for name in (C.WEIGHTS_NAME, C.CONFIG_NAME):
        assert stat.S_IMODE((tmp_path / "m" / name).stat().st_mode) == 0o666 & ~mask, name


def test_non_finite_weights_are_never_written(tmp_path):
    with pytest.raises(C.UserError, match="non-finite weights in w"):
        C.save_model(tmp_path / "m", {"class": "x"}, {"w": torch.tensor([1.0, float("nan")]), "n": torch.tensor([3])})
    assert not (tmp_path / "m").exists() and not any(tmp_path.iterdir())
