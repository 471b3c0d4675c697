"""One `r1ray train` run in its own process, as the benchmarks launch them; their results and plots."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def pyplot():
    """matplotlib.pyplot drawing to files (Agg), or None with a line on stderr when the
    ``bench`` extra is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e .[bench]): no plot", file=sys.stderr)
        return None
    return plt


def save_results(name: str, data: dict, table: str) -> Path:
    """benchmarks/results/<name>.json (``data``) and .md (``table``); returns the folder (for
    the .png beside them)."""
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(data, indent=2))
    (results / f"{name}.md").write_text(table + "\n")
    return results


def train(recipe: str | Path, out: Path, sets: list[str]) -> dict:
    """Runs the recipe with ``--set`` overrides (no dashboard) into ``out``; returns its summary.json.
    A failed run ends the benchmark with the command, the tail of its stderr and its exit code."""
    cmd = [sys.executable, "-m", "r1ray.controllers.cli", "train", str(recipe), "--output-dir", str(out),
           "--set", "ray.dashboard=false"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        print(f"run failed: {' '.join(cmd)}\n{proc.stderr[-4000:]}", file=sys.stderr)
        sys.exit(proc.returncode)
    run_dir = next(line.split(": ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("run directory"))
    return json.loads((Path(run_dir) / "summary.json").read_text())
