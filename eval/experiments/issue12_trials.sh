#!/usr/bin/env bash
# Issue 12 trials of 2026-12-03 on the main job's recipe (configs/default.yaml, seed 0, no time limit), two jobs
# of 1 thread at a time, in two lanes. Each step is skipped when its result exists, so the script resumes.
#   lane 1: the seed-0 main job (the stage-1 student and the control of every row); stage 2 with the token-level
#           discriminator at DMD2's weights (stage2_trials.sh row g); the stage-2 DM-only control (row e); a 2-step student
#   lane 2: DMD v1 regression pairs, then regression (pixel MSE) from the start; stage 2 row h (g with a stronger
#           generator term, once the stage-1 student exists); a 4-step student
# Results: docs/distillation.md, "Trials of 2026-12-03".
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
CACHE=runs/teacher_samples_default
distill() { out=$1; shift
  [ -f $out/summary.json ] && { echo "skip $out"; return; }
  /usr/bin/time -v .venv/bin/python scripts/distill.py --config configs/default.yaml out_dir=$out time_limit_min=0 \
    eval.teacher_cache=$CACHE "$@" > $out.log 2>&1
}
pairs() {
  [ -f runs/reg/pairs_2048.npz ] && return
  mkdir -p runs/reg
  .venv/bin/python scripts/make_regression_pairs.py --config configs/default.yaml --n 2048 --seed 1 \
    --out runs/reg/pairs_2048.npz > runs/reg/pairs.log 2>&1
}
S2="env STAGE1=runs/stage1_s0/dar/student CACHE=$CACHE bash eval/experiments/stage2_trials.sh"
wait_for() { until [ -f $1 ]; do sleep 30; done; }
mkdir -p runs
lane1() {
  distill runs/stage1_s0
  ONLY=g $S2; ONLY=e $S2
  distill runs/kstep2_s0 "student.timesteps=[1.0,0.5]"
}
lane2() {
  pairs
  distill runs/reg_mse_w025 regression.enabled=true regression.pairs=runs/reg/pairs_2048.npz regression.distance=mse \
    regression.weight=0.25
  wait_for runs/stage1_s0/summary.json; ONLY=h $S2
  distill runs/kstep4_s0 "student.timesteps=[1.0,0.75,0.5,0.25]"
}
LANES=${LANES:-1 2}  # e.g. LANES=2 to run one lane
echo "start $(date -Is)"; for l in $LANES; do lane$l & done; wait; echo "done $(date -Is)"
