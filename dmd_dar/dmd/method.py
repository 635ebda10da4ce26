"""DMD2 as a method object: a fake-score update and a student update, next to the losses they use.

Per student update (two time scales): `fake.updates_per_student_step` fake-score (and discriminator) updates
on fresh detached student samples, then one student update with the distribution-matching loss (+ the GAN
and regression terms when configured). The generic loop (`dmd_dar.training.run_loop`) calls `train_step`.
Every random draw is a function of (seed, step, stream), drawn for the global batch and then sliced for this
process, so resumed and multi-process runs reproduce the single-process run.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dmd_dar.diffusion import few_step_sample, interpolate, sample_t
from dmd_dar.dmd import losses
from dmd_dar.dmd.config import DistillConfig
from dmd_dar.dmd.family import Family
from dmd_dar.training import StepResult, batch_indices, guarded_update, step_generator


@dataclass
class Draw:
    """Everything random in one batch of generator samples, drawn for the global batch (then sliced)."""

    noise: torch.Tensor
    ids: torch.Tensor  # condition ids (class labels or prompt indices)
    train_step: int  # backward simulation: the student step that carries the gradient
    renoise: torch.Tensor  # [K-1, B, ...] noises between student steps
    t: torch.Tensor  # DM / fake-loss time
    t_noise: torch.Tensor
    t_gan: torch.Tensor  # the discriminator's time (gan.t_min, gan.t_max; = t when gan.t_max is null)

    def local(self, sl: slice, device) -> Draw:
        return Draw(self.noise[sl].to(device), self.ids[sl], self.train_step, self.renoise[:, sl].to(device),
                    self.t[sl].to(device), self.t_noise[sl].to(device), self.t_gan[sl].to(device))


def draw(cfg: DistillConfig, shape: tuple[int, ...], num_conditions: int, g: torch.Generator) -> Draw:
    n, K = cfg.batch_size, len(cfg.student.timesteps)
    noise = torch.randn((n, *shape), generator=g)
    ids = torch.randint(0, num_conditions, (n,), generator=g)
    train_step = int(torch.randint(0, K, (1,), generator=g))
    renoise = torch.randn((K - 1, n, *shape), generator=g)
    t = sample_t(n, kind="shifted", generator=g, t_min=cfg.dm.t_min, t_max=cfg.dm.t_max, shift=cfg.dm.shift)
    t_noise = torch.randn((n, *shape), generator=g)
    gan = cfg.gan
    t_gan = t if gan.t_max is None else sample_t(n, "uniform", generator=g, t_min=gan.t_min, t_max=gan.t_max)  # drawn last: the other draws stay as they were
    return Draw(noise, ids, train_step, renoise, t, t_noise, t_gan)


class FakeScore:
    """The fake score as an x0 denoiser, its denoising loss, and DMD2's discriminator head on its features."""

    def __init__(self, family: Family, model: nn.Module, head: nn.Module | None = None, head_kind: str = "pooled"):
        self.family, self.model, self.head, self.head_kind = family, model, head, head_kind

    def x0(self, x_t, t, cond):
        return self.family.denoiser(self.model)(x_t, t, cond)

    def denoising_loss(self, x0, noise, t, cond):
        return self.family.denoising_loss(self.model, x0, noise, t, cond)

    def gan_logits(self, x_t, t, cond):
        """[B] logits (`gan.head=pooled`) or [B, tokens] (`tokens`); the GAN losses average over all of them."""
        tokens = self.family.hidden_features(self.model, x_t, t, cond)
        return self.head(tokens.mean(1) if self.head_kind == "pooled" else tokens).squeeze(-1)


def make_gan_head(dim: int) -> nn.Module:
    """The same MLP for both `gan.head` kinds (applied to the pooled feature or to every token)."""
    return nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))


@dataclass
class Optimised:
    """What one update steps: its parameters, optimiser and gradient clip."""

    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    grad_clip: float


class DMD:
    """One DMD2 training step = fake-score updates + one student update.

    The fake score is reached through two handles on the same weights: `fake` as accelerate prepared it
    (DDP-wrapped with several processes) in the fake update, whose gradients must synchronise; and
    `fake_unwrapped` in the student update, where a DDP forward would arm a gradient reduction of the fake
    score's parameters that the student's backward never completes.
    """

    def __init__(self, cfg: DistillConfig, family: Family, accelerator, student: nn.Module, fake: FakeScore,
                 fake_unwrapped: FakeScore, student_opt: Optimised, fake_opt: Optimised, local: slice,
                 real_images: torch.Tensor | None = None, real_labels: torch.Tensor | None = None,
                 regression: Callable | None = None):
        self.cfg, self.family, self.accelerator = cfg, family, accelerator
        self.student_x0 = family.denoiser(student)
        self.real_x0 = family.real_score(family.teacher(), cfg.dm.guidance_scale)
        self.fake, self.fake_unwrapped = fake, fake_unwrapped
        self.student_opt, self.fake_opt = student_opt, fake_opt
        self.local, self.real_images, self.real_labels, self.regression = local, real_images, real_labels, regression

    def autocast(self) -> AbstractContextManager:
        return self.accelerator.autocast()

    def draw(self, step: int, stream: int) -> Draw:
        g = step_generator(self.cfg.seed, step, stream=stream)
        return draw(self.cfg, self.family.sample_shape, self.family.num_conditions, g).local(self.local, self.accelerator.device)

    def generate(self, d: Draw, cond: Any) -> torch.Tensor:
        return few_step_sample(self.student_x0, d.noise, cond, self.cfg.student.timesteps, renoise=d.renoise, train_step=d.train_step)

    def gan_active(self, step: int) -> bool:
        return self.real_images is not None and step >= self.cfg.gan.start_step

    def fake_score_loss(self, step: int, j: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The fake score's denoising loss on detached student samples (+ the discriminator's loss)."""
        d = self.draw(step, stream=1 + j)
        cond = self.family.conditions(d.ids)
        with torch.no_grad(), self.autocast():
            x = self.generate(d, cond)
        with self.autocast():
            loss = self.fake.denoising_loss(x, d.t_noise, d.t, cond)
            logs = {}
            if self.gan_active(step):
                n_fake = self.cfg.fake.updates_per_student_step
                idx = batch_indices(step * n_fake + j, self.cfg.batch_size, len(self.real_images), self.cfg.seed)[self.local]
                real_t = interpolate(self.real_images[idx].to(x.device), d.t_noise, d.t_gan)
                # each real image with its own label: with the generated batch's labels the head could only learn
                # whether an image matches its label, which pushes the generator away from its class
                real_cond = cond if self.real_labels is None else self.family.conditions(self.real_labels[idx])
                d_loss = losses.gan_discriminator_loss(self.fake.gan_logits(real_t, d.t_gan, real_cond),
                                                       self.fake.gan_logits(interpolate(x, d.t_noise, d.t_gan), d.t_gan, cond))
                logs["disc_loss"] = d_loss.item()
                loss = loss + self.cfg.gan.discriminator_weight * d_loss
        return loss, {"fake_loss": loss.item(), **logs}

    def student_loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Distribution matching at the noised student sample (+ GAN generator and regression terms)."""
        d = self.draw(step, stream=0)
        cond = self.family.conditions(d.ids)
        with self.autocast():
            x = self.generate(d, cond)  # backward simulation: only step d.train_step carries the gradient
            loss = losses.noised_dm_loss(x, cond, self.real_x0, self.fake_unwrapped.x0, d.t, d.t_noise)
            logs = {"dm_loss": loss.item()}
            if self.gan_active(step):
                g_loss = losses.gan_generator_loss(self.fake_unwrapped.gan_logits(interpolate(x, d.t_noise, d.t_gan), d.t_gan, cond))
                logs["gan_loss"] = g_loss.item()
                loss = loss + self.cfg.gan.weight * g_loss
            if self.regression is not None:
                r_loss = self.regression(self.student_x0, step, self.local)
                logs["regression_loss"] = r_loss.item()
                loss = loss + self.cfg.regression.weight * r_loss
        return loss, logs

    def update(self, loss: torch.Tensor, what: Optimised) -> tuple[bool, float]:
        return guarded_update(self.accelerator, loss, what.params, what.optimizer, what.grad_clip)

    def train_step(self, step: int) -> StepResult:
        logs, ok = {}, True
        for j in range(self.cfg.fake.updates_per_student_step):
            loss, fake_logs = self.fake_score_loss(step, j)
            good, norm = self.update(loss, self.fake_opt)
            ok &= good
            logs.update(fake_logs, fake_grad_norm=norm)
        loss, student_logs = self.student_loss(step)
        good, norm = self.update(loss, self.student_opt)
        logs.update(student_logs, student_grad_norm=norm)
        return StepResult(logs, ok and good)
