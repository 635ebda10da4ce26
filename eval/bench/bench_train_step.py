"""One SiT-XL/2 training step (bf16 autocast, AdamW): residual vs DAR, step time and peak memory ratios.

Variants: residual; DAR dense (chunk 1) and chunk 4, each with static_t and dynamic queries, on the
router's default backend ("auto": the fused Triton kernel on CUDA); plus DAR c4 static_t on the naive
backend ("torch") to show what the kernel buys. Dense + naive is left out on purpose: the reference path
stacks and saves an fp32 copy of every source set, about 60 GiB at B=32 for the 57-source model.

The step is the flow-matching velocity loss of `dmd_dar.diffusion` conventions (x_t = (1-t) x0 + t eps,
v = eps - x0) on random latents and labels; weights are random (time does not depend on them).

    python eval/bench/bench_train_step.py                      # GPU: XL/2, B=32, 32x32x4 latents
    python eval/bench/bench_train_step.py --device cpu         # CPU: tiny model (flags resize it)
"""
from __future__ import annotations

import argparse
import gc

import _common as C  # noqa: I001
import torch
import torch.nn.functional as F

from dmd_dar.errors import UserError, cli_main
from dmd_dar.routing import RoutingConfig

VARIANTS = {
    "residual": dict(mode="residual"),
    "dar dense static_t": dict(mode="dar", query="static_t", chunk_size=1),
    "dar dense dynamic": dict(mode="dar", query="dynamic", chunk_size=1),
    "dar c4 static_t": dict(mode="dar", query="static_t", chunk_size=4),
    "dar c4 dynamic": dict(mode="dar", query="dynamic", chunk_size=4),
    "dar c4 static_t naive": dict(mode="dar", query="static_t", chunk_size=4, backend="torch"),
}


def run_variant(name: str, args, device: torch.device) -> dict:
    routing = RoutingConfig(**VARIANTS[name])
    model = C.build_dit(args, routing, device)
    if routing.mode == "dar":
        C.randomise_router(model)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (args.batch, args.channels, args.input_size, args.input_size)
    x0 = torch.randn(shape, generator=gen).to(device)
    noise = torch.randn(shape, generator=gen).to(device)
    t = torch.rand(args.batch, generator=gen).to(device)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=gen).to(device)
    amp = device.type == "cuda" or args.cpu_autocast

    def step():
        tb = t.view(-1, 1, 1, 1)
        x_t = (1 - tb) * x0 + tb * noise
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            v = model(x_t, t, y)
        loss = F.mse_loss(v.float(), noise - x0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    step()  # allocate the optimizer state before measuring memory
    C.reset_peak(device)
    ms = C.time_ms(step, device, args.warmup, args.iters)
    peak = C.peak_mb(device)
    del model, opt
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"step_ms": ms, "peak_mb": peak, "params_m": params / 1e6}


@cli_main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(parser)
    C.add_model_args(parser)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of: {', '.join(VARIANTS)}")
    parser.add_argument("--cpu-autocast", action="store_true", help="bf16 autocast on the CPU too (slow on most CPUs)")
    args = parser.parse_args(argv)
    C.resolve_iters(args)
    C.resolve_model_args(args)
    device = torch.device(args.device)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or "residual" not in names:
        raise UserError(f"--variants must include 'residual' and only names from: {', '.join(VARIANTS)} (got {unknown or names})")
    C.header("training step: residual vs DAR", args, device,
             f"model: depth={args.depth} hidden={args.hidden} heads={args.heads} patch={args.patch} "
             f"latent={args.channels}x{args.input_size}x{args.input_size} ({(args.input_size // args.patch) ** 2} tokens)  "
             f"batch={args.batch}  autocast bf16={device.type == 'cuda' or args.cpu_autocast}  AdamW  "
             f"warmup={args.warmup} iters={args.iters}")
    results = {}
    for name in names:
        results[name] = run_variant(name, args, device)
    base = results["residual"]
    print(f"{'variant':<24} {'params M':>9} {'step ms':>9} {'x time':>7} {'peak MiB':>9} {'x mem':>6}")
    for name, r in results.items():
        r["time_ratio"] = C.ratio(r["step_ms"], base["step_ms"])
        r["mem_ratio"] = C.ratio(r["peak_mb"], base["peak_mb"])
        print(f"{name:<24} {r['params_m']:>9.1f} {r['step_ms']:>9.1f} {C.fmt(r['time_ratio'], '.3f'):>7} "
              f"{C.fmt(r['peak_mb'], '.0f'):>9} {C.fmt(r['mem_ratio'], '.3f'):>6}")
    print("targets: DAR c4 <= 1.05x residual time and <= 1.10x memory; dense <= 1.10x time")
    C.write_json(args.json, {"device": C.device_name(device), "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
