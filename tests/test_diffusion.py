"""Time convention, conversions, CFG and samplers (dmd_dar/diffusion.py).

The sampler tests use Gaussian data x0 ~ N(mu, diag(sd^2)), whose exact x0-predictor is known:
E[x0 | x_t] = mu + (1-t) sd^2 / ((1-t)^2 sd^2 + t^2) (x_t - (1-t) mu). With it, a correct sampler must
reproduce the data mean and variance up to its discretisation error plus Monte-Carlo error.
"""
from __future__ import annotations

import math

import pytest
import torch

from dmd_dar import diffusion as D
from dmd_dar.errors import UserError

MU = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float64)
SD = torch.tensor([0.5, 1.0, 2.0, 0.25], dtype=torch.float64)


def gaussian_denoiser(x_t, t, cond=None):
    """Exact E[x0 | x_t] for x0 ~ N(MU, diag(SD^2)), x_t = (1-t) x0 + t eps."""
    tb = t.to(x_t.dtype).view(-1, 1)
    mu, sd = MU.to(x_t.dtype), SD.to(x_t.dtype)
    gain = (1 - tb) * sd**2 / ((1 - tb) ** 2 * sd**2 + tb**2)
    return mu + gain * (x_t - (1 - tb) * mu)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------ Conversions --------------------------------------------------------------------------------


def test_interpolant_endpoints_and_broadcast():
    x0, eps = _randn(3, 2, 4, 4, seed=1), _randn(3, 2, 4, 4, seed=2)
    t = torch.tensor([0.0, 0.3, 1.0])
    x_t = D.interpolate(x0, eps, t)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[2], eps[2])
    torch.testing.assert_close(x_t[1], 0.7 * x0[1] + 0.3 * eps[1])
    with pytest.raises(ValueError, match="shape"):
        D.interpolate(x0, eps, torch.rand(2))


def test_x0_velocity_eps_round_trips():
    x0, eps = _randn(5, 3, 8, seed=1, dtype=torch.float64), _randn(5, 3, 8, seed=2, dtype=torch.float64)
    t = torch.tensor([0.05, 0.2, 0.5, 0.8, 0.97], dtype=torch.float64)
    x_t = D.interpolate(x0, eps, t)
    v = D.velocity_from_x0(x_t, t, x0)
    torch.testing.assert_close(v, eps - x0)  # v = eps - x0
    torch.testing.assert_close(D.x0_from_velocity(x_t, t, v), x0)
    torch.testing.assert_close(D.eps_from_x0(x_t, t, x0), eps)
    torch.testing.assert_close(D.x0_from_eps(x_t, t, eps), x0)


def test_conversions_are_finite_at_the_ends():
    x = _randn(2, 4)
    t = torch.tensor([0.0, 1.0])
    for out in (D.velocity_from_x0(x, t, x), D.eps_from_x0(x, t, x), D.x0_from_eps(x, t, x)):
        assert torch.isfinite(out).all()
    # x0 from a consistent velocity is exact at both ends
    torch.testing.assert_close(D.x0_from_velocity(x, t, torch.zeros_like(x))[0], x[0])


def test_flow_vp_time_mapping_round_trip_and_snr():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    ab = D.flow_t_to_vp(t)
    assert ab[0] == 1 and ab[-1] == 0 and abs(float(ab[50]) - 0.5) < 1e-12
    assert (ab[1:] < ab[:-1]).all()
    torch.testing.assert_close(D.vp_to_flow_t(ab), t)
    inner = t[1:-1]  # same SNR: ((1-t)/t)^2 = ab / (1 - ab)
    torch.testing.assert_close(((1 - inner) / inner) ** 2, ab[1:-1] / (1 - ab[1:-1]))


def test_flow_point_maps_to_vp_point_and_back():
    x0, eps = _randn(6, 3, 4, seed=3, dtype=torch.float64), _randn(6, 3, 4, seed=4, dtype=torch.float64)
    t = torch.tensor([0.0, 0.1, 0.4, 0.6, 0.9, 1.0], dtype=torch.float64)
    ab = D.flow_t_to_vp(t)
    x_vp = D.flow_to_vp_input(D.interpolate(x0, eps, t), t)
    abb = ab.view(-1, 1, 1)
    torch.testing.assert_close(x_vp, abb.sqrt() * x0 + (1 - abb).sqrt() * eps)
    torch.testing.assert_close(D.vp_to_flow_input(x_vp, ab), D.interpolate(x0, eps, t))


def test_x0_from_vp_eps_and_v():
    x0, eps = _randn(4, 5, seed=5, dtype=torch.float64), _randn(4, 5, seed=6, dtype=torch.float64)
    ab = torch.tensor([0.999, 0.7, 0.2, 0.01], dtype=torch.float64).view(-1, 1)
    x_vp = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    v_vp = ab.sqrt() * eps - (1 - ab).sqrt() * x0
    torch.testing.assert_close(D.x0_from_vp_eps(x_vp, ab.flatten(), eps), x0)
    torch.testing.assert_close(D.x0_from_vp_v(x_vp, ab.flatten(), v_vp), x0)


def test_vp_timestep_from_alpha_bar_inverts_discrete_schedule():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    k = torch.tensor([0, 1, 250, 999])
    torch.testing.assert_close(D.vp_timestep_from_alpha_bar(alphas_cumprod[k], alphas_cumprod), k.double())
    mid = D.vp_timestep_from_alpha_bar(alphas_cumprod[[10, 11]].mean().view(1), alphas_cumprod)
    assert 10 < float(mid) < 11
    # outside the schedule: clamped to its ends
    ends = D.vp_timestep_from_alpha_bar(torch.tensor([1.0, 0.0], dtype=torch.float64), alphas_cumprod)
    assert ends.tolist() == [0.0, 999.0]


# ------ Denoisers and CFG --------------------------------------------------------------------------


class _ExactVelocityModel(torch.nn.Module):
    """Predicts v = eps - x0 exactly for a known (x0, eps) pair, through a bf16-able linear layer."""

    def __init__(self, x0):
        super().__init__()
        self.register_buffer("x0", x0)
        self.lin = torch.nn.Linear(x0.shape[-1], x0.shape[-1])
        with torch.no_grad():
            self.lin.weight.copy_(torch.eye(x0.shape[-1]))
            self.lin.bias.zero_()

    def forward(self, x_t, t, cond):
        tb = t.view(-1, 1)
        eps = (x_t - (1 - tb) * self.x0) / tb
        return self.lin(eps - self.x0)


def test_velocity_denoiser_recovers_x0_and_returns_fp32_under_autocast():
    x0, eps = _randn(4, 8, seed=1), _randn(4, 8, seed=2)
    t = torch.tensor([0.1, 0.4, 0.7, 1.0])
    model = _ExactVelocityModel(x0)
    den = D.VelocityDenoiser(model)
    x_t = D.interpolate(x0, eps, t)
    torch.testing.assert_close(den(x_t, t, None), x0, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x_t, t, None).dtype == torch.bfloat16
        out = den(x_t, t, None)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x0, atol=0.05, rtol=0.05)


def _label_denoiser(calls):
    """x0 = x_t * (label + 1): distinguishes conditional (label) and null (label 10) evaluations."""

    def den(x_t, t, labels):
        calls.append(x_t.shape[0])
        return x_t * (labels.to(x_t.dtype) + 1).view(-1, 1)

    return den


def test_cfg_scale_one_is_the_conditional_with_one_call():
    calls = []
    den = _label_denoiser(calls)
    x, labels, t = _randn(3, 4), torch.tensor([0, 3, 7]), torch.full((3,), 0.5)
    out = D.cfg_denoiser(den, 1.0, null_cond=10)(x, t, labels)
    torch.testing.assert_close(out, den(x, t, labels))
    assert calls == [3, 3]


def test_cfg_formula_in_one_doubled_batch():
    calls = []
    den = _label_denoiser(calls)
    x, labels, t = _randn(3, 4), torch.tensor([0, 3, 7]), torch.full((3,), 0.5)
    out = D.cfg_denoiser(den, 4.0, null_cond=10)(x, t, labels)
    cond_x0 = x * (labels + 1).view(-1, 1)
    null_x0 = x * 11
    torch.testing.assert_close(out, null_x0 + 4.0 * (cond_x0 - null_x0))
    assert calls == [6]  # one call with the doubled batch


def test_cfg_guidance_interval_is_per_sample():
    calls = []
    den = _label_denoiser(calls)
    x, labels = _randn(4, 4), torch.tensor([1, 2, 3, 4])
    t = torch.tensor([0.05, 0.3, 0.7, 0.95])
    out = D.cfg_denoiser(den, 2.0, null_cond=10, interval=(0.2, 0.8))(x, t, labels)
    cond_x0 = x * (labels + 1).view(-1, 1)
    guided = x * 11 + 2.0 * (cond_x0 - x * 11)
    inside = torch.tensor([False, True, True, False]).view(-1, 1)
    torch.testing.assert_close(out, torch.where(inside, guided, cond_x0))
    # a batch entirely outside the interval costs one plain call
    calls.clear()
    out = D.cfg_denoiser(den, 2.0, null_cond=10, interval=(0.2, 0.8))(x, torch.full((4,), 0.9), labels)
    torch.testing.assert_close(out, cond_x0)
    assert calls == [4]


def test_concat_cond_handles_dicts_embeddings_and_null_expansion():
    cond = {"emb": torch.ones(2, 3, 5), "mask": torch.ones(2, 3, dtype=torch.long), "extra": None}
    null = {"emb": torch.zeros(1, 3, 5), "mask": torch.zeros(3, dtype=torch.long), "extra": None}
    both = D.concat_cond(cond, null)
    assert both["emb"].shape == (4, 3, 5) and both["mask"].shape == (4, 3) and both["extra"] is None
    assert both["emb"][:2].eq(1).all() and both["emb"][2:].eq(0).all()
    labels = D.concat_cond(torch.tensor([1, 2]), 1000)
    assert labels.dtype == torch.long and labels.tolist() == [1, 2, 1000, 1000]
    with pytest.raises(ValueError, match="same keys"):
        D.concat_cond(cond, {"emb": null["emb"]})


# ------ Schedules ----------------------------------------------------------------------------------


def test_time_schedule_endpoints_monotone_and_shift():
    ts = D.time_schedule(10)
    assert ts.shape == (11,) and ts[0] == 1 and ts[-1] == 0 and (ts[1:] < ts[:-1]).all()
    shifted = D.time_schedule(4, shift=3.0)
    base = torch.linspace(1, 0, 5)
    torch.testing.assert_close(shifted, 3 * base / (1 + 2 * base))
    assert (shifted[1:-1] > base[1:-1]).all()  # shift > 1 spends more steps near noise
    with pytest.raises(ValueError):
        D.time_schedule(0)


def test_explicit_schedule_validation():
    with pytest.raises(ValueError, match="decreasing"):
        D.sample_euler(gaussian_denoiser, _randn(2, 4), None, t_schedule=[0.5, 0.8, 0.0])
    with pytest.raises(ValueError, match="steps"):
        D.sample_euler(gaussian_denoiser, _randn(2, 4), None, steps=3, t_schedule=[1.0, 0.0])


def test_sample_t_kinds_ranges_and_determinism():
    for kind in ("uniform", "logit_normal", "shifted"):
        a = D.sample_t(4000, kind, torch.Generator().manual_seed(0), t_min=0.02, t_max=0.98, shift=3.0)
        b = D.sample_t(4000, kind, torch.Generator().manual_seed(0), t_min=0.02, t_max=0.98, shift=3.0)
        assert torch.equal(a, b) and a.dtype == torch.float32
        assert a.min() >= 0.02 and a.max() <= 0.98
    # logit-normal: median sigmoid(mean); shifted: median shift*0.5/(1+(shift-1)*0.5) = 0.75 for shift 3
    t = D.sample_t(20000, "logit_normal", torch.Generator().manual_seed(1), mean=1.0)
    assert abs(float(t.median()) - 1 / (1 + math.exp(-1.0))) < 0.01
    t = D.sample_t(20000, "shifted", torch.Generator().manual_seed(1), shift=3.0)
    assert abs(float(t.median()) - 0.75) < 0.01
    with pytest.raises(UserError, match="kind"):
        D.sample_t(4, "cosine")


# ------ Samplers on Gaussian data ------------------------------------------------------------------


def _affine_map(sampler, steps):
    """For the exact Gaussian denoiser a deterministic sampler is affine per dimension: out = a*noise + b."""
    probe = torch.stack([torch.zeros(4), torch.ones(4)]).double()
    out = D.sample(gaussian_denoiser, probe, None, sampler=sampler, steps=steps)
    return out[1] - out[0], out[0]


@pytest.mark.parametrize("sampler,steps,tol", [("euler", 100, 0.025), ("heun", 30, 0.008)])
def test_ode_samplers_exact_mean_and_std_within_discretisation_error(sampler, steps, tol):
    scale, offset = _affine_map(sampler, steps)
    torch.testing.assert_close(offset, MU)  # the mean is carried exactly
    rel_std_error = (scale / SD - 1).abs()
    assert (rel_std_error < tol).all(), rel_std_error


def test_ode_samplers_convergence_order():
    # Euler is first order (error halves when the steps double), Heun second order (quarters).
    e1 = (_affine_map("euler", 100)[0] / SD - 1).abs()
    e2 = (_affine_map("euler", 200)[0] / SD - 1).abs()
    assert ((e1 / e2 > 1.8) & (e1 / e2 < 2.2)).all(), e1 / e2
    h1 = (_affine_map("heun", 15)[0] / SD - 1).abs()
    h2 = (_affine_map("heun", 30)[0] / SD - 1).abs()
    assert (h1 / h2 > 3.5).all(), h1 / h2


N_SAMPLES = 20000


@pytest.mark.parametrize(
    "sampler,steps,bias_budget",
    # bias_budget: the sampler's relative std error with the exact denoiser at these step counts
    # (measured with 200k samples / the affine map: Euler 1.5-2.2 %, Heun < 0.8 %, SDE < 1 %).
    [("euler", 100, 0.025), ("heun", 30, 0.01), ("sde", 200, 0.012)],
)
def test_samplers_reproduce_gaussian_data_statistics(sampler, steps, bias_budget):
    noise = _randn(N_SAMPLES, 4, seed=0)
    out = D.sample(
        gaussian_denoiser, noise, None, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(1)
    ).double()
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    # Monte-Carlo standard errors: mean sd/sqrt(N); std (relative) 1/sqrt(2N). Allow 5 of them.
    mean_err = ((out.mean(0) - MU) / (SD / math.sqrt(N_SAMPLES))).abs()
    assert (mean_err < 5).all(), mean_err
    std_err = (out.std(0) / SD - 1).abs()
    assert (std_err < bias_budget + 5 / math.sqrt(2 * N_SAMPLES)).all(), std_err


def test_sde_sampler_is_reproducible_with_generator_and_zero_diffusion_is_euler():
    noise = _randn(8, 4, seed=3)
    a = D.sample_euler_maruyama(gaussian_denoiser, noise, None, 20, generator=torch.Generator().manual_seed(5))
    b = D.sample_euler_maruyama(gaussian_denoiser, noise, None, 20, generator=torch.Generator().manual_seed(5))
    c = D.sample_euler_maruyama(gaussian_denoiser, noise, None, 20, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    ode = D.sample_euler_maruyama(gaussian_denoiser, noise, None, 20, diffusion_scale=0.0)
    torch.testing.assert_close(ode, D.sample_euler(gaussian_denoiser, noise, None, 20))


def test_nfe_counts():
    calls = []

    def counting(x_t, t, cond):
        calls.append(float(t[0]))
        return gaussian_denoiser(x_t, t)

    noise = _randn(2, 4)
    for sampler, expected in (("euler", 7), ("heun", 2 * 7 - 1), ("sde", 7)):
        calls.clear()
        D.sample(counting, noise, None, sampler=sampler, steps=7)
        assert len(calls) == expected, sampler
        assert 0.0 not in calls  # never evaluated at t = 0
    with pytest.raises(UserError, match="sampler"):
        D.sample(counting, noise, None, sampler="dpm")


def test_few_step_sample_one_step_is_posterior_mean_at_pure_noise():
    noise = _randn(16, 4, seed=7, dtype=torch.float64)
    out = D.few_step_sample(gaussian_denoiser, noise, None, [1.0])
    torch.testing.assert_close(out, MU.expand(16, 4))  # E[x0 | x_1] = mu


def test_few_step_sample_times_and_renoising():
    seen = []

    def recording(x_t, t, cond):
        seen.append(t.tolist())
        return gaussian_denoiser(x_t, t)

    noise = _randn(3, 4, seed=8, dtype=torch.float64)
    a = D.few_step_sample(recording, noise, None, [1.0, 0.75, 0.5, 0.25], torch.Generator().manual_seed(0))
    assert seen == [[1.0] * 3, [0.75] * 3, [0.5] * 3, [0.25] * 3]
    b = D.few_step_sample(gaussian_denoiser, noise, None, [1.0, 0.75, 0.5, 0.25], torch.Generator().manual_seed(0))
    c = D.few_step_sample(gaussian_denoiser, noise, None, [1.0, 0.75, 0.5, 0.25], torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="decreasing"):
        D.few_step_sample(gaussian_denoiser, noise, None, [0.5, 1.0])


def test_shifted_times_stay_inside_the_configured_range_and_move_towards_noise():
    """The shift acts on [0, 1] before the affine map, so t_min/t_max bound the draws whatever the shift."""
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    plain = D.sample_t(20000, kind="shifted", generator=g(), t_min=0.02, t_max=0.98, shift=1.0)
    shifted = D.sample_t(20000, kind="shifted", generator=g(), t_min=0.02, t_max=0.98, shift=3.0)
    assert 0.02 <= float(shifted.min()) and float(shifted.max()) <= 0.98
    assert float(shifted.mean()) > float(plain.mean()) + 0.1  # density moved towards t_max (noise)
    torch.testing.assert_close(plain, D.sample_t(20000, kind="uniform", generator=g(), t_min=0.02, t_max=0.98))
