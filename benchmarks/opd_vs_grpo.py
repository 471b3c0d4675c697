"""On-policy distillation against GRPO from the same start, with the same samples per step.

    python benchmarks/opd_vs_grpo.py [--teacher runs/tiny-cpu/checkpoint-final] [--steps 100] [--every 10]
                                     [--teacher-kl-coef 1.0]

The teacher is the demo's trained model (``make demo`` writes it; without --teacher this
script trains it first, the demo's own recipe into <out>/teacher). The student starts from the
demo's SFT warm-up (the same probe-stopped warm-up, run once here). From that checkpoint:
configs/tiny-cpu.yaml's GRPO (rewards, KL to the reference) and configs/tiny-opd.yaml's
on-policy distillation (the per-token reverse KL to the teacher, no rewards), each for --steps
steps of 16 prompts x 8 samples, and GRPO with the teacher's term added to its advantages
(``learner.loss.teacher_kl_coef``: --teacher-kl-coef; 0 leaves this run out), all evaluated
every --every steps on the same 100 held-out
problems (2 samples each at temperature 0.6: ``eval/heldout/pass@1``). The teacher is evaluated
the same way. Prints and writes benchmarks/results/<name>.{json,md,png} (default opd_vs_grpo):
pass@1 per step for both, the step at which each first reaches GRPO's final pass@1, seconds
per step.
"""
from __future__ import annotations

import argparse
import json
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


def first_at(points: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, v in points if v >= target), None)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default=None, help="the teacher checkpoint (default: train the demo into <out>/teacher)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--out", default="runs/bench-opd")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--name", default="opd_vs_grpo", help="stem of the result files in benchmarks/results/")
    ap.add_argument("--teacher-kl-coef", type=float, default=1.0,
                    help="GRPO + the teacher's per-token term at this weight (0: no such run)")
    args = ap.parse_args()
    out = Path(args.out)
    teacher = args.teacher
    if teacher is None:
        teacher = train(CONFIGS / "tiny-cpu.yaml", out / "teacher", args.overrides)["checkpoint"]
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
                                                         "ray.num_cpus=3"]))
    for name, recipe, sets in methods:
        s = train(CONFIGS / recipe, out / name, [*common, *sets])
        runs[name] = {"run_dir": s["run_dir"], "curve": curve(s["run_dir"]), "grpo_s": s["grpo"]["time_s"],
                      "samples": s["grpo"]["samples"], "eval_before": s["eval_before"], "eval_after": s["eval_after"]}
        print(f"{name}: pass@1 by step {runs[name]['curve']} ({s['grpo']['time_s']:.0f} s)", flush=True)
    teacher_pass = evaluate(teacher, out / "teacher-eval")
    start_pass = evaluate(start, out / "start-eval")
    target = runs["grpo"]["curve"][-1][1]  # what GRPO reaches at its last step
    rows = {name: {**r, "reaches_grpo_final_at": first_at(r["curve"], target),
                   "s_per_step": r["grpo_s"] / args.steps} for name, r in runs.items()}
    lines = [f"Held-out pass@1 (100 problems x 2 samples, temperature 0.6) from the same SFT start "
             f"({start_pass:.3f}); teacher {teacher_pass:.3f}; {args.steps} steps of 16 prompts x 8 samples.", "",
             "| method | pass@1 at " + " / ".join(str(s) for s, _ in rows["grpo"]["curve"]) +
             " | reaches GRPO's final " + f"{target:.3f} at step | s per step | greedy 200: before -> after |",
             "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {label(name, args.teacher_kl_coef)} | "
                     f"{' / '.join(f'{v:.2f}' for _, v in r['curve'])} | {r['reaches_grpo_final_at']} | "
                     f"{r['s_per_step']:.2f} | {r['eval_before']:.3f} -> {r['eval_after']:.3f} |")
    table = "\n".join(lines)
    print("\n" + table)
    results = save_results(args.name, {"teacher": teacher, "teacher_pass@1": teacher_pass, "start": start,
                                       "start_pass@1": start_pass, "target": target, "steps": args.steps,
                                       "overrides": args.overrides, "runs": rows}, table)
    plot(rows, start_pass, teacher_pass, results / f"{args.name}.png", args.teacher_kl_coef)
    return 0


def label(name: str, coef: float) -> str:
    return {"grpo": "GRPO", "opd": "on-policy distillation"}.get(name, f"GRPO + teacher term ({coef:g})")


def plot(rows: dict, start_pass: float, teacher_pass: float, path: Path, coef: float) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, style in zip(rows, ["o-", "s-", "^-"]):
        steps, values = zip(*[(0, start_pass), *rows[name]["curve"]])
        ax.plot(steps, values, style, label=label(name, coef), markersize=4)
    ax.axhline(teacher_pass, color="#888", linestyle="--", label=f"teacher ({teacher_pass:.2f})")
    ax.set_xlabel("step (16 prompts x 8 samples)")
    ax.set_ylabel("held-out pass@1")
    ax.set_title("tiny task, same SFT start, 2 CPU cores")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
