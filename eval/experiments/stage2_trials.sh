#!/usr/bin/env bash
# DMD2's second stage on MNIST (issue 12 part 2): the GAN term on real MNIST, started from a converged first-stage
# student (the main job's seed-0 DAR student of the issue-13 experiment), 300 more student updates, 1 thread.
# Resumable: a finished trial (summary.json) is skipped. Results: docs/distillation.md, "DMD2's second stage".
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
STAGE1=${STAGE1:-runs/exp_mnist/runs/dar_dense_static_t_s0/dar/student}
trial() { name=$1; shift
  [ -f runs/s2_$name/summary.json ] && { echo "skip $name"; return; }
  /usr/bin/time -v .venv/bin/python scripts/distill.py --config configs/default.yaml out_dir=runs/s2_$name \
    student.init=$STAGE1 gan.enabled=true gan.weight=3e-3 steps=300 eval.teacher_cache=runs/exp_mnist/teacher_samples "$@" \
    > runs/s2_$name.log 2>&1
}
trial a gan.discriminator_weight=1.0  # DMD2 as published: the discriminator loss added to the fake score's at weight 1
trial b gan.discriminator_weight=0.1  # the small fake score protected from the discriminator's gradient
