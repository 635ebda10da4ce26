"""The detail metrics (dmd_dar/metrics/highpass.py, quality.evaluate_detail): known answers.

Identical sets give 0; a change confined to frequencies at or below the cutoff gives 0 (the image FD sees it);
blur raises the high-pass FD monotonically, in the classifier space (digits) and in the Inception space (emoji);
patch FID works on native-resolution 299x299 crops of large images."""
import math

import pytest
import torch
import torch.nn.functional as F

from dmd_dar.data import load_dataset
from dmd_dar.errors import UserError
from dmd_dar.metrics.highpass import PATCH_SIZE, center_crop, high_pass_part
from dmd_dar.metrics.quality import evaluate_detail, evaluate_quality, load_reference


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma == 0:
        return images
    radius = math.ceil(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(images.dtype)
    c = images.shape[1]
    padded = F.pad(images, (radius,) * 4, mode="replicate")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


@pytest.fixture(scope="module")
def digits():
    held = load_dataset("mnist", split="heldout").images
    perm = torch.randperm(len(held), generator=torch.Generator().manual_seed(0))
    return held[perm[:400]], held[perm[400:800]]


def test_the_filter_keeps_exactly_the_frequencies_above_the_cutoff():
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    above = 0.5 * torch.cos(2 * math.pi * (9 / 32) * x)  # 0.28125 cycles/pixel > 0.25
    diagonal = 0.5 * torch.cos(2 * math.pi * (6 / 32) * (x + y))  # radius 6 sqrt(2) / 32 = 0.265 > 0.25
    below = 0.5 * torch.cos(2 * math.pi * (8 / 32) * y)  # exactly 0.25: not above, removed
    for pattern, kept in ((above, True), (diagonal, True), (below, False)):
        out = high_pass_part((pattern + 0.1)[None, None])  # the mean (0.1) always goes
        torch.testing.assert_close(out[0, 0], pattern if kept else torch.zeros_like(pattern), atol=1e-5, rtol=0)


def test_identical_sets_give_zero_and_changes_below_the_cutoff_are_not_seen(digits):
    ref, _ = digits
    same = evaluate_detail(ref, load_reference(ref))
    assert same["hp_space"] == "classifier" and same["hp_fd"] == pytest.approx(0.0, abs=1e-9)
    assert abs(same["hp_kid"]) < 1e-3  # unbiased KID of a set with itself: 0 up to its O(1/n) bias
    # brightness and a slow wave (3 cycles per image, 0.094 cycles/pixel): the images differ, their detail does not
    y = torch.arange(32.0).view(1, 1, 32, 1)
    dimmed = 0.6 * ref
    changed = dimmed + 0.3 * torch.cos(2 * math.pi * 3 * y / 32) + 0.05
    reference = load_reference(dimmed)
    assert evaluate_quality(changed, reference=reference)["fd"] > 1.0
    assert evaluate_detail(changed, reference)["hp_fd"] == pytest.approx(0.0, abs=1e-9)


def test_blur_raises_the_high_pass_fd_monotonically_on_digits(digits):
    ref, other = digits
    reference = load_reference(ref)
    values = [evaluate_detail(blur(other, s), reference) for s in (0, 0.5, 0.8, 1.2, 2.0)]
    fds = [v["hp_fd"] for v in values]
    kids = [v["hp_kid"] for v in values]
    assert all(a < b for a, b in zip(fds, fds[1:])), fds
    assert all(a < b for a, b in zip(kids, kids[1:])), kids
    assert fds[0] < 0.05 * fds[1]  # other real digits: far closer than the lightest blur
    # the option of evaluate_quality gives the same numbers
    q = evaluate_quality(blur(other, 0.8), reference=reference, detail=True)
    assert q["hp_fd"] == pytest.approx(fds[2], rel=1e-9) and "patch_fid" not in q


def test_blur_raises_the_high_pass_fd_on_colour_images_in_inception_space():
    emoji = load_dataset("twemoji32", split="heldout").images[:12]  # Inception: about 0.13 s an image on a CPU
    reference = load_reference(emoji)
    values = [evaluate_detail(blur(emoji, s), reference, kid=False) for s in (0, 0.6, 1.5)]
    assert {v["hp_space"] for v in values} == {"inception"} and values[0]["hp_n_reference"] == 12
    fds = [v["hp_fd"] for v in values]
    assert fds[0] == pytest.approx(0.0, abs=1e-6) and fds[0] < fds[1] < fds[2], fds


def test_patch_fid_uses_native_resolution_centre_crops_of_large_images():
    g = torch.Generator().manual_seed(0)
    big = (torch.rand(4, 3, 40, 40, generator=g) * 2 - 1).repeat_interleave(8, -1).repeat_interleave(8, -2)  # 320 px
    crop = center_crop(big, PATCH_SIZE)
    assert crop.shape[-2:] == (PATCH_SIZE, PATCH_SIZE)
    torch.testing.assert_close(crop, big[..., 10:309, 10:309])
    reference = load_reference(big)
    same = evaluate_detail(big, reference, kid=False)
    assert same["patch_size"] == PATCH_SIZE and same["patch_fid"] == pytest.approx(0.0, abs=1e-6)
    blurred = evaluate_detail(blur(big, 3.0), reference, kid=False)
    assert blurred["patch_fid"] > 1.0 and blurred["hp_fd"] > same["hp_fd"]
    with pytest.raises(UserError, match="patch FID needs images larger"):
        evaluate_detail(big[..., :64, :64], load_reference(big[..., :64, :64]), patch=True)
