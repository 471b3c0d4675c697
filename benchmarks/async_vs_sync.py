"""Synchronous (max_staleness = 0) against streaming GRPO (max_staleness = 1, 2, 4), in one invocation.

    python benchmarks/async_vs_sync.py [--etas 0 1 2 4] [--steps 100] [--set key=value ...]

One SFT warm-up first (shared by every run, so all start from the same checkpoint); then the
tiny recipe's GRPO for each eta with the same seed and the same number of samples. Prints
samples/s, tokens/s, the speed-up against eta = 0 measured here, idle ratios, staleness and
held-out pass@1; writes benchmarks/results/<name>.{json,md,png} (--name, default async_vs_sync).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _train import pyplot, save_results, train

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parent / "configs" / "tiny-cpu.yaml"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--etas", type=int, nargs="+", default=[0, 1, 2, 4])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--out", default="runs/bench-async")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--name", default="async_vs_sync", help="stem of the result files in benchmarks/results/")
    args = ap.parse_args()
    out = Path(args.out)
    sft = train(RECIPE, out / "sft", ["grpo.steps=0", "eval.num_prompts=0", *args.overrides])
    ckpt = sft["checkpoint"]
    print(f"SFT checkpoint: {ckpt}", flush=True)
    rows = []
    for eta in args.etas:
        s = train(RECIPE, out / f"eta-{eta}", [f"model.path={ckpt}", "sft.steps=0", f"grpo.steps={args.steps}",
                                       f"grpo.max_staleness={eta}", *args.overrides])
        g = s["grpo"]
        hist = {int(k): v for k, v in g["staleness_histogram"].items()}
        rows.append({"eta": eta, "samples_per_s": g["samples_per_s"], "tokens_per_s": g["tokens_per_s"],
                     "grpo_s": g["time_s"], "samples": g["samples"],
                     "idle": {k: v["idle_ratio"] for k, v in g["utilisation"].items()},
                     "staleness_mean": sum(k * v for k, v in hist.items()) / max(1, sum(hist.values())),
                     "staleness_histogram": hist, "eval_before": s["eval_before"], "eval_after": s["eval_after"],
                     "run_dir": s["run_dir"]})
        print(f"eta={eta}: {g['samples_per_s']:.1f} samples/s, pass@1 {s['eval_before']:.3f} -> {s['eval_after']:.3f}",
              flush=True)
    base = rows[0]["samples_per_s"] if rows[0]["eta"] == 0 else None
    lines = ["| max_staleness | samples/s | tokens/s | speed-up vs 0 | generator idle | learner idle | "
             "mean staleness | held-out pass@1 |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = f"{r['samples_per_s'] / base:.2f}x" if base else "-"
        lines.append(f"| {r['eta']} | {r['samples_per_s']:.1f} | {r['tokens_per_s']:.0f} | {speed} | "
                     f"{r['idle']['generator']:.2f} | {r['idle']['learner']:.2f} | {r['staleness_mean']:.2f} | "
                     f"{r['eval_before']:.3f} -> {r['eval_after']:.3f} |")
    table = "\n".join(lines)
    print("\n" + table)
    results = save_results(args.name, {"overrides": args.overrides, "rows": rows}, table)
    plot(rows, results / f"{args.name}.png")
    return 0


def plot(rows: list[dict], path: Path) -> None:
    if (plt := pyplot()) is None:
        return
    labels = [f"η={r['eta']}" for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    bars = a.bar(labels, [r["samples_per_s"] for r in rows], color=["#888"] + ["#2a7"] * (len(rows) - 1))
    a.bar_label(bars, fmt="%.1f")
    a.set_ylabel("samples / s")
    a.set_title("GRPO throughput, tiny recipe, 2 CPU cores")
    x = range(len(rows))
    b.plot(x, [r["idle"]["generator"] for r in rows], "o-", label="generator idle")
    b.plot(x, [r["idle"]["learner"] for r in rows], "s-", label="learner idle")
    b.plot(x, [r["eval_after"] for r in rows], "^--", label="held-out pass@1 after")
    b.set_xticks(list(x), labels)
    b.set_ylim(0, 1.05)
    b.legend(fontsize=8)
    b.set_title("idle ratio and final accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
