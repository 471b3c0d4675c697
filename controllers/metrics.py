"""metrics.jsonl (one object per learner step) and TensorBoard, written as the run goes."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from ..actors.rollout import Rollout


class MetricsWriter:
    def __init__(self, run_dir: Path, filename: str = "metrics.jsonl", tensorboard: bool = True):
        self.path = run_dir / filename
        self.file = self.path.open("a", buffering=1)  # line-buffered: a crash keeps every finished step
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                self.tb = None

    def write(self, record: dict, prefix: str = "") -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(prefix + k, v, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def rollout_metrics(rollouts: list[Rollout], reward_names: list[str], group_size: int) -> dict:
    """Rewards per function, completion lengths and group statistics of one batch."""
    m: dict[str, float] = {}
    m["reward/mean"], m["reward/std"] = _mean_std([r.reward for r in rollouts])
    for name in reward_names:
        vals = [r.scores.get(name) for r in rollouts]
        m[f"reward/{name}/mean"], m[f"reward/{name}/std"] = _mean_std([v for v in vals if v is not None])
    lens = [len(r.completion_ids) for r in rollouts]
    m["completion_len/mean"], m["completion_len/max"] = statistics.fmean(lens), max(lens)
    m["completion/truncated_ratio"] = sum(r.finish_reason == "length" for r in rollouts) / len(rollouts)
    groups = [rollouts[i : i + group_size] for i in range(0, len(rollouts), group_size)]
    m["groups/zero_std_ratio"] = sum(len({r.reward for r in g}) == 1 for g in groups) / len(groups)
    return m
