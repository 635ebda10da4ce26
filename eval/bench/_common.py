"""Shared helpers of the benchmarks: device/model set-up, timing, peak memory, FLOP counts, output.

Imports only torch, numpy and dmd_dar modules that need neither diffusers nor omegaconf, so the scripts
run on the bare GPU machine (torch + triton).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

# Peak dense bf16 tensor throughput (no sparsity), TFLOP/s, by device-name substring.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def import_dit():
    """`dmd_dar.models.DiT` (safetensors is imported lazily by dmd_dar.checkpoint, so this works on the bare
    GPU machine too)."""
    from dmd_dar.models import DiT

    return DiT


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations (default: 3 on GPU, 1 on CPU)")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default: 10 on GPU, 2 on CPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: the dev machines are shared)")


def resolve_iters(args) -> None:
    gpu = args.device.startswith("cuda")
    if not gpu:
        torch.set_num_threads(args.threads)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    args.iters = args.iters if args.iters is not None else (10 if gpu else 2)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """DiT size flags; defaults are SiT-XL/2 at 256x256 (latent 32x32x4) on CUDA, a tiny model on the CPU."""
    parser.add_argument("--batch", type=int, default=None, help="default: 32 on GPU, 2 on CPU")
    parser.add_argument("--input-size", type=int, default=None, help="latent side (default: 32 on GPU, 8 on CPU)")
    parser.add_argument("--patch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=None, help="default: 1152 (XL) on GPU, 64 on CPU")
    parser.add_argument("--depth", type=int, default=None, help="default: 28 (XL) on GPU, 2 on CPU")
    parser.add_argument("--heads", type=int, default=None, help="default: 16 on GPU, 2 on CPU")
    parser.add_argument("--num-classes", type=int, default=1000)


def resolve_model_args(args) -> None:
    gpu = args.device.startswith("cuda")
    for name, full, tiny in (("batch", 32, 2), ("input_size", 32, 8), ("hidden", 1152, 64), ("depth", 28, 2), ("heads", 16, 2)):
        if getattr(args, name) is None:
            setattr(args, name, full if gpu else tiny)


def model_kwargs(args) -> dict:
    return dict(input_size=args.input_size, patch_size=args.patch, in_channels=args.channels, hidden_size=args.hidden,
                depth=args.depth, num_heads=args.heads, num_classes=args.num_classes)


def build_dit(args, routing, device: torch.device):
    """A DiT with random weights (timing does not depend on them), built directly on the device."""
    DiT = import_dit()
    with torch.device(device):
        model = DiT(routing=routing, **model_kwargs(args))
    return model.to(device)


def randomise_router(model, scale: float = 0.02) -> None:
    """Non-zero queries, so the DAR weights are not uniform (the kernels do not care, but be honest)."""
    with torch.no_grad():
        for name, p in model.router.named_parameters():
            if name.startswith("query"):
                p.normal_(0.0, scale)


def flow_matching_batch(size, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A seeded training batch at `size` (batch, channels, input_size, num_classes): x_t, t, y and the velocity target."""
    from dmd_dar.diffusion import interpolate

    gen = torch.Generator().manual_seed(seed)
    shape = (size.batch, size.channels, size.input_size, size.input_size)
    x0, noise = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    t = torch.rand(size.batch, generator=gen)
    y = torch.randint(0, size.num_classes, (size.batch,), generator=gen)
    return interpolate(x0, noise, t), t, y, noise - x0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of fn() in ms (device-synchronised around each call)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float | None:
    """Peak allocated CUDA memory since the last reset, MiB (None on the CPU: not measured)."""
    if device.type != "cuda":
        return None
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def allocated_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.memory_allocated(device) / 2**20


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def dit_forward_flops(args, routing_query: str | None = None) -> float:
    """Matmul FLOPs (2 per multiply-add) of one DiT forward for ONE sample.

    per block: tokens * (24 d^2 [qkv 3d^2 + proj d^2 + MLP 8d^2, x2 FLOPs] + 4 T d [QK^T and AV])
               + 12 d^2 [adaLN modulation 6d x d, once per sample]
    plus patch embedding and final linear (2 * T * d * p^2 * c each), final adaLN (4 d^2) and the timestep
    MLP (2 * (256 d + d^2)). A dynamic DAR query adds 2 d^2 per token per aggregator (2 * depth + 1);
    the routing itself (softmax mixing) is memory-bound and left out.
    """
    d, depth, p, c = args.hidden, args.depth, args.patch, args.channels
    T = (args.input_size // p) ** 2
    per_block = T * (24 * d * d + 4 * T * d) + 12 * d * d
    total = depth * per_block + 2 * (2 * T * d * p * p * c) + 4 * d * d + 2 * (256 * d + d * d)
    if routing_query == "dynamic":
        total += (2 * depth + 1) * T * 2 * d * d
    return float(total)


def header(title: str, args, device: torch.device, extra: str = "") -> None:
    print(f"== {title}")
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}  device: {device_name(device)}  "
          f"torch {torch.__version__}  python {platform.python_version()}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    print("command: " + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    if extra:
        print(extra)


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def write_json(path: Path | None, payload: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)
