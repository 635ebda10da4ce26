"""Typed omegaconf configs: a YAML file merged onto a dataclass schema, then `key=value` overrides.

Unknown keys and values of the wrong type are errors that name the key (ConfigError -> exit status 2).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from dmd_dar.checkpoint import atomic_write_bytes
from dmd_dar.errors import ArgumentParser, ConfigError, UserError

T = TypeVar("T")


def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    msg = str(err).splitlines()[0]
    return f"config key {key!r}: {msg}" if key else msg


def load_config(path: str | Path | None, overrides: Sequence[str] = (), schema: type[T] = None) -> T:
    """Load `path` (YAML) onto `schema` (a dataclass), apply `key=value` overrides, validate.

    Returns an instance of the schema (nested dataclasses), so the rest of the code sees plain typed objects.
    """
    base = OmegaConf.structured(schema)
    layers = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} not found: pass --config configs/<name>.yaml")
        try:
            layer = OmegaConf.load(path)
        except Exception as err:
            raise ConfigError(f"cannot parse {path}: {(str(err).splitlines() or [type(err).__name__])[0]}") from None
        if not isinstance(layer, DictConfig):
            raise ConfigError(f"{path}: the top level must be a mapping of keys (key: value lines), not a "
                              f"{type(layer).__name__.replace('Config', '').lower()}")
        layers.append(layer)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(base, *layers)
        return OmegaConf.to_object(merged)
    except (ConfigKeyError, ValidationError, OmegaConfBaseException) as err:
        raise ConfigError(_describe(err)) from None
    except (TypeError, ValueError) as err:  # raised by a schema's __post_init__ validation
        if isinstance(err, UserError):
            raise
        raise ConfigError(str(err)) from None


def to_dict(config: Any) -> dict[str, Any]:
    """A plain JSON-serialisable dict of a config dataclass (for run folders and checkpoints)."""
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    atomic_write_bytes(path, OmegaConf.to_yaml(OmegaConf.structured(config)).encode())


def parse_config_args(description: str, schema: type[T], argv: Sequence[str] | None = None) -> T:
    """The command line of every config-driven script: `--config FILE [key=value ...]` -> a typed config."""
    parser = ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=100 student.routing.mode=residual")
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides, schema)


def check_time_limit(minutes: float) -> None:
    """`time_limit_min` of the trainers: a finite number of minutes >= 0 (0 = no limit)."""
    if not (math.isfinite(minutes) and minutes >= 0):
        raise ConfigError(f"time_limit_min={minutes} must be a number of minutes >= 0 (0 = no limit)")


def require_positive(config: Any, *names: str, prefix: str = "") -> None:
    """Schema validation shared by the trainers: each named field must be > 0 (counts, sizes, cadences)."""
    for name in names:
        value = getattr(config, name)
        if not value > 0:
            raise ConfigError(f"{prefix}{name}={value} must be > 0")
