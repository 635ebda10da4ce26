#!/usr/bin/env python
"""Run a grid of distillation runs (seeds x arms x varied settings) and report means, t-intervals and the paired
differences of the arms (docs/distillation.md, "Experiments").

    python scripts/experiment.py --config configs/default.yaml --seeds 0,1,2 --arms residual,dar --out runs/exp
    python scripts/experiment.py --config configs/default.yaml --seeds 0,1,2 \\
        --arms residual,dar_dense_static_t,dar_c4_sum,dar_dense_dynamic --out runs/exp_mnist --processes 2
    python scripts/experiment.py ... --vary dm.guidance_scale=1.5,2.0 --vary student.optim.lr=1e-4,5e-5 steps=600

Finished runs are skipped and interrupted ones resume, so the same command continues an experiment. Writes
DIR/experiment.json, DIR/results.md, DIR/results.html; DIR/runs/<run>/ (each run's own outputs, run.json);
DIR/logs/<run>.log (each run's trainer output).
"""
from dmd_dar.dmd.experiment import ARMS, finished_record, parse_list, parse_vary, plan_experiment, run_experiment
from dmd_dar.errors import ArgumentParser, UserError, cli_main


@cli_main
def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="the distillation config every run starts from (configs/*.yaml)")
    parser.add_argument("--seeds", required=True, help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--arms", required=True, help=f"comma-separated arms: {', '.join(ARMS)}")
    parser.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2",
                        help="a config key and its values (repeatable: every combination runs)")
    parser.add_argument("--out", required=True, help="the experiment folder")
    parser.add_argument("--processes", type=int, default=1, help="runs at a time, each in its own process (default 1)")
    parser.add_argument("--baseline", default="residual", help="the arm the others are compared with (paired); default residual")
    parser.add_argument("--confidence", type=float, default=0.95, help="of the t-intervals (default 0.95)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and whether each is finished; run nothing")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of every run's config, e.g. steps=600")
    args = parser.parse_args()
    try:
        seeds = [int(s) for s in parse_list(args.seeds, "--seeds")]
    except ValueError:
        raise UserError(f"--seeds {args.seeds!r}: expected comma-separated integers such as 0,1,2") from None
    plan = plan_experiment(args.config, seeds, parse_list(args.arms, "--arms"), args.out, vary=parse_vary(args.vary),
                           overrides=args.overrides, baseline=args.baseline, confidence=args.confidence)
    if args.dry_run:
        for spec in plan.runs:
            state = "finished" if finished_record(plan, spec) is not None else "to run"
            print(f"{spec.name}: {state}  ({' '.join(spec.overrides)})")
        return
    run_experiment(plan, processes=args.processes)
    print(f"done: {plan.out / 'results.html'} ({len(plan.runs)} runs)")


if __name__ == "__main__":
    main()
