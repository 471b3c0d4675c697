"""What a run costs before and after its steps: the fixed cost every `r1ray train` pays.

    python benchmarks/startup.py [--runs 3] [--set generator.backend=vllm] [--name startup]

Runs the tiny recipe for one GRPO step (no SFT, no evaluation, no checkpoint but the final one)
``--runs`` times as a user runs the CLI, and splits each run's wall clock by the lines it logs,
stamped as they arrive: the driver's imports (up to "tiny world ready"), its tokenizer and data
and Ray's start (up to "run directory"), the actors' start (summary.json's ``startup_s``), the
step (``grpo.time_s``) and the end (the final checkpoint, curves.png, the actors and Ray
stopped, the process's exit). Beside it, the CPU seconds of every process the run started,
by kind (sampled from /proc every 0.2 s: a process's last 0.2 s can be missed), which on a
machine of few cores is what the actors' start waits for. This is the cost that most of the
e2e tests pay once or more (docs/testing.md, "Where the time goes"). Reports the run of median
wall clock (its phases add up), every run's wall clock beside it; writes
benchmarks/results/<name>.{json,md}.
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

from _train import save_results

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parent / "configs" / "tiny-cpu.yaml"
ONE_STEP = ["sft.steps=0", "grpo.steps=1", "eval.num_prompts=0", "eval.tasks=[]", "checkpoint.every_steps=0",
            "ray.dashboard=false"]
MARKS = {"world": "tiny world ready", "run_dir": "r1ray: run directory:"}
KINDS = [("ray::LearnerRank", "learner ranks"), ("ray::Generator", "generators"), ("VLLM::", "vLLM engine"),
         ("ray::Reference", "reference"), ("ray::RewardScorer", "scorers"), ("ray::", "other Ray workers"),
         ("", "Ray's own processes and the rest")]
TICK = os.sysconf("SC_CLK_TCK")


def _cpu_by_process(since_ticks: float) -> dict[tuple[int, int], tuple[str, float]]:
    """(pid, start) -> (command line, CPU seconds) of the processes started after ``since_ticks``."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        start = int(fields[19])
        if start >= since_ticks:
            out[(int(pid), start)] = (cmdline, (int(fields[11]) + int(fields[12])) / TICK)
    return out


def _kind(cmdline: str, driver: bool) -> str:
    if driver:
        return "driver"
    return next(name for prefix, name in KINDS if cmdline.startswith(prefix))


def one_run(out: Path, sets: list[str]) -> dict:
    since = float(Path("/proc/uptime").read_text().split()[0]) * TICK
    cmd = [sys.executable, "-m", "r1ray.controllers.cli", "train", str(RECIPE), "--output-dir", str(out)]
    for s in ONE_STEP + sets:
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    seen: dict = {}
    done = threading.Event()

    def sample():
        while not done.is_set():
            for key, (cmdline, cpu) in _cpu_by_process(since).items():
                # an exited process keeps its stat but loses its command line: keep the last name
                seen[key] = (cmdline.strip() or seen.get(key, ("", 0))[0], cpu)
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    marks, tail = {}, []
    for line in proc.stderr:
        tail = (tail + [line])[-40:]
        for mark, text in MARKS.items():
            if text in line and mark not in marks:
                marks[mark] = time.perf_counter() - t0
    proc.wait()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    if proc.returncode != 0 or len(marks) < len(MARKS):
        sys.exit(f"{' '.join(cmd)}\nexited {proc.returncode}:\n{''.join(tail)}")
    summary = json.loads((out / "summary.json").read_text())
    actors = max(summary["startup_s"].values())
    step = summary["grpo"]["time_s"]
    cpu: dict[str, float] = {}
    rest = []  # what "the rest" was: a one-off cost (a first run compiling something) shows here
    for (pid, _), (cmdline, seconds) in seen.items():
        kind = _kind(cmdline, pid == proc.pid)
        cpu[kind] = cpu.get(kind, 0.0) + seconds
        if kind == KINDS[-1][1]:
            rest.append((round(seconds, 2), cmdline[:160]))
    return {"wall_s": wall,
            "phases_s": {"driver imports": marks["world"], "data and Ray's start": marks["run_dir"] - marks["world"],
                         "actors' start": actors, "the step": step,
                         "the end": wall - marks["run_dir"] - actors - step},
            "cpu_s": cpu, "the_rest_top": sorted(rest, reverse=True)[:8]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], help="a recipe override, as for `r1ray train`")
    ap.add_argument("--name", default="startup")
    args = ap.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="r1ray-startup-") as tmp:
        for i in range(args.runs):
            runs.append(one_run(Path(tmp) / f"run{i}", args.set))
            print(f"run {i + 1}/{args.runs}: {runs[-1]['wall_s']:.1f} s", file=sys.stderr)

    mid = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]  # the median run, whose phases add up
    wall, phases = mid["wall_s"], mid["phases_s"]
    cpu = dict(sorted(mid["cpu_s"].items(), key=lambda kv: -kv[1]))
    walls = ", ".join(f"{r['wall_s']:.1f}" for r in runs)
    command = " ".join(["python benchmarks/startup.py", *sys.argv[1:]])
    lines = [f"# One tiny GRPO step through the CLI: where the wall clock goes (the median of {args.runs} runs)", "",
             f"`{command}`",
             f"on {os.cpu_count()} cores; recipe: configs/tiny-cpu.yaml with {', '.join(ONE_STEP + args.set)}", "",
             "| phase | seconds | share |", "|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {v / wall:.0%} |" for k, v in phases.items()]
    lines += [f"| **the run** | **{wall:.1f}** | (all runs: {walls} s) |", "", "| process | CPU seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in cpu.items()]
    lines += [f"| **all** | **{sum(cpu.values()):.1f}** (of {wall * os.cpu_count():.0f} core-seconds) |"]
    table = "\n".join(lines)
    save_results(args.name, {"command": sys.argv[1:], "cores": os.cpu_count(), "runs": runs,
                             "median_run": mid}, table)
    print(table)


if __name__ == "__main__":
    main()
