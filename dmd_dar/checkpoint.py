"""The one checkpoint writer/reader: safetensors weights + JSON config, torch state loadable with
`weights_only=True`, every write atomic (temp path + rename), so a crash never leaves a damaged checkpoint.

Layout of a model folder:      config.json  model.safetensors
Layout of a training run dir:  checkpoints/step_000100/{<model folders>/, trainer_state.pt, meta.json}
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from dmd_dar.errors import UserError

CONFIG_NAME = "config.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _public(path: Path, mode: int) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give the final ones the usual permissions."""
    os.chmod(path, mode & ~_umask())
WEIGHTS_NAME = "model.safetensors"


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `final` in one rename (the old one is
    removed only after the new one is in place). On error the temporary folder is deleted."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    _public(tmp, 0o777)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _public(Path(tmp), 0o666)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


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
    save_file(tensors, str(folder / WEIGHTS_NAME))
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


def save_torch_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Optimizer/trainer state: tensors, numbers, strings, lists and dicts only (weights_only-loadable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        _public(Path(tmp), 0o666)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_torch_state(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found: the checkpoint has no trainer state")
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    """CPU (and CUDA) RNG states as tensors, so `torch.load(weights_only=True)` accepts them."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
