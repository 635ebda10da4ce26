#!/usr/bin/env python
"""Sample a teacher or a distilled student into a PNG grid and an .npz (arr_0: uint8 NHWC).

DiT folders (teacher or student; "bundled" = the bundled teacher):
    python scripts/sample.py runs/teacher_mnist/teacher --labels all --sampler heun --steps 25 --cfg-scale 2 --out samples/teacher
    python scripts/sample.py runs/default/dar/student --student-steps 1 --labels 0,1,2 --n 30 --out samples/student
    python scripts/sample.py runs/default/dar/student --timesteps 1.0,0.5 --out samples/student_2step
Exported diffusers students (folders written by save_dar_pretrained, e.g. runs/dmd_sd3/dar/student):
    python scripts/sample.py runs/dmd_sd3/dar/student --student-steps 4 --prompts prompts.txt \
        --embeddings runs/prompt_cache/sd3.safetensors --vae /path/to/sd3-pipeline --out samples/sd3
  Prompt embeddings come from --embeddings (a cache from dmd_dar.t2i, e.g. the one the distillation wrote);
  prompts not in it are encoded with --text-encoder PIPELINE_FOLDER, whose text encoders must be on local disk
  offline. Without --vae the grid shows the latent preview (first 3 latent channels / 3).
Without --student-steps / --timesteps the model is sampled with a multi-step sampler (--sampler, --steps, --cfg-scale).
Image i uses seed + i (independent of --n and --batch-size; the sde sampler's noise is per batch).
Latent DiTs (imported SiT / REPA and their students) are decoded with the VAE their folder records (or --vae).

The ImageNet evaluation protocol (50 per class: 50,000 images into one ADM-format .npz, arr_0 + arr_1 labels):
    accelerate launch --num_processes 8 scripts/sample.py runs/dmd_sit_xl2_in256/dar/student --student-steps 1 \
        --labels all --per-class 50 --shard-size 1000 --out runs/eval/student_1step
  Images are made in shards (DIR/shards/, one file per --shard-size images; several processes share them) and
  merged into DIR/samples.npz at the end; the same command resumes an interrupted run. torchrun works as well.
"""
import os

from dmd_dar.errors import ArgumentParser, UserError, cli_main

# The library names the parameter it could not use (SamplingArgumentError.argument); these are its flags here.
FLAGS = {"prompts": "--prompt / --prompts"}


def flag(argument: str) -> str:
    return FLAGS.get(argument, "--" + argument.replace("_", "-"))


def parse_args():
    p = ArgumentParser(description=__doc__)
    p.add_argument("model", help="model folder (DiT, exported diffusers student, stock diffusers model) or 'bundled'")
    p.add_argument("--out", required=True, help="output folder: grid.png, samples.npz, sample.json (written atomically)")
    p.add_argument("--n", type=int, default=None, help="number of images (default: one per label / prompt)")
    p.add_argument("--per-class", type=int, default=None, help="DiT: this many images per label (n = per-class x labels)")
    p.add_argument("--shard-size", type=int, default=None,
                   help="make the images in shards of this many and merge them (resumable; default 1000 with several processes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", default="heun", choices=["euler", "heun", "sde"], help="multi-step sampler")
    p.add_argument("--steps", type=int, default=25, help="multi-step sampler steps")
    p.add_argument("--shift", type=float, default=1.0, help="SD3-style time shift of the multi-step schedule")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance (1 = none)")
    few_step = p.add_mutually_exclusive_group()
    few_step.add_argument("--student-steps", type=int, default=None, help="few-step student: K uniform steps from t=1")
    few_step.add_argument("--timesteps", default=None, help="few-step student: explicit times, e.g. 1.0,0.5")
    p.add_argument("--labels", default=None, help="DiT class labels: 0,1,2 or all (default: all)")
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", action="append", default=None, help="text prompt (repeatable)")
    prompts.add_argument("--prompts", default=None, help="prompts file, one per line")
    p.add_argument("--embeddings", default=None, help="prompt-embedding cache (.safetensors, dmd_dar.t2i)")
    p.add_argument("--text-encoder", default=None, help="pipeline folder (or hub id) with the text encoders")
    p.add_argument("--max-sequence-length", type=int, default=None)
    p.add_argument("--vae", default=None, help="VAE: pipeline folder / vae folder / hub id ('tiny': random, tests)")
    p.add_argument("--resolution", type=int, default=1024, help="text-to-image: pixels (latents = resolution / VAE factor)")
    p.add_argument("--vae-scale-factor", type=int, default=8, help="pixels per latent when no --vae is given")
    p.add_argument("--guidance", type=float, default=3.5, help="Flux-dev guidance embedding")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default: min(n, 8))")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="diffusers weights")
    return p.parse_args()


def distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) as accelerate launch / torchrun set them; (0, 1, 0) for a plain run."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def sample(args) -> None:
    import torch

    from dmd_dar.sampling import (
        Samples,
        check_output_folder,
        load_sampler_model,
        parse_labels,
        parse_timesteps,
        plan_sampling,
        sample_sharded,
        write_samples,
    )
    from dmd_dar.t2i import read_prompts

    rank, world, local_rank = distributed()
    sharded = args.shard_size is not None or world > 1
    try:
        check_output_folder(args.out, sharded)  # before any work
    except UserError as err:
        raise UserError(f"--out: {err}") from None
    if args.per_class is not None and (args.per_class < 1 or args.n is not None):
        raise UserError(f"--per-class {args.per_class}: must be >= 1, and not given with --n")
    timesteps = parse_timesteps(args.timesteps, args.student_steps)
    prompts = args.prompt or (read_prompts(args.prompts) if args.prompts else None)
    device = args.device or (f"cuda:{local_rank}" if world > 1 and torch.cuda.is_available() else None)
    loaded = load_sampler_model(args.model, device, args.dtype)
    n = args.n
    if args.per_class is not None:
        if loaded.backbone != "dit":
            raise UserError("--per-class is for class-conditional DiT models; use --n for text-to-image models")
        n = args.per_class * len(parse_labels(args.labels, loaded.model.num_classes))
    plan = plan_sampling(
        loaded, n=n, labels=args.labels, prompts=prompts, embeddings=args.embeddings, text_encoder=args.text_encoder,
        vae=args.vae, resolution=args.resolution, vae_scale_factor=args.vae_scale_factor, seed=args.seed,
        sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale, timesteps=timesteps, shift=args.shift,
        guidance=args.guidance, batch_size=args.batch_size, max_sequence_length=args.max_sequence_length)
    if not sharded:
        samples = Samples(plan.run(), plan.meta)
        out = write_samples(samples, args.out, args.nrow)
        print(f"wrote {len(samples.images)} images to {out}/ (grid.png, samples.npz)")
        return
    barrier = None
    if world > 1:
        import datetime

        import torch.distributed as dist

        if not dist.is_initialized():  # gloo: a barrier only, whatever the devices (no tensors are exchanged)
            dist.init_process_group("gloo", timeout=datetime.timedelta(hours=24))
        barrier = dist.barrier
    out = sample_sharded(plan, args.out, args.shard_size or 1000, rank, world, barrier)
    if out is not None:
        print(f"wrote {len(plan.ids)} images to {out}/ (samples.npz: arr_0 images, arr_1 labels; grid.png, sample.json)")
    if world > 1:
        torch.distributed.destroy_process_group()


@cli_main
def main() -> None:
    args = parse_args()
    from dmd_dar.sampling import SamplingArgumentError

    try:
        sample(args)
    except SamplingArgumentError as err:  # the library's parameter -> our flag
        where = f"{flag(err.argument)}:" if err.value is None else f"{flag(err.argument)} {err.value}"
        raise UserError(f"{where} {err.problem}") from None


if __name__ == "__main__":
    main()
