"""The one time convention of dmd_dar: interpolant, conversions, CFG, samplers, t-samplers.

Convention (fixed for the whole project; see docs/diffusion.md):

    t in [0, 1], t = 1 is pure noise
    x_t = (1 - t) * x0 + t * eps          (rectified-flow / diffusers FlowMatch "sigma")
    v   = eps - x0                         (velocity, d x_t / d t)
    x0  = x_t - t * v

Every denoiser in the project talks x0: ``x0 = denoiser(x_t, t, cond)`` with ``t`` a float tensor of
shape [B]. Teachers with another parameterisation (velocity, eps, VP eps / v) are converted to x0 with
the helpers here, at their adapter, and nowhere else.

All samplers below are written in terms of that x0 denoiser.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from dmd_dar.errors import ConfigError

__all__ = [
    "Denoiser",
    "VelocityDenoiser",
    "interpolate",
    "x0_from_velocity",
    "velocity_from_x0",
    "x0_from_eps",
    "eps_from_x0",
    "flow_t_to_vp",
    "vp_to_flow_t",
    "flow_to_vp_input",
    "vp_to_flow_input",
    "x0_from_vp_eps",
    "x0_from_vp_v",
    "vp_timestep_from_alpha_bar",
    "concat_cond",
    "cfg_denoiser",
    "time_schedule",
    "shift_time",
    "sample_euler",
    "sample_heun",
    "sample_euler_maruyama",
    "sample",
    "check_timesteps",
    "few_step_sample",
    "sample_t",
    "SAMPLERS",
]

# Divisions by t (or 1 - t, alpha_bar, ...) are clamped away from zero by this much. At t = 0 the
# velocity / eps are undefined (0 / 0); at t = 1 x0 cannot be recovered from eps. Clamping gives a
# finite answer that is exact wherever the quantity is defined.
_DIV_EPS = 1e-6


def _bcast(t: Tensor | float, like: Tensor) -> Tensor:
    """Per-sample t ([B] or scalar) -> shape [B, 1, 1, ...] broadcastable against ``like``."""
    t = torch.as_tensor(t, device=like.device)
    if not t.is_floating_point():
        t = t.to(torch.float32)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(
            f"t must be a scalar or have shape [B] = [{like.shape[0]}], got shape {list(t.shape)}"
        )
    return t.view(-1, *([1] * (like.ndim - 1)))


# ------ Flow interpolant and conversions -----------------------------------------------------------


def interpolate(x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
    """x_t = (1 - t) x0 + t noise, with t of shape [B] (or a scalar) broadcast over the other dims."""
    tb = _bcast(t, x0)
    return (1 - tb) * x0 + tb * noise


def x0_from_velocity(x_t: Tensor, t: Tensor | float, v: Tensor) -> Tensor:
    """x0 = x_t - t v. Defined for every t in [0, 1]."""
    return x_t - _bcast(t, x_t) * v


def velocity_from_x0(x_t: Tensor, t: Tensor | float, x0: Tensor) -> Tensor:
    """v = eps - x0 = (x_t - x0) / t.

    Undefined at t = 0 (x_t = x0 there); t is clamped to >= 1e-6, so a consistent x0 gives v ~ 0
    and an inconsistent one a large but finite velocity.
    """
    tb = _bcast(t, x_t).clamp_min(_DIV_EPS)
    return (x_t - x0) / tb


def x0_from_eps(x_t: Tensor, t: Tensor | float, eps: Tensor) -> Tensor:
    """x0 = (x_t - t eps) / (1 - t).

    At t = 1 x_t carries no information about x0; 1 - t is clamped to >= 1e-6, so the answer there
    is finite but meaningless. Prefer an x0 or velocity parameterisation near pure noise.
    """
    tb = _bcast(t, x_t)
    return (x_t - tb * eps) / (1 - tb).clamp_min(_DIV_EPS)


def eps_from_x0(x_t: Tensor, t: Tensor | float, x0: Tensor) -> Tensor:
    """eps = (x_t - (1 - t) x0) / t. t is clamped to >= 1e-6 (eps is undefined at t = 0)."""
    tb = _bcast(t, x_t)
    return (x_t - (1 - tb) * x0) / tb.clamp_min(_DIV_EPS)


# ------ Variance-preserving (DDPM / DiT / SD1-2 style) teachers ------------------------------------
#
# A VP model sees x_vp = sqrt(ab) x0 + sqrt(1 - ab) eps (ab = alpha_bar = alphas_cumprod[k]). The flow
# point x_t = (1 - t) x0 + t eps is the same point up to scale when both have the same signal-to-noise
# ratio: (1 - t) / t = sqrt(ab) / sqrt(1 - ab). Then
#   ab   = (1 - t)^2 / ((1 - t)^2 + t^2)
#   t    = sqrt(1 - ab) / (sqrt(ab) + sqrt(1 - ab))
#   x_vp = x_t * sqrt(ab) / (1 - t) = x_t / sqrt((1 - t)^2 + t^2)      (no division by zero anywhere)


def flow_t_to_vp(t: Tensor | float) -> Tensor:
    """Flow time t -> VP alpha_bar with the same SNR: ab = (1 - t)^2 / ((1 - t)^2 + t^2).

    t = 0 -> 1 (clean), t = 1 -> 0 (pure noise), t = 0.5 -> 0.5.
    """
    t = torch.as_tensor(t)
    t = t if t.is_floating_point() else t.float()
    a, b = (1 - t) ** 2, t**2
    return a / (a + b)


def vp_to_flow_t(alpha_bar: Tensor | float) -> Tensor:
    """VP alpha_bar -> flow time t with the same SNR: t = sqrt(1 - ab) / (sqrt(ab) + sqrt(1 - ab))."""
    ab = torch.as_tensor(alpha_bar)
    ab = (ab if ab.is_floating_point() else ab.float()).clamp(0.0, 1.0)
    s, n = ab.sqrt(), (1 - ab).sqrt()
    return n / (s + n)  # s + n >= 1, never zero


def flow_to_vp_input(x_t: Tensor, t: Tensor | float) -> Tensor:
    """The VP model input for the flow point x_t: x_vp = x_t / sqrt((1 - t)^2 + t^2).

    Feed it to the VP model together with alpha_bar = flow_t_to_vp(t) (or the matching discrete
    timestep, see ``vp_timestep_from_alpha_bar``).
    """
    tb = _bcast(t, x_t)
    return x_t * torch.rsqrt((1 - tb) ** 2 + tb**2)


def vp_to_flow_input(x_vp: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """Inverse of ``flow_to_vp_input``: x_t = x_vp / (sqrt(ab) + sqrt(1 - ab))."""
    ab = _bcast(alpha_bar, x_vp).clamp(0.0, 1.0)
    return x_vp / (ab.sqrt() + (1 - ab).sqrt())


def x0_from_vp_eps(x_vp: Tensor, alpha_bar: Tensor | float, eps: Tensor) -> Tensor:
    """x0 = (x_vp - sqrt(1 - ab) eps) / sqrt(ab) for an eps-predicting VP model.

    ab is clamped to >= 1e-6 (at ab = 0 x0 is not recoverable from eps).
    """
    ab = _bcast(alpha_bar, x_vp).clamp(0.0, 1.0)
    return (x_vp - (1 - ab).sqrt() * eps) / ab.clamp_min(_DIV_EPS).sqrt()


def x0_from_vp_v(x_vp: Tensor, alpha_bar: Tensor | float, v_vp: Tensor) -> Tensor:
    """x0 = sqrt(ab) x_vp - sqrt(1 - ab) v for a VP v-prediction model (v = sqrt(ab) eps - sqrt(1-ab) x0).

    Defined for every ab in [0, 1].
    """
    ab = _bcast(alpha_bar, x_vp).clamp(0.0, 1.0)
    return ab.sqrt() * x_vp - (1 - ab).sqrt() * v_vp


def vp_timestep_from_alpha_bar(alpha_bar: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Fractional index k into a discrete VP schedule with alphas_cumprod[k] = alpha_bar.

    Interpolates linearly in log-SNR between neighbouring discrete steps (``alphas_cumprod`` must be
    decreasing, as in every DDPM schedule); values outside the schedule are clamped to its ends.
    Discrete-time teachers (DiT, SD1/2) embed this k (rounded or not, as the adapter decides).
    """
    ac = alphas_cumprod.to(device=alpha_bar.device, dtype=torch.float64)
    if ac.ndim != 1 or ac.numel() < 2:
        raise ValueError("alphas_cumprod must be a 1-D tensor with at least two entries")

    def log_snr(ab: Tensor) -> Tensor:
        ab = ab.clamp(1e-12, 1 - 1e-12)
        return torch.log(ab) - torch.log1p(-ab)

    table = log_snr(ac)  # decreasing in k
    query = log_snr(alpha_bar.to(torch.float64))
    # searchsorted wants increasing values: flip the sign.
    hi = torch.searchsorted(-table, -query).clamp(1, ac.numel() - 1)
    lo = hi - 1
    frac = (table[lo] - query) / (table[lo] - table[hi])
    k = lo.to(torch.float64) + frac.clamp(0.0, 1.0)
    return k.to(alpha_bar.dtype if alpha_bar.is_floating_point() else torch.float32)


# ------ Denoisers ----------------------------------------------------------------------------------


class Denoiser(Protocol):
    """Anything that maps (x_t [B, ...], t [B] float, cond) to the x0 prediction [B, ...]."""

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor: ...


class VelocityDenoiser:
    """x0 denoiser for a model that predicts the velocity: ``model(x_t, t, cond) -> v``.

    This is the one velocity -> x0 conversion for our own DiT (x0 = x_t - t v). The conversion is done
    in float32 (or float64 if x_t is float64), so a model run under bf16 autocast still returns a
    float32 x0. The wrapper holds no state besides the model; train ``model`` directly.
    """

    def __init__(self, model: Callable[[Tensor, Tensor, Any], Tensor]):
        self.model = model

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        v = self.model(x_t, t, cond)
        dtype = torch.promote_types(x_t.dtype, torch.float32)
        return x0_from_velocity(x_t.to(dtype), t.to(dtype), v.to(dtype))


# ------ Classifier-free guidance -------------------------------------------------------------------


def concat_cond(cond: Any, null_cond: Any) -> Any:
    """Batch ``cond`` and ``null_cond`` along dim 0 (conditional first), for CFG batch doubling.

    Handles tensors (class labels, embeddings), dicts and lists/tuples of them (recursively), and
    None (kept as None). A null given as a Python number fills a tensor like ``cond`` (e.g. the null
    class index); a null tensor with batch size 1 is expanded to the batch of ``cond``.
    """
    if cond is None:
        return None
    if hasattr(cond, "cat"):  # structured conditions (e.g. teachers.TextCondition) batch themselves
        return cond.cat(null_cond)
    if isinstance(cond, Tensor):
        if isinstance(null_cond, (int, float, bool)):
            null = torch.full_like(cond, null_cond)
        elif isinstance(null_cond, Tensor):
            null = null_cond.to(device=cond.device, dtype=cond.dtype)
            if null.ndim == cond.ndim - 1:  # an unbatched null embedding
                null = null.unsqueeze(0)
            if null.shape[0] == 1 and cond.shape[0] != 1:
                null = null.expand(cond.shape[0], *null.shape[1:])
            if null.shape != cond.shape:
                raise ValueError(
                    f"null condition shape {list(null.shape)} does not match condition shape "
                    f"{list(cond.shape)}"
                )
        else:
            raise TypeError(f"null condition for a tensor condition must be a number or tensor, got {type(null_cond)}")
        return torch.cat([cond, null], dim=0)
    if isinstance(cond, dict):
        if not isinstance(null_cond, dict) or set(null_cond) != set(cond):
            raise ValueError("a dict condition needs a null condition dict with the same keys")
        return {key: concat_cond(cond[key], null_cond[key]) for key in cond}
    if isinstance(cond, (list, tuple)):
        if not isinstance(null_cond, (list, tuple)) or len(null_cond) != len(cond):
            raise ValueError("a list/tuple condition needs a null condition of the same length")
        return type(cond)(concat_cond(c, n) for c, n in zip(cond, null_cond))
    raise TypeError(f"cannot batch a condition of type {type(cond).__name__} for CFG")


def cfg_denoiser(
    denoiser: Denoiser,
    scale: float,
    null_cond: Any,
    interval: tuple[float, float] | None = None,
) -> Denoiser:
    """Classifier-free guidance around an x0 denoiser.

    Returns a denoiser computing x0_uncond + scale * (x0_cond - x0_uncond) for samples whose t lies
    in ``interval = (t_lo, t_hi)`` (inclusive; None = everywhere) and the plain conditional x0
    elsewhere. t may differ per sample; the choice is made per sample. Conditional and null
    conditions are evaluated in one doubled batch (one network call, 2B samples); a batch with no
    sample inside the interval, or ``scale == 1``, costs a single B-sample call.
    """
    if interval is not None:
        t_lo, t_hi = float(interval[0]), float(interval[1])
        if not 0.0 <= t_lo <= t_hi <= 1.0:
            raise ValueError(f"guidance interval must satisfy 0 <= t_lo <= t_hi <= 1, got {interval}")

    def guided(x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        if scale == 1.0:
            return denoiser(x_t, t, cond)
        tb = t if t.ndim == 1 else t.expand(x_t.shape[0])
        if interval is None:
            inside = torch.ones_like(tb, dtype=torch.bool)
        else:
            inside = (tb >= t_lo) & (tb <= t_hi)
            if not bool(inside.any()):
                return denoiser(x_t, t, cond)
        x0_both = denoiser(torch.cat([x_t, x_t]), torch.cat([tb, tb]), concat_cond(cond, null_cond))
        x0_cond, x0_uncond = x0_both.chunk(2)
        x0_guided = x0_uncond + scale * (x0_cond - x0_uncond)
        inside = inside.view(-1, *([1] * (x0_cond.ndim - 1)))
        return torch.where(inside, x0_guided, x0_cond)

    return guided


# ------ Time schedules -----------------------------------------------------------------------------


def shift_time(t: Tensor, shift: float) -> Tensor:
    """SD3 timestep shift t' = shift t / (1 + (shift - 1) t); shift > 1 spends more time near noise."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def time_schedule(steps: int, shift: float = 1.0, device=None) -> Tensor:
    """``steps + 1`` decreasing times from 1 to 0 (uniform in t, then SD3-shifted), float32."""
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.linspace(1.0, 0.0, int(steps) + 1, dtype=torch.float64, device=device)
    return shift_time(t, shift).to(torch.float32)


def _resolve_schedule(
    steps: int | None, t_schedule: Tensor | Sequence[float] | None, shift: float, device
) -> Tensor:
    if t_schedule is None:
        if steps is None:
            raise ValueError("give either steps or t_schedule")
        return time_schedule(steps, shift, device=device)
    ts = torch.as_tensor(t_schedule, dtype=torch.float32, device=device).flatten()
    if steps is not None and ts.numel() != int(steps) + 1:
        raise ValueError(f"t_schedule has {ts.numel()} entries; steps={steps} needs {int(steps) + 1}")
    if ts.numel() < 2 or not bool((ts[1:] < ts[:-1]).all()) or ts[0] > 1 or ts[-1] < 0:
        raise ValueError("t_schedule must be strictly decreasing within [0, 1] with at least two entries")
    return ts


def _steps(ts: Tensor) -> list[tuple[float, float]]:
    """(t, s) pairs of consecutive times as Python floats (no device syncs inside the loops)."""
    values = ts.tolist()
    return list(zip(values[:-1], values[1:]))


def _x0(denoiser: Denoiser, x: Tensor, t: float, cond: Any) -> Tensor:
    t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
    return denoiser(x, t_batch, cond).to(x.dtype)


def _work_dtype(noise: Tensor) -> torch.dtype:
    return torch.promote_types(noise.dtype, torch.float32)


# ------ Samplers (all in terms of the x0 denoiser; they run under torch.no_grad) -------------------
#
# ODE: dx/dt = v(x, t) = (x - x0(x, t)) / t, integrated from t = 1 (noise) down to t = 0. An Euler
# step from t to s is x_s = (1 - s) x0 + s eps_hat with eps_hat = (x - (1 - t) x0) / t, i.e. DDIM; a
# step to s = 0 returns x0 itself, so the denoiser is never evaluated at t = 0.


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    noise: Tensor,
    cond: Any = None,
    steps: int | None = None,
    t_schedule: Tensor | Sequence[float] | None = None,
    shift: float = 1.0,
) -> Tensor:
    """Euler (= DDIM) ODE sampler from ``noise`` at t_schedule[0] (default 1) to t_schedule[-1].

    NFE = steps (one denoiser call per step). Either ``steps`` (uniform, SD3-shifted by ``shift``) or
    an explicit decreasing ``t_schedule`` of steps + 1 times.
    """
    ts = _resolve_schedule(steps, t_schedule, shift, noise.device)
    x = noise.to(_work_dtype(noise))
    for t, s in _steps(ts):
        x0 = _x0(denoiser, x, t, cond)
        x = x0 if s <= 0 else x + (s - t) * (x - x0) / t
    return x


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser,
    noise: Tensor,
    cond: Any = None,
    steps: int | None = None,
    t_schedule: Tensor | Sequence[float] | None = None,
    shift: float = 1.0,
) -> Tensor:
    """Heun (2nd-order, trapezoidal) ODE sampler; the last step to t = 0 is a plain Euler step.

    NFE = 2 * steps - 1 when the schedule ends at t = 0 (2 per step except the last), else 2 * steps.
    """
    ts = _resolve_schedule(steps, t_schedule, shift, noise.device)
    x = noise.to(_work_dtype(noise))
    for t, s in _steps(ts):
        x0 = _x0(denoiser, x, t, cond)
        if s <= 0:
            x = x0
            break
        d = (x - x0) / t
        x_euler = x + (s - t) * d
        d_next = (x_euler - _x0(denoiser, x_euler, s, cond)) / s
        x = x + (s - t) * 0.5 * (d + d_next)
    return x


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like x, drawn from ``generator`` (its device) or the global RNG."""
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


@torch.no_grad()
def sample_euler_maruyama(
    denoiser: Denoiser,
    noise: Tensor,
    cond: Any = None,
    steps: int | None = None,
    t_schedule: Tensor | Sequence[float] | None = None,
    shift: float = 1.0,
    diffusion_scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Euler-Maruyama sampler for the reverse SDE with the flow's marginals (SiT-style).

    With x_t | x0 ~ N((1 - t) x0, t^2 I) the score is s = -eps_hat / t, eps_hat = (x - (1 - t) x0) / t.
    For any w(t) >= 0 the SDE, run backwards in time (dt < 0),

        dx = [v - 0.5 w(t) s] dt + sqrt(w(t)) dW,        v = (x - x0) / t,

    has the same marginals p_t as the ODE. We use w(t) = diffusion_scale * t (SiT's "sigma" form:
    noise injection vanishes towards the data end; diffusion_scale = 0 gives the Euler ODE). The last
    step, to t = 0, is deterministic (returns the x0 prediction), so no unremovable noise is added.
    NFE = steps. SDE noise comes from ``generator`` if given, else from torch's global RNG.
    """
    if diffusion_scale < 0:
        raise ValueError(f"diffusion_scale must be >= 0, got {diffusion_scale}")
    ts = _resolve_schedule(steps, t_schedule, shift, noise.device)
    x = noise.to(_work_dtype(noise))
    for t, s in _steps(ts):
        x0 = _x0(denoiser, x, t, cond)
        if s <= 0:
            x = x0
            break
        eps_hat = (x - (1 - t) * x0) / t
        velocity = eps_hat - x0
        score = -eps_hat / t
        w = diffusion_scale * t
        dt = s - t  # negative: integrating towards the data
        x = x + (velocity - 0.5 * w * score) * dt + math.sqrt(w * -dt) * _randn_like(x, generator)
    return x


SAMPLERS = {"euler": sample_euler, "heun": sample_heun, "sde": sample_euler_maruyama}


def sample(
    denoiser: Denoiser,
    noise: Tensor,
    cond: Any = None,
    sampler: str = "euler",
    steps: int | None = 50,
    t_schedule: Tensor | Sequence[float] | None = None,
    shift: float = 1.0,
    diffusion_scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Multi-step sampling with ``sampler`` in {"euler", "heun", "sde"} (NFEs: see each sampler).

    ``steps`` is ignored (may be None) when an explicit ``t_schedule`` is given.
    """
    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler={sampler!r} is unknown; use one of {', '.join(SAMPLERS)}")
    if t_schedule is not None:
        steps = None
    if sampler == "sde":
        return sample_euler_maruyama(
            denoiser, noise, cond, steps, t_schedule, shift, diffusion_scale=diffusion_scale, generator=generator
        )
    return SAMPLERS[sampler](denoiser, noise, cond, steps, t_schedule, shift)


def check_timesteps(timesteps: Sequence[float], start: float | None = None) -> list[float]:
    """The one validation of a K-step student's times: strictly decreasing within (0, 1] (and beginning at
    ``start`` when given). Returns them as floats; raises ValueError saying what is wrong."""
    ts = [float(t) for t in timesteps]
    if not ts or any(not 0.0 < t <= 1.0 for t in ts) or any(b >= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be strictly decreasing within (0, 1], got {list(timesteps)}")
    if start is not None and ts[0] != start:
        raise ValueError(f"timesteps must begin at {start}, got {list(timesteps)}")
    return ts


def few_step_sample(
    denoiser: Denoiser,
    noise: Tensor,
    cond: Any,
    timesteps: Sequence[float] = (1.0,),
    generator: torch.Generator | None = None,
    *,
    renoise: Tensor | None = None,
    train_step: int | None = None,
) -> Tensor:
    """The one K-step chain (DMD2): at each t_k predict x0, then re-noise it to t_{k+1} with fresh noise.

    ``timesteps`` is strictly decreasing in (0, 1], normally starting at 1.0, e.g. [1.0] (one step) or
    [1.0, 0.75, 0.5, 0.25]; NFE = len(timesteps). Re-noising noise is ``renoise[k]`` ([K-1, *noise.shape],
    drawn by the caller for determinism) if given, else drawn from ``generator``, else from the global RNG.
    Gradient mode is the caller's. ``train_step=k`` is DMD2's *backward simulation*: the chain runs without
    gradient up to step k and returns step k's x0, the only prediction that carries a gradient.
    """
    ts = check_timesteps(timesteps)
    last = len(ts) - 1 if train_step is None else int(train_step)
    if not 0 <= last < len(ts):
        raise ValueError(f"train_step={train_step} is outside the {len(ts)} steps")
    if renoise is not None and len(renoise) < last:
        raise ValueError(f"renoise holds {len(renoise)} noises; {last} re-noising steps need one each")
    x = noise.to(_work_dtype(noise))
    for k in range(last + 1):
        t = torch.full((x.shape[0],), ts[k], device=x.device, dtype=torch.float32)
        with torch.set_grad_enabled(torch.is_grad_enabled() and (train_step is None or k == train_step)):
            x0 = denoiser(x, t, cond)
        if k == last:
            return x0
        fresh = renoise[k].to(x.device, x.dtype) if renoise is not None else _randn_like(x, generator)
        x = interpolate(x0.to(x.dtype), fresh, ts[k + 1])
    raise AssertionError("unreachable")


# ------ Training-time t samplers -------------------------------------------------------------------

T_SAMPLER_KINDS = ("uniform", "logit_normal", "shifted")


def sample_t(
    batch: int,
    kind: str = "uniform",
    generator: torch.Generator | None = None,
    t_min: float = 0.0,
    t_max: float = 1.0,
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    device=None,
) -> Tensor:
    """Draw ``batch`` training times (float32 [batch]) in [t_min, t_max].

    kind: "uniform" (u ~ U(0, 1)), "logit_normal" (u = sigmoid(mean + std z), SD3) or "shifted"
    (uniform u then the SD3 shift u' = shift u / (1 + (shift - 1) u)). The draw u in [0, 1] is then
    mapped affinely onto [t_min, t_max].

    Why the shift comes before the affine map: the shift is a reparameterisation of [0, 1] that fixes both
    ends, so shifting first keeps every draw inside the [t_min, t_max] the caller asked for and only moves
    density towards t_max (noise). Shifting after the map would move the range itself, to
    [shift(t_min), shift(t_max)], so t_max = 0.98 with shift 3 would give draws up to 0.993.

    Randomness comes from ``generator`` (its device) if given,
    else from the global RNG; the result is moved to ``device`` (default: the generator's device).
    """
    if kind not in T_SAMPLER_KINDS:
        raise ConfigError(f"t sampler kind={kind!r} is unknown; use one of {', '.join(T_SAMPLER_KINDS)}")
    if not 0.0 <= t_min <= t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min <= t_max <= 1, got t_min={t_min}, t_max={t_max}")
    gen_device = generator.device if generator is not None else (device or "cpu")
    if kind == "logit_normal":
        if std <= 0:
            raise ValueError(f"std must be > 0, got {std}")
        z = torch.randn(batch, generator=generator, device=gen_device)
        u = torch.sigmoid(mean + std * z)
    else:
        u = torch.rand(batch, generator=generator, device=gen_device)
        if kind == "shifted":
            u = shift_time(u, shift)
    t = t_min + (t_max - t_min) * u
    return t.to(device=device or gen_device, dtype=torch.float32)


# ------ Training objective of velocity models (teacher training and the fake score) ----------------


def flow_matching_loss(model: Callable[..., Any], x0: Tensor, noise: Tensor, t: Tensor, cond: Any = None,
                       return_output: bool = False) -> Tensor | tuple[Tensor, Any]:
    """Velocity MSE: || model(x_t, t, cond) - (noise - x0) ||^2 averaged, with x_t = interpolate(x0, noise, t).

    The one denoising objective of our velocity models: the teacher trains with it and the DMD fake score
    trains with it on detached student samples. fp32 loss even when the model ran under autocast. A model
    output with a ``.sample`` field (the DiT's REPA output) is scored on that field; ``return_output=True``
    also returns the raw output (for the REPA features).
    """
    output = model(interpolate(x0, noise, t), t, cond)
    prediction = output.sample if hasattr(output, "sample") else output
    loss = torch.nn.functional.mse_loss(prediction.float(), (noise - x0).float())
    return (loss, output) if return_output else loss
