"""One DMD student update at DiT-XL/2 size: time per student update and model FLOP utilisation (MFU).

Self-contained emulation (the project's DMD trainer is written elsewhere; this measures the same work with
plain ops on `dmd_dar.models.DiT`, `dmd_dar.diffusion` and `dmd_dar.routing.kernels`):

  student  (DAR, trained)    x = G(z) = x0 prediction at t = 1 (one step), with grad
  teacher  (residual, frozen) real_x0 at a noised x_t, with CFG (one doubled-batch forward, no grad)
  fake     (residual, trained) fake_x0 at the same x_t (no grad)
  student loss: the DMD2 form 0.5 * mean((x - sg(x - grad))^2), grad = (fake_x0 - real_x0) / mean|x - real_x0|
           -> backward through the student, AdamW step
  fake update(s): the flow-matching velocity loss on the detached x (fresh t, noise), backward, AdamW step;
           --fake-updates k > 1 draws a new student sample (no grad) for each extra update (DMD2: k = 5)

MFU = analytic matmul FLOPs / time / peak. F = one DiT forward per sample (see `_common.dit_forward_flops`:
per block T (24 d^2 + 4 T d) + 12 d^2, plus embeddings/head); backward = 2 F for a trained model.
Per student update and sample: student 3 F + teacher CFG 2 F + fake forward F + first fake update 3 F,
and each extra fake update F (student sample) + 3 F. The peak is dense bf16 tensor-core throughput:
989 TFLOP/s for H100 SXM and H200 (override with --peak-tflops). Random weights (time does not depend on them).

    python eval/bench/bench_dmd_step.py                 # GPU: XL/2, B=32
    python eval/bench/bench_dmd_step.py --device cpu    # CPU: tiny model, MFU n/a
"""
from __future__ import annotations

import argparse

import _common as C  # noqa: I001
import torch
import torch.nn.functional as F

from dmd_dar.diffusion import VelocityDenoiser, cfg_denoiser, interpolate
from dmd_dar.errors import cli_main
from dmd_dar.routing import RoutingConfig


@cli_main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(parser)
    C.add_model_args(parser)
    parser.add_argument("--student-query", default="static_t", choices=["static", "static_t", "dynamic"])
    parser.add_argument("--student-chunk", type=int, default=4)
    parser.add_argument("--cfg", type=float, default=1.5, help="teacher guidance scale")
    parser.add_argument("--fake-updates", type=int, default=1, help="fake-score updates per student update")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the device's bf16 dense peak")
    args = parser.parse_args(argv)
    C.resolve_iters(args)
    C.resolve_model_args(args)
    device = torch.device(args.device)
    amp = device.type == "cuda"

    student_routing = RoutingConfig(mode="dar", query=args.student_query, chunk_size=args.student_chunk, summary="sum")
    teacher = C.build_dit(args, RoutingConfig(mode="residual"), device).eval().requires_grad_(False)
    fake = C.build_dit(args, RoutingConfig(mode="residual"), device).train()
    student = C.build_dit(args, student_routing, device).train()
    C.randomise_router(student)
    opt_student = torch.optim.AdamW(student.parameters(), lr=5e-6, weight_decay=0.0)
    opt_fake = torch.optim.AdamW(fake.parameters(), lr=2e-6, weight_decay=0.0)

    real_x0_fn = cfg_denoiser(VelocityDenoiser(teacher), args.cfg, null_cond=args.num_classes)
    fake_x0_fn = VelocityDenoiser(fake)
    student_x0_fn = VelocityDenoiser(student)
    B, shape = args.batch, (args.batch, args.channels, args.input_size, args.input_size)
    gen = torch.Generator(device="cpu").manual_seed(0)
    y = torch.randint(0, args.num_classes, (B,), generator=gen).to(device)
    ones = torch.ones(B, device=device)

    def autocast():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp)

    def fake_update(x: torch.Tensor) -> None:
        t = torch.rand(B, device=device).clamp(0.02, 0.98)
        noise = torch.randn_like(x)
        with autocast():
            v = fake(interpolate(x, noise, t), t, y)
        F.mse_loss(v.float(), noise - x).backward()
        opt_fake.step()
        opt_fake.zero_grad(set_to_none=True)

    def student_update() -> None:
        z = torch.randn(shape, device=device)
        with autocast():
            x = student_x0_fn(z, ones, y)  # one-step generator: x0 prediction at t = 1
        t = torch.rand(B, device=device).clamp(0.02, 0.98)
        x_t = interpolate(x.detach(), torch.randn_like(z), t)
        with torch.no_grad(), autocast():
            real_x0 = real_x0_fn(x_t, t, y).float()
            fake_x0 = fake_x0_fn(x_t, t, y).float()
        xd = x.detach().float()
        weight = (xd - real_x0).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
        grad = (fake_x0 - real_x0) / weight
        loss = 0.5 * F.mse_loss(x.float(), (xd - grad).detach())
        loss.backward()
        opt_student.step()
        opt_student.zero_grad(set_to_none=True)
        fake_update(xd)
        for _ in range(args.fake_updates - 1):
            with torch.no_grad(), autocast():
                x_new = student_x0_fn(torch.randn(shape, device=device), ones, y).float()
            fake_update(x_new)

    student_update()  # optimizer states
    C.reset_peak(device)
    ms = C.time_ms(student_update, device, args.warmup, args.iters)
    peak = C.peak_mb(device)

    f_teacher = C.dit_forward_flops(args)
    f_student = C.dit_forward_flops(args, args.student_query)
    cfg_factor = 1 if args.cfg == 1.0 else 2
    per_sample = 3 * f_student + cfg_factor * f_teacher + f_teacher + 3 * f_teacher
    per_sample += (args.fake_updates - 1) * (f_student + 3 * f_teacher)
    flops = per_sample * B
    achieved = flops / (ms / 1e3) / 1e12
    peak_tf = C.peak_tflops(device, args.peak_tflops)
    mfu = None if peak_tf is None else achieved / peak_tf

    C.header("DMD step (emulated: student fwd/bwd, teacher CFG fwd, fake fwd + update)", args, device,
             f"model: depth={args.depth} hidden={args.hidden} heads={args.heads} patch={args.patch} "
             f"latent={args.channels}x{args.input_size}x{args.input_size}  batch={B}  bf16 autocast={amp}  "
             f"student: {student_routing}  cfg={args.cfg}  fake updates/student update={args.fake_updates}")
    print(f"forward FLOPs per sample: teacher/fake {f_teacher / 1e9:.4g} GFLOP, student {f_student / 1e9:.4g} GFLOP; "
          f"per student update {flops / 1e12:.4g} TFLOP")
    print(f"time per student update: {ms:.1f} ms   achieved {achieved:.4g} TFLOP/s   "
          f"peak {C.fmt(peak_tf, '.0f')} TFLOP/s   MFU {C.fmt(None if mfu is None else 100 * mfu, '.1f')}%   "
          f"peak memory {C.fmt(peak, '.0f')} MiB")
    print("target: MFU >= 40% (GPU)")
    C.write_json(args.json, {"device": C.device_name(device), "args": vars(args), "step_ms": ms, "tflop_per_step": flops / 1e12,
                             "achieved_tflops": achieved, "peak_tflops": peak_tf, "mfu": mfu, "peak_mb": peak})


if __name__ == "__main__":
    main()
