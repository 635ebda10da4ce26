"""Fast, in-domain sample quality: class accuracy, Fréchet distance, precision and recall, KID.

Two feature spaces (see docs/quality.md):
- **classifier**: the penultimate 128-d features of the bundled MNIST classifier
  (`dmd_dar.metrics.classifier`), for 1-channel 32x32 digit sets. Cheap: 10,000 images in seconds on a
  CPU. Reported with the real-vs-real floor, the Fréchet distance of as many MNIST training digits as
  there are samples against the same 10,000 held-out digits.
- **inception**: the TF-2015 Inception pool3 features of `dmd_dar.metrics.fid`, for everything else (Twemoji,
  user folders, colour or other sizes). About 0.13 s an image on 2 CPU cores.

`evaluate_quality(images, labels, reference)` picks the space ("auto") and returns a dict. References
and their features are computed once per process (`load_reference`, `QualityReference`), and the
classifier is loaded once, so a training monitor can call it every few steps on a small sample.

Sample counts: the Fréchet distance compares the set with all reference images (it is biased by the
sample count, so compare values at equal n, and against the floor at that n); precision and recall
(k-NN radii depend on the set sizes) and the Inception-space metrics compare it with a seeded random
subset of the reference of the same size as the set.

Detail (`evaluate_detail`, or `detail=True`): FD and KID between the high-pass parts of the images (above
0.25 cycles/pixel) in detail features (`dmd_dar.metrics.highpass`), and patch FID on native-resolution
299x299 centre crops for images larger than that.
"""
from __future__ import annotations

import functools
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dmd_dar.data import DATASET_NAMES, load_dataset
from dmd_dar.errors import UserError
from dmd_dar.image_io import load_images
from dmd_dar.metrics.classifier import DigitClassifier, load_classifier
from dmd_dar.metrics.fid import extract_features, frechet_distance, load_inception
from dmd_dar.metrics.highpass import (
    HIGHPASS_CUTOFF,
    PATCH_SIZE,
    classifier_detail_features,
    high_pass_part,
    inception_detail_features,
    patch_features,
)

__all__ = [
    "SPACES",
    "NEAREST_K",
    "check_images",
    "check_labels",
    "QualityReference",
    "load_reference",
    "evaluate_quality",
    "evaluate_detail",
    "classifier_outputs",
    "class_accuracy",
    "frechet_distance",
    "precision_recall",
    "kid_from_features",
    "real_floor",
]

SPACES = ("auto", "classifier", "inception")
MNIST = "mnist"
NEAREST_K = 3  # Kynkäänniemi et al. 2019
RANGE_TOLERANCE = 1e-3  # float images may overshoot [-1, 1] by rounding


def check_images(images: Any, what: str = "images") -> Tensor:
    """float NCHW in [-1, 1], C = 1 or 3, finite; anything else is a UserError that says which."""
    if not isinstance(images, Tensor) or not images.is_floating_point():
        raise UserError(f"{what}: expected float image tensors NCHW in [-1, 1], got {getattr(images, 'dtype', type(images))}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise UserError(f"{what}: expected images (N, C, H, W) with C = 1 or 3, got shape {tuple(images.shape)}")
    if not bool(torch.isfinite(images).all()):
        raise UserError(f"{what}: images contain NaN or inf")
    low, high = float(images.min()), float(images.max())
    if low < -1 - RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        raise UserError(
            f"{what}: pixel values span [{low:.3g}, {high:.3g}], expected [-1, 1]; rescale them (x / 127.5 - 1 for 8-bit)"
        )
    return images


def check_labels(labels: Any, n: int, num_classes: int, what: str = "labels") -> Tensor:
    labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.shape != (n,):
        raise UserError(
            f"{what}: expected {n} integer class labels (one per image), got {labels.dtype} shape {tuple(labels.shape)}"
        )
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise UserError(f"{what}: class labels must lie in 0..{num_classes - 1}, got {int(labels.min())}..{int(labels.max())}")
    return labels.long()


@torch.no_grad()
def classifier_outputs(
    images: Tensor, classifier: DigitClassifier | None = None, batch_size: int = 1000, device: str | torch.device = "cpu"
) -> tuple[Tensor, Tensor]:
    """(penultimate features [N, 128], logits [N, 10]) of float NCHW [-1, 1] images, float32 on the CPU."""
    classifier = classifier or load_classifier(device=device)
    expected = classifier.input_shape
    if tuple(images.shape[1:]) != expected:
        shape = ", ".join(map(str, expected))
        raise UserError(f"the digit classifier takes images shaped (N, {shape}), got {tuple(images.shape)}")
    classifier.eval()
    device = next(classifier.parameters()).device
    features, logits = [], []
    for start in range(0, images.shape[0], batch_size):
        f, z = classifier.features_and_logits(images[start : start + batch_size].to(device, torch.float32))
        features.append(f.cpu())
        logits.append(z.cpu())
    return torch.cat(features), torch.cat(logits)


def class_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Share of images whose most likely class is the one asked for."""
    return float((logits.argmax(1) == labels.to(logits.device)).double().mean())


def _kth_neighbour_radii(features: Tensor, k: int, chunk_size: int) -> Tensor:
    """Distance from each point to its k-th nearest other point of the same set."""
    radii = [  # k + 1 smallest: the point itself is the first, at distance 0 (topk is ~8x faster than kthvalue)
        torch.cdist(features[start : start + chunk_size], features).topk(k + 1, dim=1, largest=False).values[:, -1]
        for start in range(0, features.shape[0], chunk_size)
    ]
    return torch.cat(radii)


def _share_inside(points: Tensor, centres: Tensor, radii: Tensor, chunk_size: int) -> float:
    """Share of `points` that lie in at least one ball (centre, radius)."""
    inside = [
        (torch.cdist(points[start : start + chunk_size], centres) <= radii[None]).any(1)
        for start in range(0, points.shape[0], chunk_size)
    ]
    return float(torch.cat(inside).double().mean())


def precision_recall(
    real_features: Tensor, fake_features: Tensor, k: int = NEAREST_K, chunk_size: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    Each set's manifold is the union of balls around its points, of radius the distance to the point's
    k-th nearest neighbour in that set. Precision: share of fake points inside the real manifold;
    recall: share of real points inside the fake manifold. Distances are computed in chunks of
    `chunk_size` rows (10,000 x 10,000 needs about 40 MB at a time), in float32: rounding moves a
    distance by about 1e-7 of the squared feature norm, far below the k-NN radii.
    """
    real, fake = real_features.float().cpu(), fake_features.float().cpu()
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sets must be [N, F] with the same F, got {list(real.shape)} and {list(fake.shape)}")
    if min(real.shape[0], fake.shape[0]) <= k:
        raise UserError(
            f"precision and recall with k = {k} need more than {k} images per set, got {real.shape[0]} and {fake.shape[0]}"
        )
    precision = _share_inside(fake, real, _kth_neighbour_radii(real, k, chunk_size), chunk_size)
    recall = _share_inside(real, fake, _kth_neighbour_radii(fake, k, chunk_size), chunk_size)
    return precision, recall


class _Precomputed(nn.Module):
    """Pass-through "feature extractor": torchmetrics' KID then runs on features computed once."""

    def forward(self, features: Tensor) -> Tensor:
        return features


def kid_from_features(
    real_features: Tensor, fake_features: Tensor, subset_size: int = 1000, subsets: int = 100, seed: int = 0
) -> tuple[float, float | None]:
    """Unbiased KID with torchmetrics' KernelInceptionDistance (cubic polynomial kernel) on precomputed
    features: (mean, std) over `subsets` random subsets of `subset_size`. When a set is no larger than
    `subset_size`, one subset of the smaller set's size is used and the std is None (every subset would
    be the same set: its spread says nothing)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, real_features.shape[0], fake_features.shape[0])
    if size < 2:
        raise UserError(f"KID needs at least 2 images per set, got {real_features.shape[0]} and {fake_features.shape[0]}")
    resampled = size < max(real_features.shape[0], fake_features.shape[0])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features")  # we hand it features
        metric = KernelInceptionDistance(feature=_Precomputed(), subsets=subsets if resampled else 1, subset_size=size)
    metric.update(real_features.double(), real=True)
    metric.update(fake_features.double(), real=False)
    with torch.random.fork_rng(devices=[]):  # its subsets come from the global generator: seed them, leave it as it was
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), (float(std) if resampled else None)


@functools.lru_cache(maxsize=2)
def _inception(device: str) -> nn.Module:
    return load_inception(device=device)


def _subset(n_total: int, n: int, seed: int) -> Tensor:
    """A seeded random, sorted choice of min(n, n_total) indices of range(n_total)."""
    if n >= n_total:
        return torch.arange(n_total)
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n].sort().values


class QualityReference:
    """A reference image set and its features, each computed once (per space, subset size and seed)."""

    def __init__(self, images: Tensor, name: str, is_mnist_heldout: bool = False):
        self.images = check_images(images, f"reference {name}")
        self.name = name
        self.is_mnist_heldout = is_mnist_heldout  # the real-vs-real floor applies
        self._classifier_features: dict[DigitClassifier, Tensor] = {}
        self._inception_features: dict[tuple[str, int, int], Tensor] = {}
        self._detail_features: dict[tuple, Tensor] = {}

    def __len__(self) -> int:
        return self.images.shape[0]

    def classifier_features(self, classifier: DigitClassifier) -> Tensor:
        if classifier not in self._classifier_features:
            self._classifier_features[classifier] = classifier_outputs(self.images, classifier)[0]
        return self._classifier_features[classifier]

    def inception_features(self, n: int, seed: int, device: str) -> Tensor:
        """Inception features of a seeded random subset of min(n, len) reference images."""
        key = (device, min(n, len(self)), seed)
        if key not in self._inception_features:
            images = self.images[_subset(len(self), n, seed)]
            self._inception_features[key] = extract_features(images, _inception(device), device=device)
        return self._inception_features[key]

    def detail_features(self, space: str, cutoff: float, n: int, seed: int, device: str,
                        classifier: DigitClassifier | None = None) -> Tensor:
        """Detail features of the reference's high-pass parts (`evaluate_detail`): every image in the classifier
        space, a seeded random subset of min(n, len) in the Inception space ("patch": native-resolution crops)."""
        if space == "classifier":
            key = (space, cutoff, classifier)
        else:
            key = (space, cutoff, device, min(n, len(self)), seed)
        if key not in self._detail_features:
            if space == "classifier":
                features = classifier_detail_features(high_pass_part(self.images, cutoff), classifier)
            else:
                images = self.images[_subset(len(self), n, seed)]
                features = (patch_features(images, _inception(device), device=device) if space == "patch"
                            else inception_detail_features(high_pass_part(images, cutoff), device=device))
            self._detail_features[key] = features
        return self._detail_features[key]


@functools.lru_cache(maxsize=4)
def _named_reference(name: str, split: str) -> QualityReference:
    images = load_dataset(name, split=split).images
    return QualityReference(images, f"{name}/{split}", is_mnist_heldout=(name == MNIST and split == "heldout"))


def load_reference(spec: str | os.PathLike | Tensor | QualityReference, split: str = "heldout") -> QualityReference:
    """A reference: a dataset name ("mnist": its 10,000 held-out digits by default; cached per process),
    an image set path (folder, .npz, run folder), float NCHW images, or a QualityReference (as is)."""
    if isinstance(spec, QualityReference):
        return spec
    if isinstance(spec, Tensor):
        return QualityReference(spec, "images")
    if str(spec).lower() in DATASET_NAMES and not Path(spec).exists():
        return _named_reference(str(spec).lower(), split)
    return QualityReference(load_images(spec), str(spec))


@functools.lru_cache(maxsize=16)
def _floor_cached(n: int, seed: int, classifier: DigitClassifier) -> float:
    train = load_dataset(MNIST, split="train").images
    train_features = classifier_outputs(train[_subset(len(train), n, seed)], classifier)[0]
    heldout = _named_reference(MNIST, "heldout")
    return frechet_distance(train_features, heldout.classifier_features(classifier))


def real_floor(n: int = 10000, seed: int = 0, classifier: DigitClassifier | None = None) -> float:
    """The real-vs-real floor: Fréchet distance in classifier features of n seeded random MNIST training
    digits against the 10,000 held-out digits. Computed once per process for each n."""
    if n < 2:
        raise UserError(f"the floor needs at least 2 training digits, got {n}")
    return _floor_cached(min(n, 60000), seed, classifier or load_classifier())


def _resolve_space(space: str, images: Tensor, reference: QualityReference, classifier_shape: tuple[int, ...]) -> str:
    if space not in SPACES:
        raise UserError(f"space={space!r} is unknown; use one of {', '.join(SPACES)}")
    fits = tuple(images.shape[1:]) == classifier_shape and tuple(reference.images.shape[1:]) == classifier_shape
    if space == "classifier" and not fits:
        raise UserError(
            f"the classifier space needs 1-channel 32x32 digit sets, got images {tuple(images.shape[1:])} and reference "
            f"{tuple(reference.images.shape[1:])}; use the inception space"
        )
    if space == "auto":
        return "classifier" if fits else "inception"
    return space


def evaluate_quality(
    images: Tensor,
    labels: Tensor | None = None,
    reference: str | os.PathLike | Tensor | QualityReference = MNIST,
    *,
    space: str = "auto",
    kid: bool = False,
    k: int = NEAREST_K,
    seed: int = 0,
    device: str | torch.device = "cpu",
    classifier: DigitClassifier | None = None,
    detail: bool = False,
) -> dict[str, Any]:
    """Evaluate an image set (float NCHW in [-1, 1]) against a reference; returns a dict of metrics.

    space "auto": the classifier space when the set and the reference are 1-channel 32x32 images,
    else the Inception space. Keys, present where computed:
    - always: space, n, reference, n_reference, precision, recall, k, seconds;
    - classifier space: fd, and against MNIST's held-out digits fd_floor (real-vs-real at the same n)
      and fd_to_floor (fd / fd_floor);
    - accuracy, where labels are given and the images are 1-channel 32x32 (in either space);
    - inception space: fid, kid, and kid_std when KID resampled subsets (a set larger than its subsets);
    - kid=True in the classifier space adds kid (and kid_std) (Inception features: slow on a CPU);
    - detail=True adds the keys of `evaluate_detail` (hp_fd, hp_kid, and patch_fid for large images).
    `labels`: the class asked for, image by image (class-conditional samples). `reference`: see
    `load_reference`; named datasets are cached per process, so to reuse a path's or a tensor's features
    across calls, pass one `QualityReference`.
    """
    start = time.perf_counter()
    images = check_images(images)
    n = images.shape[0]
    if n <= k:
        raise UserError(f"quality metrics need more than {k} images (k-NN with k = {k}), got {n}")
    device = str(torch.device(device))
    reference = load_reference(reference)
    classifier = classifier or load_classifier(device=device)
    digits = tuple(images.shape[1:]) == classifier.input_shape  # the classifier applies (class accuracy)
    if labels is not None:
        labels = check_labels(labels, n, classifier.config["num_classes"])
    space = _resolve_space(space, images, reference, classifier.input_shape)
    result: dict[str, Any] = {"space": space, "n": n, "reference": reference.name, "n_reference": len(reference), "k": k}
    if space == "classifier" or (digits and labels is not None):
        features, logits = classifier_outputs(images, classifier)
        if labels is not None:
            result["accuracy"] = class_accuracy(logits, labels)
    if space == "classifier":
        real = reference.classifier_features(classifier)
        result["fd"] = frechet_distance(features, real)
        if reference.is_mnist_heldout:
            result["fd_floor"] = real_floor(n, seed, classifier)
            result["fd_to_floor"] = result["fd"] / result["fd_floor"]
        same_size = real[_subset(len(reference), n, seed)]  # k-NN radii depend on the set sizes
        result["precision"], result["recall"] = precision_recall(same_size, features, k)
    if space == "inception" or kid:
        fake_inception = extract_features(images, _inception(device), device=device)
        real_inception = reference.inception_features(n, seed, device)
        result["kid"], kid_std = kid_from_features(real_inception, fake_inception, seed=seed)
        if kid_std is not None:
            result["kid_std"] = kid_std
        if space == "inception":
            result["fid"] = frechet_distance(real_inception, fake_inception)
            result["precision"], result["recall"] = precision_recall(real_inception, fake_inception, k)
            result["n_reference"] = real_inception.shape[0]
    if detail:
        result.update(evaluate_detail(images, reference, space=space, seed=seed, device=device, classifier=classifier))
    result["seconds"] = time.perf_counter() - start
    return result


def evaluate_detail(
    images: Tensor,
    reference: str | os.PathLike | Tensor | QualityReference = MNIST,
    *,
    space: str = "auto",
    cutoff: float = HIGHPASS_CUTOFF,
    kid: bool = True,
    patch: bool | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    classifier: DigitClassifier | None = None,
) -> dict[str, Any]:
    """Distances that see fine detail, between an image set and a reference (docs/quality.md, "Detail").

    - hp_fd (and hp_kid with kid=True): Fréchet distance (KID) between the detail features of the high-pass parts
      (radii above `cutoff` cycles/pixel) of the set and of the reference: the classifier's conv-block
      features for digit sets (space "classifier", against every reference image), Inception features
      otherwise (against a seeded random subset of the reference of the set's size); see
      `dmd_dar.metrics.highpass`. 0 for identical sets, and for sets that differ only below the cutoff.
    - patch_fid: FID of 299x299 centre crops at native resolution (DMD2's patch FID); patch=None computes it
      when both sets are larger than 299 pixels on their shorter side, patch=True insists.
    Also hp_space, hp_cutoff, hp_n_reference (and patch_size).
    """
    images = check_images(images)
    n = images.shape[0]
    if n < 2:
        raise UserError(f"detail metrics need at least 2 images, got {n}")
    device = str(torch.device(device))
    reference = load_reference(reference)
    classifier = classifier or load_classifier(device=device)
    space = _resolve_space(space, images, reference, classifier.input_shape)
    if space == "classifier":
        fake = classifier_detail_features(high_pass_part(images, cutoff), classifier)
    else:
        fake = inception_detail_features(high_pass_part(images, cutoff), device=device)
    real = reference.detail_features(space, cutoff, n, seed, device, classifier)
    result: dict[str, Any] = {"hp_space": space, "hp_cutoff": cutoff, "hp_n_reference": real.shape[0],
                              "hp_fd": frechet_distance(real, fake)}
    if kid:
        result["hp_kid"] = kid_from_features(real, fake, seed=seed)[0]
    large = min(images.shape[-2:]) > PATCH_SIZE and min(reference.images.shape[-2:]) > PATCH_SIZE
    if patch and not large:
        raise UserError(f"patch FID needs images larger than {PATCH_SIZE} pixels on both sets' shorter side, got "
                        f"{tuple(images.shape[-2:])} and reference {tuple(reference.images.shape[-2:])}")
    if patch or (patch is None and large):
        crops = patch_features(images, _inception(device), device=device)
        result["patch_fid"] = frechet_distance(reference.detail_features("patch", cutoff, n, seed, device), crops)
        result["patch_size"] = PATCH_SIZE
    return result


SPECKLE_LEVEL = 8 / 255  # brighter than this (of [0, 1]) counts as ink
SPECKLE_MARGIN = 2  # pixels within this distance (Chebyshev) of a stroke pixel (>= 0.5) are not background


def background_speckle(images: Tensor) -> float:
    """Share of background pixels brighter than 8/255, for dark-background digit sets (float NCHW in [-1, 1]).

    Background: pixels farther than 2 px from every stroke pixel (value >= 0.5 of [0, 1], a 5x5 max-pool).
    Real held-out MNIST: 2e-6; the one-step DMD students' speckle is isolated faint pixels there.
    """
    images = check_images(images, "speckle images")
    x = (images.float().mean(1, keepdim=True) + 1) / 2
    size = 2 * SPECKLE_MARGIN + 1
    background = torch.nn.functional.max_pool2d(x, size, stride=1, padding=SPECKLE_MARGIN) < 0.5
    return float(((x > SPECKLE_LEVEL) & background).sum() / background.sum().clamp_min(1))
