"""Does the tiny CPU recipe learn reliably? Run it for several seeds and tabulate held-out pass@1.

    python benchmarks/tiny_seeds.py --seeds 0 1 2 [--set grpo.steps=100 ...]

Each seed is a full `r1ray train configs/tiny-cpu.yaml` run in its own process (SFT warm-up,
eval, GRPO, eval). Prints a Markdown table and writes benchmarks/results/<--name>.json (default tiny_seeds).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _train import train

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recipe", default=str(HERE.parent / "configs" / "tiny-cpu.yaml"))
    ap.add_argument("--out", default="runs/bench-seeds")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--name", default="tiny_seeds", help="stem of the result file in benchmarks/results/")
    args = ap.parse_args()
    rows = []
    for seed in args.seeds:
        out = Path(args.out) / f"seed-{seed}"
        t0 = time.perf_counter()
        s = train(args.recipe, out, [f"seed={seed}", *args.overrides])
        run_dir = s["run_dir"]
        records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        acc = [r["reward/accuracy/mean"] for r in records]
        rows.append({"seed": seed, "sft_steps": s.get("sft", {}).get("steps", 0), "eval_before": s["eval_before"],
                     "eval_after": s["eval_after"], "sampled_acc_first10": sum(acc[:10]) / len(acc[:10]),
                     "sampled_acc_last10": sum(acc[-10:]) / len(acc[-10:]), "grpo_s": s["grpo"]["time_s"],
                     "wall_s": s["wall_s"], "run_dir": run_dir, "process_s": time.perf_counter() - t0})
        print(f"seed {seed}: pass@1 {s['eval_before']:.3f} -> {s['eval_after']:.3f} in {s['wall_s']:.0f} s", flush=True)
    print("\n| seed | SFT steps | held-out pass@1 after SFT | after GRPO | training-batch accuracy, "
          "first 10 -> last 10 GRPO steps | GRPO s | wall s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['sft_steps']} | {r['eval_before']:.3f} | {r['eval_after']:.3f} | "
              f"{r['sampled_acc_first10']:.2f} -> {r['sampled_acc_last10']:.2f} | {r['grpo_s']:.0f} | {r['wall_s']:.0f} |")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"{args.name}.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
