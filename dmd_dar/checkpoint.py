"""The one checkpoint writer/reader: safetensors weights + JSON config, torch state loadable with
`weights_only=True`, and every output file or folder of the library written atomically (temp path +
rename), so a crash never leaves a damaged checkpoint, cache or report.

Layout of a model folder:      config.json  model.safetensors
Layout of a training run dir:  checkpoints/step_000100/{<model folders>/, trainer_state.pt, meta.json}
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dmd_dar.errors import UserError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
BUNDLED_TEACHER = Path(__file__).resolve().parent / "assets" / "teacher"  # what a teacher of "bundled" means
# Environment variables that switch the Hugging Face libraries offline, in the order huggingface_hub reads them.
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE")


def hub_offline() -> bool:
    """True when the user asked for no downloads: the first of OFFLINE_VARIABLES that is set decides."""
    for name in OFFLINE_VARIABLES:
        value = os.environ.get(name, "").strip().lower()
        if value:
            return value in ("1", "true", "yes", "on")
    return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _make_public(path: Path, mode: int) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give the final ones the usual permissions."""
    os.chmod(path, mode & ~_umask())


def follow_umask(path: str | os.PathLike, mode: int = 0o666) -> None:
    """Give a file written by a library that creates private files (safetensors: 0600) the usual permissions."""
    _make_public(Path(path), mode)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write one file atomically: `write(tmp)` fills a temporary sibling that has the same suffix (so
    writers such as np.save / np.savez that append a suffix leave the name alone); it is then synced to
    disk and renamed onto `path` in one step. On error the temporary file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _make_public(tmp, 0o666)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def check_replaceable(final: str | os.PathLike, own_files: Collection[str] | Callable[[str], bool] | None = None,
                      previous: str = "a previous output") -> None:
    """Refuse to replace what is not ours: `final` may be missing, or a folder; with `own_files` (names,
    or a predicate on a name) the folder may hold only such names. `previous` says what such a folder is
    ("a previous report") in the error. `atomic_dir` runs this first; call it early to fail before work."""
    final = Path(final)
    if not final.exists():
        return
    if not final.is_dir():
        raise UserError(f"{final} exists and is not a folder; choose an empty or new folder")
    if own_files is None:
        return
    if isinstance(own_files, str):  # one name, not its characters
        own_files = {own_files}
    is_own = own_files if callable(own_files) else own_files.__contains__
    foreign = sorted(p.name for p in final.iterdir() if not is_own(p.name))
    if foreign:
        raise UserError(f"{final} holds other files, not {previous} ({', '.join(foreign[:3])}"
                        f"{', ...' if len(foreign) > 3 else ''}); choose an empty or new folder")


def _label(name: str, path: Path) -> str:
    return f"{name} {path}" if name.startswith("-") else f"{name}={path}"


def _check_parent(path: Path, name: str) -> None:
    """The nearest existing ancestor of `path` must be a folder this process can write into."""
    parent = next(p for p in (path, *path.parents) if p.exists())
    if not parent.is_dir():
        raise UserError(f"{_label(name, path)}: {parent} is a file, not a folder; choose another {name}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{_label(name, path)}: {parent} is not writable; choose another {name}")


def check_output_dir(path: str | os.PathLike, name: str = "out_dir") -> None:
    """An output folder (created or written into later), checked before any work: not an existing file, not under
    a file, writable. `name` is the key or flag the user gave it by (`out_dir`, `--out`), used in the one line."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{_label(name, path)} exists and is not a folder; choose another {name}")
    _check_parent(path, name)


def check_output_file(path: str | os.PathLike, name: str = "--out", suffix: str | None = None) -> None:
    """An output file (written atomically later), checked before any work: not a folder, the right `suffix`,
    its folder creatable and writable."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{_label(name, path)} is a folder; give a file path{f' ending in {suffix}' if suffix else ''}")
    if suffix and path.suffix.lower() != suffix:
        raise UserError(f"{_label(name, path)}: the file name must end in {suffix}")
    _check_parent(path.parent, name)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, own_files: Collection[str] | Callable[[str], bool] | None = None,
               previous: str = "a previous output") -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `final` in one rename. On error the
    temporary folder is deleted and `final` is untouched. An existing `final` is first checked with
    `check_replaceable(final, own_files, previous)`, before anything is written.

    Replacing: the old folder is renamed aside first, then the new one into place, and the old one is
    deleted last; a crash in between leaves the old folder as `.<name>.old-*/<name>`, never lost."""
    final = Path(final)
    check_replaceable(final, own_files, previous)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        _make_public(tmp, 0o777)
        yield tmp
        if not final.exists():
            os.replace(tmp, final)
            return
        aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        try:
            os.replace(final, aside / final.name)
        except BaseException:
            aside.rmdir()
            raise
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(aside / final.name, final)  # put the previous folder back; if that fails, keep it aside
            aside.rmdir()
            raise
        shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found: expected a JSON file there")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); the file is damaged, use another checkpoint") from None


def write_model_files(folder: str | os.PathLike, config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> None:
    """Write config.json + model.safetensors into an existing folder (callers make it atomic)."""
    from safetensors.torch import save_file  # imported here: the GPU benchmark image may lack safetensors

    folder = Path(folder)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # never write a non-finite model anywhere: a NaN checkpoint or export only spreads the damage
        raise UserError(f"refusing to write {folder.name}: non-finite weights in {', '.join(bad[:3])}"
                        f"{' ...' if len(bad) > 3 else ''}; the run diverged: lower the learning rate")
    save_file(tensors, str(folder / WEIGHTS_NAME))
    _make_public(folder / WEIGHTS_NAME, 0o666)  # safetensors writes 0600: give it the usual file permissions
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_model(folder: str | os.PathLike, config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> None:
    """Atomically write a model folder (config.json + model.safetensors)."""
    with atomic_dir(folder) as tmp:
        write_model_files(tmp, config, state_dict)


@dataclass
class ModelFiles:
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]


def load_model_files(folder: str | os.PathLike) -> ModelFiles:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"checkpoint folder {folder} not found: pass a folder holding {CONFIG_NAME} and {WEIGHTS_NAME}")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise UserError(f"{weights} not found: {folder} is not a dmd_dar model folder")
    from safetensors.torch import load_file

    config = read_json(folder / CONFIG_NAME)
    try:
        state_dict = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types
        raise UserError(f"cannot read {weights} ({err}); the file is damaged, use another checkpoint") from None
    return ModelFiles(config=config, state_dict=state_dict)


def save_torch_state(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Optimizer/trainer state: tensors, numbers, strings, lists and dicts only (weights_only-loadable)."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_torch_state(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found: the checkpoint has no trainer state")
    return torch.load(path, map_location="cpu", weights_only=True)


LOCK_NAME = ".lock"


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold `folder`/.lock (holding our pid) while a run writes into `folder`: a second run into the same folder
    is refused in one line naming the holder, instead of interleaving its files with the first run's. A lock
    left by a killed run (its pid is gone) is taken over."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            holder = lock.read_text().strip() if lock.is_file() else ""
            if holder.isdigit() and _alive(int(holder)):
                raise UserError(f"{folder} is in use by another run (pid {holder}); wait for it, or choose another out_dir") from None
            lock.unlink(missing_ok=True)  # stale: its run was killed
    else:
        raise UserError(f"cannot take the lock {lock}; remove it if no run is using {folder}")
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n")
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
