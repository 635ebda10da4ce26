import torch
from torch import nn

from dmd_dar.diffusion import few_step_sample, interpolate, x0_from_velocity
from dmd_dar.dmd import distribution_matching_loss, noised_dm_loss


# ----------------------------------------------------------------------------- the loss contract
def test_dm_loss_gradient_matches_the_contract():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=g, requires_grad=True)
    real = torch.randn(3, 2, 4, 4, generator=g, requires_grad=True)
    fake = torch.randn(3, 2, 4, 4, generator=g, requires_grad=True)
    distribution_matching_loss(x, real, fake).backward()
    normaliser = (x - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = (fake - real) / normaliser / x.numel()
    torch.testing.assert_close(x.grad, expected.detach(), rtol=1e-5, atol=1e-8)
    assert real.grad is None and fake.grad is None  # stop-gradient targets


def test_dm_loss_is_zero_when_fake_equals_real_and_finite_at_zero_distance():
    x = torch.randn(2, 3, requires_grad=True)
    real = torch.randn(2, 3)
    assert distribution_matching_loss(x, real, real.clone()).item() == 0.0
    loss = distribution_matching_loss(x, x.detach().clone(), torch.randn(2, 3))  # |x - real| = 0
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_few_step_backward_simulation_only_the_train_step_has_gradient():
    w = torch.tensor(0.5, requires_grad=True)
    calls = []

    def student(x_t, t, cond):
        calls.append(torch.is_grad_enabled())
        return w * x_t

    noise = torch.ones(2, 3)
    renoise = torch.zeros(3, 2, 3)
    out = few_step_sample(student, noise, None, [1.0, 0.75, 0.5, 0.25], train_step=2, renoise=renoise)
    assert calls == [False, False, True] and out.requires_grad
    # the chain: x0 = w x; renoised to t = 0.75 with zero noise: x = 0.25 x0; to t = 0.5: x = 0.5 x0
    expected = 0.5 * (0.5 * (0.5 * (0.25 * (0.5 * 1.0))))
    torch.testing.assert_close(out, torch.full((2, 3), expected))
    calls.clear()
    with torch.no_grad():
        few_step_sample(student, noise, None, [1.0, 0.5], renoise=renoise[:1])
    assert calls == [False, False]


# ----------------------------------------------------------------------------- 2-D mixture toy
MEANS = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
STD = 0.2


def analytic_x0(x_t, t, cond=None):
    """E[x0 | x_t] for x0 ~ mixture of N(mu_k, STD^2 I) (equal weights), x_t = (1-t) x0 + t eps."""
    t = t.view(-1, 1, 1)
    var = (1 - t) ** 2 * STD**2 + t**2
    diff = x_t[:, None, :] - (1 - t) * MEANS[None]
    logits = -(diff**2).sum(-1) / (2 * var[..., 0])
    resp = torch.softmax(logits, dim=1)[..., None]
    posterior_means = MEANS[None] + (1 - t) * STD**2 / var * diff
    return (resp * posterior_means).sum(1)


def mixture_distance(x: torch.Tensor) -> float:
    """Energy distance between x and mixture samples (0 = same distribution)."""
    g = torch.Generator().manual_seed(1)
    ref = MEANS[torch.randint(0, 4, (len(x),), generator=g)] + STD * torch.randn(len(x), 2, generator=g)
    d = lambda a, b: torch.cdist(a, b).mean()  # noqa: E731
    return float(2 * d(x, ref) - d(x, x) - d(ref, ref))


class VelocityMLP(nn.Module):
    def __init__(self, hidden=128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))

    def forward(self, x_t, t, cond=None):
        return self.net(torch.cat([x_t, t[:, None]], dim=1))


def test_one_step_generator_moves_onto_the_mixture():
    """DMD with an analytic teacher and a learned fake score: the energy distance falls by >= 5x."""
    torch.manual_seed(0)
    generator = nn.Sequential(nn.Linear(2, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 2))
    fake = VelocityMLP()
    fake_x0 = lambda x_t, t, c=None: x0_from_velocity(x_t, t, fake(x_t, t))  # noqa: E731
    g_opt = torch.optim.Adam(generator.parameters(), lr=1e-3, betas=(0.0, 0.99))
    f_opt = torch.optim.Adam(fake.parameters(), lr=1e-3, betas=(0.0, 0.99))
    eval_noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = mixture_distance(generator(eval_noise))
    # warm the fake score up on the initial generator, then two time scales (5 fake updates per step)
    for step in range(1200):
        for _ in range(5 if step else 50):
            with torch.no_grad():
                x = generator(torch.randn(256, 2))
            t, eps = torch.rand(256).clamp(0.02, 0.98), torch.randn(256, 2)
            loss_f = (fake(interpolate(x, eps, t), t) - (eps - x)).pow(2).mean()
            f_opt.zero_grad(); loss_f.backward(); f_opt.step()  # noqa: E702
        x = generator(torch.randn(256, 2))
        t = torch.rand(256) * 0.96 + 0.02
        loss = noised_dm_loss(x, None, analytic_x0, fake_x0, t, torch.randn(256, 2))
        g_opt.zero_grad(); loss.backward(); g_opt.step()  # noqa: E702
    with torch.no_grad():
        samples = generator(eval_noise)
    after = mixture_distance(samples)
    assert after < before / 5, (before, after)
    # and every mode is populated (no mode collapse onto a subset)
    nearest = torch.cdist(samples, MEANS).argmin(1)
    counts = torch.bincount(nearest, minlength=4).float() / len(samples)
    assert counts.min() > 0.1, counts


def test_dm_loss_normaliser_floor_bounds_the_gradient_of_a_sample_equal_to_the_teacher():
    from dmd_dar.dmd.losses import NORMALISER_FLOOR

    x = torch.zeros(2, 8, requires_grad=True)
    fake = torch.ones(2, 8)
    distribution_matching_loss(x, x.detach().clone(), fake).backward()  # mean|x - real| = 0 for every sample
    expected = fake / NORMALISER_FLOOR / x.numel()  # the floor, not 1 / 1e-12
    torch.testing.assert_close(x.grad, expected)
    assert float(x.grad.abs().max()) < 1e5
