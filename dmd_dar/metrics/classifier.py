"""A small MNIST digit classifier whose penultimate layer is the feature space of the in-domain metrics.

Three conv blocks (conv 3x3, batch norm, ReLU, 2x2 max-pool: 32 -> 16 -> 8 -> 4 pixels) and a 128-d
fully connected feature layer (ReLU) before the 10-way linear head. Input: float [N, 1, 32, 32] in
[-1, 1], our MNIST convention (28x28 digits padded with background -1). The bundled weights in
`dmd_dar/assets/mnist_classifier` are trained by `scripts/train_classifier.py`; their config.json records
the held-out accuracy and how they were trained.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dmd_dar.checkpoint import load_model_files, save_model
from dmd_dar.errors import UserError

__all__ = ["DigitClassifier", "BUNDLED_CLASSIFIER", "load_classifier", "save_classifier"]

BUNDLED_CLASSIFIER = Path(__file__).resolve().parents[1] / "assets" / "mnist_classifier"
CLASS_NAME = "DigitClassifier"


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True), nn.MaxPool2d(2)
    )


class DigitClassifier(nn.Module):
    """Images [N, in_channels, image_size, image_size] in [-1, 1] -> logits [N, num_classes];
    `features` gives the penultimate activations [N, feature_dim]."""

    def __init__(
        self,
        channels: tuple[int, ...] = (32, 64, 128),
        feature_dim: int = 128,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 32,
        dropout: float = 0.25,
    ):
        super().__init__()
        side = image_size // 2 ** len(channels)
        if side < 1 or image_size % 2 ** len(channels):
            raise ValueError(f"image_size {image_size} must be a multiple of {2 ** len(channels)} for {len(channels)} blocks")
        self.config = {
            "class": CLASS_NAME,
            "channels": list(channels),
            "feature_dim": feature_dim,
            "num_classes": num_classes,
            "in_channels": in_channels,
            "image_size": image_size,
            "dropout": dropout,
        }
        self.record: dict[str, Any] = {}  # what config.json says beyond the architecture (accuracy, recipe)
        widths = (in_channels, *channels)
        self.blocks = nn.Sequential(*(_conv_block(a, b) for a, b in zip(widths[:-1], widths[1:])))
        self.feature = nn.Sequential(nn.Flatten(), nn.Linear(channels[-1] * side * side, feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.config["in_channels"], self.config["image_size"], self.config["image_size"]

    def features(self, images: Tensor) -> Tensor:
        return self.feature(self.blocks(images))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = self.features(images)
        return features, self.head(features)


def save_classifier(model: DigitClassifier, folder: str | os.PathLike, record: dict[str, Any] | None = None) -> None:
    """Write config.json (architecture + `record`, e.g. held-out accuracy) and model.safetensors atomically."""
    save_model(folder, {**model.config, **(record or {})}, model.state_dict())


def _build(config: dict[str, Any], where: Path) -> DigitClassifier:
    if config.get("class") != CLASS_NAME:
        raise UserError(f"{where}: config.json describes a {config.get('class')!r}, not a {CLASS_NAME}; give a classifier folder")
    keys = ("channels", "feature_dim", "num_classes", "in_channels", "image_size", "dropout")
    missing = [k for k in keys if k not in config]
    if missing:
        raise UserError(f"{where}: config.json lacks {', '.join(missing)}; retrain with scripts/train_classifier.py")
    kwargs = {k: config[k] for k in keys}
    kwargs["channels"] = tuple(kwargs["channels"])
    return DigitClassifier(**kwargs)


@functools.lru_cache(maxsize=4)
def _load_cached(folder: str, device: str) -> DigitClassifier:
    files = load_model_files(folder)
    model = _build(files.config, Path(folder))
    try:
        model.load_state_dict(files.state_dict)
    except RuntimeError as err:
        first_line = str(err).splitlines()[0]
        raise UserError(f"{folder}: weights do not match config.json ({first_line}); the folder is damaged") from None
    model.record = {k: v for k, v in files.config.items() if k not in model.config}
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval().to(device)


def load_classifier(folder: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> DigitClassifier:
    """The classifier in `folder` (default: the bundled one), frozen and in eval mode.

    Loaded once per process and device (later calls return the same module), so a training monitor
    can call the metrics every few steps at no loading cost. Do not modify the returned module.
    """
    path = Path(folder).expanduser().resolve() if folder is not None else BUNDLED_CLASSIFIER
    return _load_cached(str(path), str(torch.device(device)))
