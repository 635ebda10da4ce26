"""Features that see fine detail: of the high-pass parts of images, and of native-resolution patches.

The spectral metrics (`dmd_dar.spectral`) say how much high-frequency *energy* a set keeps; they do not say
whether that energy looks like the reference's detail (noise and speckle have energy too). These features
let a Fréchet distance (and KID) compare the *distributions* of detail (docs/quality.md, "Detail"):

- `high_pass_part`: the image minus everything at radii <= `cutoff` cycles/pixel (default 0.25, the spectral
  metrics' headline cutoff), an ideal filter in Fourier space on the same frequency grid as
  `dmd_dar.spectral` (`dmd_dar.spectral.high_pass`: r = sqrt(fx^2 + fy^2) with fftfreq, kept when r > cutoff).
- `classifier_detail_features` (1-channel 32x32 digit sets): the high-pass image goes through the bundled MNIST
  classifier's three convolutional blocks; the features are each block's channel means (32 + 64 + 128 = 224
  values). Not the penultimate 128-d layer: it is trained to ignore everything but the digit's identity,
  and a high-pass image is no digit. Conv filters are local, so they respond to edges and strokes whatever
  the image around them (texture statistics in the sense of Gatys et al. 2015).
- `inception_detail_features` (everything else): Inception pool3 features of `HP_GAIN` x the high-pass image
  (mid-grey = no detail), not quantised to 8 bits (small detail would round away); images larger than the
  Inception input are centre-cropped to it after the filter, so the detail is never resampled away.
- `patch_features`: Inception features of `PATCH_SIZE` x `PATCH_SIZE` centre crops at native resolution (no
  resize), the "patch FID" DMD2 logs for SDXL at 1024 px: a resized 1024 px image hides its fine detail.

The distances themselves are computed in `dmd_dar.metrics.quality.evaluate_detail` (`detail=True` of
`evaluate_quality`), which also caches the reference's features.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from dmd_dar.errors import UserError
from dmd_dar.metrics.classifier import DigitClassifier
from dmd_dar.metrics.fid import INCEPTION_SIZE, extract_features, load_inception
from dmd_dar.spectral import high_pass

__all__ = [
    "HIGHPASS_CUTOFF",
    "HP_GAIN",
    "PATCH_SIZE",
    "high_pass_part",
    "center_crop",
    "classifier_detail_features",
    "inception_detail_features",
    "patch_features",
]

HIGHPASS_CUTOFF = 0.25  # cycles/pixel: the spectral metrics' headline cutoff (periods under 4 pixels)
# The high-pass part of an image in [-1, 1] lies in about [-2, 2] (an edge from -1 to 1 swings about +-1);
# halved, it fits the Inception's [-1, 1] input with mid-grey as "no detail", and is clipped almost never.
HP_GAIN = 0.5
PATCH_SIZE = INCEPTION_SIZE  # 299: a crop of this size enters the Inception without any resize


def high_pass_part(images: Tensor, cutoff: float = HIGHPASS_CUTOFF) -> Tensor:
    """Each image's part at radii above `cutoff` cycles/pixel (ideal FFT high-pass; float NCHW in, same shape out).
    Zero mean, so brightness and any change confined to radii <= cutoff leave it unchanged."""
    return high_pass(images, cutoff).float()


def center_crop(images: Tensor, size: int) -> Tensor:
    """The central size x size crop of each image (rows/columns (H - size) // 2 ...)."""
    h, w = images.shape[-2:]
    if min(h, w) < size:
        raise UserError(f"a {size}x{size} crop needs images of at least that size, got {h}x{w}")
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top : top + size, left : left + size]


@torch.no_grad()
def classifier_detail_features(highpass: Tensor, classifier: DigitClassifier, batch_size: int = 1000) -> Tensor:
    """[N, sum(channels)] float64: the channel means of each conv block's output for high-pass digit images."""
    expected = classifier.input_shape
    if tuple(highpass.shape[1:]) != expected:
        raise UserError(f"classifier detail features need images shaped (N, {', '.join(map(str, expected))}), "
                        f"got {tuple(highpass.shape)}")
    device = next(classifier.parameters()).device
    out = []
    for start in range(0, highpass.shape[0], batch_size):
        x = highpass[start : start + batch_size].to(device, torch.float32)
        parts = []
        for block in classifier.blocks:
            x = block(x)
            parts.append(x.mean(dim=(2, 3)))
        out.append(torch.cat(parts, dim=1).double().cpu())
    return torch.cat(out)


@functools.lru_cache(maxsize=2)
def _unquantised_inception(device: str) -> nn.Module:
    return load_inception(device=device, quantize=False)


def inception_detail_features(highpass: Tensor, device: str | torch.device = "cpu", net: nn.Module | None = None) -> Tensor:
    """[N, 2048] float64: Inception pool3 of HP_GAIN x the high-pass images (centre-cropped to 299 when larger)."""
    x = (HP_GAIN * highpass).clamp(-1.0, 1.0)
    if min(x.shape[-2:]) > PATCH_SIZE:
        x = center_crop(x, PATCH_SIZE)
    return extract_features(x, net or _unquantised_inception(str(torch.device(device))), device=device)


def patch_features(images: Tensor, net: nn.Module, size: int = PATCH_SIZE, device: str | torch.device = "cpu") -> Tensor:
    """[N, F] float64: features of the images' size x size centre crops at native resolution (no resize)."""
    return extract_features(center_crop(images, size), net, device=device)
