#!/usr/bin/env bash
# Sequential, resumable sweep of the default job (issue 12 part 2); each run: runs/sweep/<name>/
cd "$(dirname "$0")/../.."
run() { name=$1; shift
  if [ -f runs/sweep/$name/summary.json ]; then echo "skip $name"; return; fi
  echo "== $name $* $(date +%T)"
  /usr/bin/time -f "$name wall %e s" .venv/bin/python scripts/distill.py --config configs/default.yaml out_dir=runs/sweep/$name time_limit_min=0 "$@" 2>&1 | tr '\r' '\n' | grep -E "quality\[|wall|error|monitor" 
}
run gan_w0.01 gan.enabled=true gan.weight=0.01
run cfg1.5 dm.guidance_scale=1.5
run gan_w0.05 gan.enabled=true gan.weight=0.05
run fake5 fake.updates_per_student_step=5
run lr5e-5 student.optim.lr=5e-5 fake.optim.lr=5e-5
run residual student.routing.mode=residual
run router_lr0.1 student.router_lr_scale=0.1
run gan_w0.001 gan.enabled=true gan.weight=0.001
