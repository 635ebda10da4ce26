"""Can DMD2's discriminator head tell a student's samples from real digits? (issue 12 diagnostic)

The stage-2 trials logged a discriminator loss that stays at 2 ln 2: the head never separates the sets. This probe
trains the head alone, on fixed sets (student samples against real training digits, each with its own label), on
the frozen teacher's last hidden state (the fake score's features at the start of stage 2), for several GAN t
ranges, and reports its accuracy on held-out pairs. A pixel-space logistic/CNN reference shows how separable the
clean sets are.

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
from dmd_dar.diffusion import interpolate  # noqa: E402
from dmd_dar.dmd.family import DiTFamily  # noqa: E402
from dmd_dar.dmd.method import make_gan_head  # noqa: E402


def student_samples(student_dir: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    fam = DiTFamily(student_dir, torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *fam.sample_shape), generator=g)
    ids = torch.randint(0, fam.num_conditions, (n,), generator=g)
    den = fam.denoiser(fam.teacher())
    out = []
    with torch.no_grad():
        for i in range(0, n, 256):
            out.append(den(noise[i:i + 256], torch.ones(len(noise[i:i + 256])), ids[i:i + 256]).clamp(-1, 1))
    return torch.cat(out), ids


def probe(features, head_kind, real, real_y, fake, fake_y, t_lo, t_hi, steps, batch, lr, seed):
    torch.manual_seed(seed)
    head = make_gan_head(128)
    opt = torch.optim.Adam(head.parameters(), lr=lr, betas=(0.0, 0.999))
    g = torch.Generator().manual_seed(seed)
    n_train = int(0.8 * len(real))

    def logits(x, y, t, noise):
        with torch.no_grad():
            h = features(interpolate(x, noise, t), t, y)
        return head(h.mean(1) if head_kind == "pooled" else h).squeeze(-1).reshape(len(x), -1).mean(1)

    def draw(lo, hi, size):
        i = torch.randint(lo, hi, (size,), generator=g)
        t = t_lo + (t_hi - t_lo) * torch.rand(size, generator=g)
        return i, t, torch.randn((size, *real.shape[1:]), generator=g)

    losses = []
    for _ in range(steps):
        i, t, e = draw(0, n_train, batch)
        j = torch.randint(0, n_train, (batch,), generator=g)
        loss = nn.functional.softplus(-logits(real[i], real_y[i], t, e)).mean() + \
            nn.functional.softplus(logits(fake[j], fake_y[j], t, e)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        i, t, e = draw(n_train, len(real), 1024)
        j = torch.randint(n_train, len(fake), (1024,), generator=g)
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
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--t-ranges", default="0.02-0.98,0.02-0.3,0.0-0.1")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    fake, fake_y = student_samples(a.student, a.n, seed=1)
    data = load_dataset("mnist", "train")
    idx = torch.randperm(len(data.images), generator=torch.Generator().manual_seed(2))[: a.n]
    real, real_y = data.images[idx], data.labels[idx]
    teacher = DiTFamily(a.teacher, torch.device("cpu")).teacher()
    features = lambda x_t, t, y: teacher(x_t, t, y, return_hidden=True).hidden.float()  # noqa: E731
    rows = {"pixel_cnn_clean_accuracy": pixel_reference(real, fake, 600, 0), "probes": []}
    print(f"pixel CNN on clean images: held-out accuracy {rows['pixel_cnn_clean_accuracy']:.3f}", flush=True)
    for tr in a.t_ranges.split(","):
        lo, hi = map(float, tr.split("-"))
        for kind in ("pooled", "tokens"):
            t0 = time.time()
            r = probe(features, kind, real, real_y, fake, fake_y, lo, hi, a.steps, 32, a.lr, 0)
            rows["probes"].append(r)
            print(f"t in [{lo}, {hi}], head {kind}: held-out accuracy {r['held_out_accuracy']:.3f}, loss "
                  f"{r['train_loss_first50']:.3f} -> {r['train_loss_last50']:.3f} ({time.time() - t0:.0f} s)", flush=True)
    Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
