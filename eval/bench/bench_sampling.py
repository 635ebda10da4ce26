"""Sampling cost: the 1-step DAR student vs the teacher's 50- and 250-NFE Euler samplers, same batch.

Teacher: residual DiT, `dmd_dar.diffusion.sample_euler` with CFG (default 1.5, one doubled-batch forward
per step, so 2 network passes of the batch per NFE); student: DAR DiT (static_t, chunk 4),
`few_step_sample` with timesteps [1.0] and no CFG (the guidance is distilled in). bf16 autocast on CUDA,
no grad, random weights (time does not depend on them). The 250-NFE sampler runs --iters-250 times
(default 1: it is the long one).

    python eval/bench/bench_sampling.py                 # GPU: XL/2, B=32
    python eval/bench/bench_sampling.py --device cpu    # CPU: tiny model, 5/25 NFE by default
"""
from __future__ import annotations

import argparse

import _common as C  # noqa: I001
import torch

from dmd_dar.diffusion import VelocityDenoiser, cfg_denoiser, few_step_sample, sample_euler
from dmd_dar.errors import cli_main
from dmd_dar.routing import RoutingConfig


@cli_main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(parser)
    C.add_model_args(parser)
    parser.add_argument("--nfe", default=None, help="comma list of teacher Euler step counts (default 50,250 on GPU; 5,25 on CPU)")
    parser.add_argument("--cfg", type=float, default=1.5)
    parser.add_argument("--iters-long", type=int, default=1, help="timed runs of the teacher samplers")
    args = parser.parse_args(argv)
    C.resolve_iters(args)
    C.resolve_model_args(args)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    nfes = [int(n) for n in (args.nfe or ("50,250" if gpu else "5,25")).split(",")]
    amp = gpu

    teacher = C.build_dit(args, RoutingConfig(mode="residual"), device).eval().requires_grad_(False)
    student = C.build_dit(args, RoutingConfig(mode="dar", query="static_t", chunk_size=4, summary="sum"), device)
    student = student.eval().requires_grad_(False)
    C.randomise_router(student)
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (args.batch, args.channels, args.input_size, args.input_size)
    noise = torch.randn(shape, generator=gen).to(device)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=gen).to(device)
    teacher_x0 = cfg_denoiser(VelocityDenoiser(teacher), args.cfg, null_cond=args.num_classes)
    student_x0 = VelocityDenoiser(student)

    def autocast():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp)

    def run_student():
        with torch.no_grad(), autocast():
            return few_step_sample(student_x0, noise, y, timesteps=[1.0])

    results = {"student 1-step": C.time_ms(run_student, device, args.warmup, args.iters)}
    for k, n in enumerate(nfes):
        def run_teacher(n=n):
            with autocast():
                return sample_euler(teacher_x0, noise, y, steps=n)

        # The student's warm-up already ran the network; one untimed teacher run (the first) is enough.
        results[f"teacher Euler {n} NFE"] = C.time_ms(run_teacher, device, 1 if k == 0 else 0, args.iters_long)

    C.header("sampling: 1-step student vs teacher Euler", args, device,
             f"model: depth={args.depth} hidden={args.hidden} heads={args.heads} patch={args.patch} "
             f"latent={args.channels}x{args.input_size}x{args.input_size}  batch={args.batch}  bf16 autocast={amp}  "
             f"teacher cfg={args.cfg} (doubled batch per NFE)  student: DAR static_t c4, no CFG")
    base = results["student 1-step"]
    print(f"{'sampler':<24} {'ms / batch':>11} {'ms / image':>11} {'x student':>10}")
    for name, ms in results.items():
        print(f"{name:<24} {ms:>11.2f} {ms / args.batch:>11.3f} {ms / base:>10.1f}")
    print("target: 1-step student >= 100x faster than the 250-NFE sampler (GPU)")
    C.write_json(args.json, {"device": C.device_name(device), "args": vars(args), "ms_per_batch": results,
                             "speedup_vs_student": {k: v / base for k, v in results.items()}})


if __name__ == "__main__":
    main()
