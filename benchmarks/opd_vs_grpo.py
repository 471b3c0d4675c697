"""On-policy distillation against GRPO from the same start, with the same samples per step.

    python benchmarks/opd_vs_grpo.py [--teacher CHECKPOINT] [--steps 100] [--every 10]
                                     [--teacher-kl-coef 1.0] [--seeds 0 1 2]

The teacher is the student's recipe trained further: without --teacher this script trains it
first, the demo's SFT warm-up run to 800 steps without its probe stop, into <out>/teacher (its
held-out pass@1 is 1.0; the demo's GRPO model, 0.725, left distillation no headroom). The
student starts from the demo's SFT warm-up (the same probe-stopped warm-up, run once here,
180-190 steps). From that checkpoint:
configs/tiny-cpu.yaml's GRPO (rewards, KL to the reference) and configs/tiny-opd.yaml's
on-policy distillation (the per-token reverse KL to the teacher cut to [-1, 1], no rewards),
each for --steps steps of 128 samples (16 prompts x 8 for GRPO, 64 x 2 for distillation), and
GRPO with the teacher's term, cut the same way, added to its advantages
(``learner.loss.teacher_kl_coef``: --teacher-kl-coef; 0 leaves this run out), all evaluated
every --every steps on the same 100 held-out
problems (2 samples each at temperature 0.6: ``eval/heldout/pass@1``). The teacher is evaluated
the same way. Prints and writes benchmarks/results/<name>.{json,md,png} (default opd_vs_grpo):
pass@1 per step for each (the mean over --seeds: each seed's runs sample and order the data
their own way from the same start), the step at which each first reaches GRPO's final pass@1,
each seed's pass@1 at half and all the steps, seconds per step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from _train import save_results, train

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent / "configs"
KEY = "eval/heldout/pass@1"


def eval_sets(every: int) -> list[str]:
    return [f"eval.every_steps={every}", "eval.tasks=[{task: heldout, num_samples: 2, max_problems: 100}]"]


def evaluate(checkpoint: str, out: Path) -> float:
    """``r1ray eval`` of a checkpoint on the same task as the runs' step evaluations."""
    cmd = [sys.executable, "-m", "r1ray.controllers.cli", "eval", str(CONFIGS / "tiny-cpu.yaml"), "--checkpoint",
           checkpoint, "--output-dir", str(out), "--set", "ray.dashboard=false",
           "--set", "eval.tasks=[{task: heldout, num_samples: 2, max_problems: 100}]"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        print(f"eval failed: {' '.join(cmd)}\n{proc.stderr[-4000:]}", file=sys.stderr)
        sys.exit(proc.returncode)
    return json.loads((out / "results.json").read_text())["tasks"]["heldout"]["pass@1"]


def curve(run_dir: str) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[KEY]) for r in records if KEY in r]


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """The seeds' curves averaged step by step (every run evaluates at the same steps)."""
    steps = [step for step, _ in curves[0]]
    if any([step for step, _ in c] != steps for c in curves):
        raise SystemExit(f"the runs evaluated at different steps: {[[s for s, _ in c] for c in curves]}")
    return [(step, statistics.fmean(c[i][1] for c in curves)) for i, step in enumerate(steps)]


def at(points: list[tuple[int, float]], step: int) -> float:
    return next((v for s, v in points if s == step), float("nan"))


def first_at(points: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, v in points if v >= target), None)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default=None,
                    help="the teacher checkpoint (default: train the SFT warm-up to 800 steps into <out>/teacher)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--out", default="runs/bench-opd")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--name", default="opd_vs_grpo", help="stem of the result files in benchmarks/results/")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="run every method once per seed from the same start; the table and plot give their mean")
    ap.add_argument("--teacher-kl-coef", type=float, default=1.0,
                    help="GRPO + the teacher's per-token term at this weight (0: no such run)")
    args = ap.parse_args()
    out = Path(args.out)
    teacher = args.teacher
    if teacher is None:
        further = ["grpo.steps=0", "eval.num_prompts=0", "sft.steps=800", "sft.stop_at_pass_rate=null"]
        teacher = train(CONFIGS / "tiny-cpu.yaml", out / "teacher", [*further, *args.overrides])["checkpoint"]
    print(f"teacher: {teacher}", flush=True)
    sft = train(CONFIGS / "tiny-cpu.yaml", out / "sft", ["grpo.steps=0", "eval.num_prompts=0", *args.overrides])
    start = sft["checkpoint"]
    print(f"student start (SFT warm-up, {sft['sft']['steps']} steps): {start}", flush=True)
    common = [f"model.path={start}", "sft.steps=0", f"grpo.steps={args.steps}", *eval_sets(args.every), *args.overrides]
    runs = {}
    methods = [("grpo", "tiny-cpu.yaml", []), ("opd", "tiny-opd.yaml", [f"teacher.model={teacher}"])]
    if args.teacher_kl_coef:  # the demo's recipe uses both cores: a third, shared, for the teacher actor
        methods.append(("grpo+teacher", "tiny-cpu.yaml", [f"teacher.model={teacher}", "teacher.cpus=0.25",
                                                         f"learner.loss.teacher_kl_coef={args.teacher_kl_coef}",
                                                         "grpo.distill_kl_clip=1.0", "ray.num_cpus=3"]))
    for name, recipe, sets in methods:
        by_seed = {}
        for seed in args.seeds:
            run_out = out / (name if args.seeds == [0] else f"{name}-seed{seed}")
            s = train(CONFIGS / recipe, run_out, [*common, *sets, f"seed={seed}"])
            by_seed[seed] = {"run_dir": s["run_dir"], "curve": curve(s["run_dir"]), "grpo_s": s["grpo"]["time_s"],
                             "samples": s["grpo"]["samples"], "eval_before": s["eval_before"],
                             "eval_after": s["eval_after"]}
            print(f"{name} seed {seed}: pass@1 by step {by_seed[seed]['curve']} ({s['grpo']['time_s']:.0f} s)",
                  flush=True)
        runs[name] = {"seeds": by_seed, "curve": mean_curve([r["curve"] for r in by_seed.values()]),
                      **{k: statistics.fmean(r[k] for r in by_seed.values())
                         for k in ("grpo_s", "eval_before", "eval_after")}}
    teacher_pass = evaluate(teacher, out / "teacher-eval")
    start_pass = evaluate(start, out / "start-eval")
    target = runs["grpo"]["curve"][-1][1]  # what GRPO reaches at its last step (the seeds' mean)
    half = args.steps // 2
    rows = {name: {**r, "reaches_grpo_final_at": first_at(r["curve"], target),
                   "s_per_step": r["grpo_s"] / args.steps} for name, r in runs.items()}
    seeds = ", ".join(map(str, args.seeds))
    lines = [f"Held-out pass@1 (100 problems x 2 samples, temperature 0.6) from the same SFT start "
             f"({start_pass:.3f}); teacher {teacher_pass:.3f}; {args.steps} steps of 128 samples; "
             f"{'the mean of seeds' if len(args.seeds) > 1 else 'seed'} {seeds}.", "",
             "| method | pass@1 at " + " / ".join(str(s) for s, _ in rows["grpo"]["curve"]) +
             " | reaches GRPO's final " + f"{target:.3f} at step | pass@1 at step {half} / {args.steps} by seed "
             "| s per step | greedy 200: before -> after |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        by_seed = "; ".join(f"{at(x['curve'], half):.2f} / {at(x['curve'], args.steps):.2f}"
                            for x in r["seeds"].values())
        lines.append(f"| {label(name, args.teacher_kl_coef)} | "
                     f"{' / '.join(f'{v:.2f}' for _, v in r['curve'])} | {r['reaches_grpo_final_at']} | {by_seed} | "
                     f"{r['s_per_step']:.2f} | {r['eval_before']:.3f} -> {r['eval_after']:.3f} |")
    table = "\n".join(lines)
    print("\n" + table)
    results = save_results(args.name, {"teacher": teacher, "teacher_pass@1": teacher_pass, "start": start,
                                       "start_pass@1": start_pass, "target": target, "steps": args.steps,
                                       "seeds": args.seeds, "overrides": args.overrides, "runs": rows}, table)
    plot(rows, start_pass, teacher_pass, results / f"{args.name}.png", args.teacher_kl_coef, len(args.seeds))
    return 0


def label(name: str, coef: float) -> str:
    return {"grpo": "GRPO", "opd": "on-policy distillation"}.get(name, f"GRPO + teacher term ({coef:g})")


def plot(rows: dict, start_pass: float, teacher_pass: float, path: Path, coef: float, seeds: int = 1) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, style in zip(rows, ["o-", "s-", "^-"]):
        steps, values = zip(*[(0, start_pass), *rows[name]["curve"]])
        ax.plot(steps, values, style, label=label(name, coef), markersize=4)
    ax.axhline(teacher_pass, color="#888", linestyle="--", label=f"teacher ({teacher_pass:.2f})")
    ax.set_xlabel("step (128 samples)")
    ax.set_ylabel("held-out pass@1")
    ax.set_title("tiny task, same SFT start, 2 CPU cores" + (f", mean of {seeds} seeds" if seeds > 1 else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
