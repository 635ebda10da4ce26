"""Classifier FD / accuracy / precision / recall of a DiT teacher against the guidance scale (MNIST).

Samples `--n` class-balanced images per guidance scale on fixed noises (the same for every scale and teacher:
seed `--seed`), with the sampler of the teacher config's quality curve, and scores them with
`dmd_dar.metrics.quality.evaluate_quality` against the 10,000 held-out digits. One JSON line per scale.

    python eval/experiments/teacher_guidance.py TEACHER_DIR --cfg 1.0,1.5,2.0 --n 500 --steps 12
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from dmd_dar.checkpoint import BUNDLED_TEACHER
from dmd_dar.metrics.quality import evaluate_quality, load_reference
from dmd_dar.models import DiT
from dmd_dar.teacher.training import SampleConfig, sample_grid_labels, sample_teacher
from dmd_dar.training import step_generator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teacher")
    parser.add_argument("--cfg", default="1.0,1.5,2.0")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--sampler", default="heun")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = DiT.from_pretrained(BUNDLED_TEACHER if args.teacher == "bundled" else args.teacher).eval()
    shape = (model.in_channels, model.input_size, model.input_size)
    noise = torch.randn((args.n, *shape), generator=step_generator(args.seed, 0, stream=98))  # the quality curve's noises
    labels = sample_grid_labels(args.n, model.num_classes)
    reference = load_reference("mnist")
    for scale in (float(s) for s in args.cfg.split(",")):
        start = time.time()
        cfg = dataclasses.replace(SampleConfig(), sampler=args.sampler, steps=args.steps, cfg_scale=scale)
        images = torch.cat([sample_teacher(model, noise[i:i + 250], labels[i:i + 250], cfg) for i in range(0, args.n, 250)])
        q = evaluate_quality(images, labels, reference, seed=args.seed)
        keep = ("fd", "fd_floor", "fd_to_floor", "accuracy", "precision", "recall")
        print(json.dumps({"teacher": args.teacher, "cfg": scale, "n": args.n, "sampler": f"{args.sampler}{args.steps}",
                          **{k: round(float(q[k]), 4) for k in keep}, "seconds": round(time.time() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
