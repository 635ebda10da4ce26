#!/usr/bin/env bash
# DMD2's second stage on MNIST (issue 12 part 2): the GAN term on real MNIST, started from a converged first-stage
# student (the main job's seed-0 DAR student of the issue-13 experiment), 300 more student updates, 1 thread.
# Resumable: a finished trial (summary.json) is skipped. Results: docs/distillation.md, "DMD2's second stage".
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
STAGE1=${STAGE1:-runs/exp_mnist/runs/dar_dense_static_t_s0/dar/student}
CACHE=${CACHE:-runs/exp_mnist/teacher_samples}
trial() { name=$1; shift
  [ -f runs/s2_$name/summary.json ] && { echo "skip $name"; return; }
  /usr/bin/time -v .venv/bin/python scripts/distill.py --config configs/default.yaml out_dir=runs/s2_$name \
    student.init=$STAGE1 gan.enabled=true gan.weight=3e-3 steps=300 time_limit_min=0 eval.teacher_cache=$CACHE "$@" \
    > runs/s2_$name.log 2>&1
}
ONLY=${ONLY:-a b c d e f g h i j k l}
run() { case " $ONLY " in *" $1 "*) trial "$@";; esac; }
run a gan.discriminator_weight=1.0  # the discriminator loss added to the fake score's at weight 1 (our first reading of DMD2)
run b gan.discriminator_weight=0.1  # the small fake score protected from the discriminator's gradient
# DMD2's published ImageNet pair (cls_loss_weight 1e-2 for the discriminator, gen_cls_loss_weight 3e-3): 1.0 above
# was our misreading of it (DMD2's argparse default is 1; its ImageNet script sets 1e-2)
run c gan.discriminator_weight=0.01
# ... with DMD2's lower stage-2 learning rate (5e-7 against 2e-6 in its first stage: a quarter)
run d gan.discriminator_weight=0.01 student.optim.lr=2.5e-5
# the control of c and d: the same 300 more updates from the same student with a fresh fake score, DM loss only
run e gan.enabled=false
# DMD2's discriminator weight with a stronger generator term
run f gan.discriminator_weight=0.01 gan.weight=0.01
# a discriminator that sees where: one logit per token (patch) of the fake score, at DMD2's weights (g) and with a
# stronger generator term (h)
run g gan.head=tokens gan.discriminator_weight=0.01
run h gan.head=tokens gan.discriminator_weight=0.01 gan.weight=0.01
# 2026-12-03, second session: the real images scored under their own labels (every row above scored them under the
# generated batch's labels, a task the head cannot learn). i: DMD2's weights, as c; j: i with the discriminator
# near the data (gan.t_max=0.3, where the probe separates the sets, eval/experiments/gan_probe.py); k: j with the
# head at 10x the fake score's learning rate; l: k with a 10x stronger generator term
run i gan.discriminator_weight=0.01
run j gan.discriminator_weight=0.01 gan.t_max=0.3
run k gan.discriminator_weight=0.01 gan.t_max=0.3 gan.head_lr_scale=10
run l gan.discriminator_weight=0.01 gan.t_max=0.3 gan.head_lr_scale=10 gan.weight=0.03
