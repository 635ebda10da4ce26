#!/usr/bin/env bash
# configs/mnist_dmd2.yaml over 3 seeds, and the main job against the stage-3 teacher (issue 12, 2026-12-03, third
# session), two jobs of 1 thread at a time in two lanes. Each step is skipped when its result exists (resumable).
#   lane 1: the recipe at seeds 0 and 2
#   lane 2: Inception FID/KID and speckle of the main job's seed-0 run (runs/s3_main_s0), the recipe at seed 1,
#           then Inception and speckle of every recipe run that has finished
# Results: docs/distillation.md, "configs/mnist_dmd2.yaml".
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
CACHE=runs/teacher_samples_s3
recipe() { out=runs/dmd2_s$1
  [ -f $out/summary.json ] && { echo "skip $out"; return; }
  /usr/bin/time -v .venv/bin/python scripts/distill.py --config configs/mnist_dmd2.yaml out_dir=$out seed=$1 \
    eval.teacher_cache=$CACHE > $out.log 2>&1
}
measure() { run=$1  # Inception FID/KID (n = 500 against held-out digits) and speckle of a run's teacher and student sets
  [ -f $run/summary.json ] || return 0
  [ -f $run/inception.json ] || .venv/bin/python eval/quality.py teacher=$run/samples/teacher_12step.npz \
    student=$run/samples/student_dar_1step.npz --reference mnist --reference-split heldout --limit 1000 \
    --space inception --kid --out $run/inception.json > $run/inception.log 2>&1
  [ -f $run/speckle.json ] || .venv/bin/python eval/speckle.py teacher=$run/samples/teacher_12step.npz \
    student=$run/samples/student_dar_1step.npz --out $run/speckle.json > /dev/null
}
lane1() { recipe 0; recipe 2; }
lane2() { measure runs/s3_main_s0; recipe 1; for s in 0 1 2; do measure runs/dmd2_s$s; done; }
LANES=${LANES:-1 2}  # e.g. LANES=2 to run one lane
echo "start $(date -Is)"; for l in $LANES; do lane$l & done; wait; echo "done $(date -Is)"
