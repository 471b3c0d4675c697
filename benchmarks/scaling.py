"""Samples/s as the generator group grows from 1 to N, on a simulated multi-node cluster.

    python benchmarks/scaling.py [--max-generators 3] [--steps 30] [--set key=value ...]

A ``ray.cluster_utils.Cluster``: a head node for the learner ranks, the reference and the
scorer, and one node per generator (``--node-cpus`` CPUs each). For each group size the tiny
recipe's GRPO runs joined to that cluster, from the same untrained policy and seed, and the
benchmark reports samples/s, tokens/s, the speed-up against one generator and each group's
idle ratio; the bottleneck is the group that is idle least. Writes
benchmarks/results/<name>.{json,md,png} (--name, default scaling).

Simulated nodes share this machine's cores: once the cores are busy, more generators cannot
add throughput, and the table says which group holds the run back.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from _train import pyplot, train

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parent / "configs" / "tiny-cpu.yaml"


def bottleneck(idle: dict[str, float]) -> str:
    """The group idle least: the one the others wait for."""
    return min(idle, key=idle.get)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-generators", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--head-cpus", type=float, default=2.0, help="learner ranks, reference, scorer")
    ap.add_argument("--node-cpus", type=float, default=1.0, help="each generator node")
    ap.add_argument("--out", default="runs/bench-scaling")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--name", default="scaling", help="stem of the result files in benchmarks/results/")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a simulated cluster on this machine
    os.environ.pop("RAY_ADDRESS", None)
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.head_cpus})
    for _ in range(args.max_generators):
        cluster.add_node(num_cpus=args.node_cpus)
    ray.init(address=cluster.address, logging_level="ERROR")
    cluster.wait_for_nodes()
    ray.shutdown()
    rows = []
    try:
        for n in range(1, args.max_generators + 1):
            t0 = time.perf_counter()
            s = train(RECIPE, Path(args.out) / f"generators-{n}", [
                f"ray.address={json.dumps(cluster.address)}", "ray.ship_code=false", "sft.steps=0",
                "sft.stop_at_pass_rate=null", "eval.num_prompts=0", f"grpo.steps={args.steps}",
                f"generator.num_actors={n}", "checkpoint.every_steps=0", *args.overrides])
            g = s["grpo"]
            idle = {k: v["idle_ratio"] for k, v in g["utilisation"].items()}
            rows.append({"generators": n, "samples_per_s": g["samples_per_s"], "tokens_per_s": g["tokens_per_s"],
                         "grpo_s": g["time_s"], "samples": g["samples"], "idle": idle,
                         "bottleneck": bottleneck(idle), "wall_s": time.perf_counter() - t0, "run_dir": s["run_dir"]})
            print(f"{n} generator(s): {g['samples_per_s']:.1f} samples/s, idle {idle}, "
                  f"bottleneck: {rows[-1]['bottleneck']}", flush=True)
    finally:
        cluster.shutdown()
    base = rows[0]["samples_per_s"]
    groups = list(rows[0]["idle"])
    lines = ["| generators | samples/s | tokens/s | speed-up vs 1 | " + " | ".join(f"{g} idle" for g in groups)
             + " | bottleneck |", "|---" * (5 + len(groups)) + "|"]
    for r in rows:
        lines.append(f"| {r['generators']} | {r['samples_per_s']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{r['samples_per_s'] / base:.2f}x | " + " | ".join(f"{r['idle'][g]:.2f}" for g in groups)
                     + f" | {r['bottleneck']} |")
    table = "\n".join(lines)
    print(table)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    meta = {"machine_cpus": os.cpu_count(), "head_cpus": args.head_cpus, "node_cpus": args.node_cpus,
            "steps": args.steps, "overrides": args.overrides}
    (results / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (results / f"{args.name}.md").write_text(
        f"Simulated cluster on a {os.cpu_count()}-core machine: head {args.head_cpus:g} CPUs, one "
        f"{args.node_cpus:g}-CPU node per generator; {args.steps} GRPO steps of the tiny recipe per size.\n\n"
        + table + "\n")
    if (plt := pyplot()) is None:
        return 0
    fig, ax = plt.subplots(figsize=(6, 3.6))
    xs = [r["generators"] for r in rows]
    ax.plot(xs, [r["samples_per_s"] for r in rows], "o-", label="measured")
    ax.plot(xs, [base * x for x in xs], "--", color="grey", label="linear")
    for r in rows:
        ax.annotate(r["bottleneck"], (r["generators"], r["samples_per_s"]), textcoords="offset points",
                    xytext=(0, 8), ha="center", fontsize=8)
    ax.set_xlabel("generators")
    ax.set_ylabel("samples/s")
    ax.set_xticks(xs)
    ax.set_title(f"GRPO throughput by generator count ({os.cpu_count()} cores, simulated nodes)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(results / f"{args.name}.png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
