"""Distribution matching distillation (DMD, DMD2) losses.

Three networks, one x0 interface (`x0 = denoiser(x_t, t, cond)`, t = 1 noise):
- the real score: the frozen teacher, with classifier-free guidance;
- the fake score: a copy of the teacher trained online on the generator's (detached) samples, no CFG;
- the generator (student): noise (+ cond) -> sample in one or K steps (`dmd_dar.diffusion.few_step_sample`).

The generator is pushed along (fake_x0 - real_x0) at noised generator samples (Yin et al. 2023, 2024).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from dmd_dar.diffusion import Denoiser, interpolate

NORMALISER_FLOOR = 1e-6


def distribution_matching_loss(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """DMD2 loss. Its gradient w.r.t. x is, per sample, (fake_x0 - real_x0) / mean|x - real_x0| divided by
    the number of elements in the batch; real_x0 and fake_x0 are targets (no gradient flows into them).

    The normaliser is floored at NORMALISER_FLOOR = 1e-6 (of data in [-1, 1]): a sample the teacher already
    reproduces would otherwise get a gradient up to 1e12 x |fake - real|, a spike no clipping budget expects.
    1e-6 is FastGen's epsilon, far below any real mean distance (~1e-1 here), and representable in bf16 and
    fp32 alike (the arithmetic runs in fp32); values above the floor are used exactly."""
    with torch.no_grad():
        x_ = x.detach().float()
        real, fake = real_x0.detach().float(), fake_x0.detach().float()
        dims = tuple(range(1, x.dim()))
        normaliser = (x_ - real).abs().mean(dim=dims, keepdim=True).clamp_min(NORMALISER_FLOOR)
        grad = torch.nan_to_num((fake - real) / normaliser)
        target = x_ - grad
    return 0.5 * F.mse_loss(x.float(), target, reduction="mean")


def noised_dm_loss(x: torch.Tensor, cond: Any, real: Denoiser, fake: Denoiser, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Noise the generator sample x to time t, score it with both denoisers, and return the DM loss."""
    with torch.no_grad():
        x_t = interpolate(x.detach(), noise, t)
        real_x0 = real(x_t, t, cond)
        fake_x0 = fake(x_t, t, cond)
    return distribution_matching_loss(x, real_x0, fake_x0)


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss on the discriminator's logits for generated samples."""
    return F.softplus(-fake_logits.float()).mean()


def gan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()
