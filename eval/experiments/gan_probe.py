"""Can DMD2's discriminator head tell a student's samples from real digits? (issue 12 diagnostic)

The stage-2 trials logged a discriminator loss that stays at 2 ln 2: the head never separates the sets. This probe
trains the head alone, on fixed sets (student samples against real training digits, each with its own label), on
the frozen teacher's last hidden state (the fake score's features at the start of stage 2), for several GAN t
ranges, and reports its accuracy on held-out pairs. A small pixel-space CNN shows how separable the clean sets are.

    .venv/bin/python eval/experiments/gan_probe.py runs/stage1_s0/dar/student --out runs/gan_probe.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from dmd_dar.data import load_dataset  # noqa: E402
from dmd_dar.diffusion import interpolate, sample_t  # noqa: E402
from dmd_dar.dmd.family import DiTFamily  # noqa: E402
from dmd_dar.dmd.losses import gan_discriminator_loss  # noqa: E402
from dmd_dar.dmd.method import FakeScore, make_gan_head  # noqa: E402
from dmd_dar.dmd.trainer import student_images  # noqa: E402


def one_step_samples(student_dir: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    family = DiTFamily(student_dir, torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *family.sample_shape), generator=g)
    ids = torch.randint(0, family.num_conditions, (n,), generator=g)
    with torch.no_grad():
        return student_images(family, family.teacher(), noise, ids, [1.0]), ids


def probe(family, head_kind, real, real_y, fake, fake_y, t_lo, t_hi, steps, batch, lr, seed):
    """Train a fresh head (the trainer's, on the frozen teacher's features) on real vs generated noised pairs;
    return its accuracy on 1,024 held-out pairs."""
    torch.manual_seed(seed)
    disc = FakeScore(family, family.teacher(), make_gan_head(family.feature_dim), head_kind)
    opt = torch.optim.Adam(disc.head.parameters(), lr=lr, betas=(0.0, 0.999))
    g = torch.Generator().manual_seed(seed)
    n_train = int(0.8 * len(real))

    def logits(x, y, t, noise):  # one logit per image (the per-token head's logits averaged)
        return disc.gan_logits(interpolate(x, noise, t), t, y).reshape(len(x), -1).mean(1)

    def draw(lo, hi, size):  # real indices, times, noises, then generated indices (the order of the recorded runs)
        i = torch.randint(lo, hi, (size,), generator=g)
        t = sample_t(size, "uniform", generator=g, t_min=t_lo, t_max=t_hi)
        e = torch.randn((size, *real.shape[1:]), generator=g)
        return i, torch.randint(lo, hi, (size,), generator=g), t, e

    losses = []
    for _ in range(steps):
        i, j, t, e = draw(0, n_train, batch)
        loss = gan_discriminator_loss(logits(real[i], real_y[i], t, e), logits(fake[j], fake_y[j], t, e))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        i, j, t, e = draw(n_train, len(real), 1024)
        acc = 0.5 * ((logits(real[i], real_y[i], t, e) > 0).float().mean() + (logits(fake[j], fake_y[j], t, e) < 0).float().mean())
    return {"t": [t_lo, t_hi], "head": head_kind, "held_out_accuracy": float(acc),
            "train_loss_last50": sum(losses[-50:]) / 50, "train_loss_first50": sum(losses[:50]) / 50}


def pixel_reference(real, fake, steps, seed):
    """A small CNN on the clean images: how separable the two sets are without noise."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 32, 3, 2, 1), nn.SiLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.SiLU(),
                        nn.Conv2d(64, 64, 3, 2, 1), nn.SiLU(), nn.Flatten(), nn.Linear(64 * 16, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    n_train = int(0.8 * len(real))
    for _ in range(steps):
        i = torch.randint(0, n_train, (64,), generator=g)
        loss = nn.functional.softplus(-net(real[i])).mean() + nn.functional.softplus(net(fake[i])).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(0.5 * ((net(real[n_train:]) > 0).float().mean() + (net(fake[n_train:]) < 0).float().mean()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("student")
    p.add_argument("--teacher", default="bundled", help="the features' backbone (the fake score's start)")
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--t-ranges", default="0.02-0.98,0.0-0.3,0.0-0.1")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    fake, fake_y = one_step_samples(a.student, a.n, seed=1)
    data = load_dataset("mnist", "train")
    idx = torch.randperm(len(data.images), generator=torch.Generator().manual_seed(2))[: a.n]
    real, real_y = data.images[idx], data.labels[idx]
    family = DiTFamily(a.teacher, torch.device("cpu"))
    rows = {"pixel_cnn_clean_accuracy": pixel_reference(real, fake, 600, 0), "probes": []}
    print(f"pixel CNN on clean images: held-out accuracy {rows['pixel_cnn_clean_accuracy']:.3f}", flush=True)
    for tr in a.t_ranges.split(","):
        lo, hi = map(float, tr.split("-"))
        for kind in ("pooled", "tokens"):
            t0 = time.time()
            r = probe(family, kind, real, real_y, fake, fake_y, lo, hi, a.steps, 32, a.lr, 0)
            rows["probes"].append(r)
            print(f"t in [{lo}, {hi}], head {kind}: held-out accuracy {r['held_out_accuracy']:.3f}, loss "
                  f"{r['train_loss_first50']:.3f} -> {r['train_loss_last50']:.3f} ({time.time() - t0:.0f} s)", flush=True)
    Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
