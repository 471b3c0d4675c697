"""A run's curves as images in its run directory: ``curves.png`` from metrics.jsonl (GRPO) and
``sft_curves.png`` from sft_metrics.jsonl, drawn at the end of every run (a resumed one redraws
them whole) and sent to the trackers as images (``logging.trackers``).

One panel per figure a user of GRPO looks at first (rewards, benchmark pass@1, completion
length, loss, KL and entropy, gradient norm, seconds per step, idle ratios), each drawn only
when the run logged it; every series against its step. Drawn with matplotlib's object API
(no pyplot, no global backend), so drawing never touches the process's other figures.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

from .runlog import read_jsonl

log = logging.getLogger("r1ray")


def _rewards(key: str) -> bool:
    return key == "reward/mean" or (key.startswith("reward/") and key.endswith("/mean"))


def _benchmarks(key: str) -> bool:
    return key.startswith("eval/") and key.endswith("/pass@1")


def _idle(key: str) -> bool:
    return key.startswith("util/") and key.endswith("/idle_ratio")


def _named(*keys: str):
    return lambda key: key in keys


# (title, which keys): the panels in order; a panel with no key logged is left out
GRPO_PANELS = [
    ("reward (mean)", _rewards),
    ("benchmarks: pass@1", _benchmarks),
    ("completion tokens", _named("completion_len/mean", "completion_len/max")),
    ("loss", _named("loss")),
    ("KL and entropy", _named("kl", "entropy/mean")),
    ("gradient norm", _named("grad_norm")),
    ("seconds per step", _named("time/step_s")),
    ("idle ratio", _idle),
]
SFT_PANELS = [
    ("loss", _named("loss")),
    ("probe pass@1", _named("probe_pass@1")),
    ("learning rate", _named("lr")),
    ("gradient norm", _named("grad_norm")),
    ("tokens/s", _named("throughput/tokens_per_s")),
]
FILES = {"metrics.jsonl": ("curves.png", "GRPO", GRPO_PANELS), "sft_metrics.jsonl": ("sft_curves.png", "SFT", SFT_PANELS)}


def series(records: list[dict], wanted) -> dict[str, tuple[list[int], list[float]]]:
    """{key: (steps, values)} of the keys ``wanted`` accepts, finite numbers only, in step order."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for record in sorted(records, key=lambda r: r.get("step", 0)):
        for key, value in record.items():
            if wanted(key) and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                steps, values = out.setdefault(key, ([], []))
                steps.append(int(record.get("step", 0)))
                values.append(float(value))
    return out


def draw(records: list[dict], panels: list, title: str, path: Path) -> list[str]:
    """The panels with data drawn into ``path`` (written beside, then renamed); their titles.
    Nothing is written when no panel has data."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    filled = [(name, data) for name, wanted in panels if (data := series(records, wanted))]
    if not filled:
        return []
    cols = min(4, len(filled))
    rows = math.ceil(len(filled) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(f"{title}: {path.parent.name}")
    for i, (name, data) in enumerate(filled):
        ax = fig.add_subplot(rows, cols, i + 1)
        for key, (steps, values) in data.items():
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=key)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(data) > 1:
            ax.legend(fontsize=7)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=90, format="png")
    tmp.replace(path)
    return [name for name, _ in filled]


def draw_curves(run_dir: Path) -> list[Path]:
    """``curves.png`` / ``sft_curves.png`` of the run's jsonl files; the images written. Never
    raises: a run's result does not hang on its pictures (matplotlib missing, a bad record)."""
    written = []
    for source, (image, title, panels) in FILES.items():
        if not (run_dir / source).is_file():
            continue
        try:
            if draw(read_jsonl(run_dir / source), panels, title, run_dir / image):
                written.append(run_dir / image)
        except Exception as e:  # noqa: BLE001 - the metrics stand; only their picture is missing
            log.warning("%s: not drawn (%s: %s)", image, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
    return written
