"""What a GRPO step records: the rollout metrics of its batch."""
from __future__ import annotations

import statistics

from ...actors.rollout import Rollout


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
