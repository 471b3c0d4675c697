"""Reward scorer: applies the configured reward functions to rollouts, in isolated workers.

Every function runs through ``rewards.VerifierPool``: one completion at a time, in a worker
process, under a hard wall-clock limit, so a pathological completion costs at most
``timeout_s`` and never hangs the run.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from .. import rewards
from .rollout import Rollout
from .spans import SpanLog


@dataclass
class RewardSpec:
    name: str  # a registered name (accuracy, format, ...) or an import path "pkg.mod:fn"
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScorerConfig:
    num_actors: int = 1
    workers_per_actor: int = 2  # verifier processes per scorer actor
    timeout_s: float = 10.0  # hard wall-clock limit per completion and function
    cpus_per_actor: float = 0.25


def check_specs(specs: list[RewardSpec]) -> None:
    """Resolve every function once so a typo fails before any actor starts."""
    for i, s in enumerate(specs):
        try:
            rewards.get(s.name, **s.params)
        except (ValueError, TypeError, ImportError, AttributeError) as e:
            raise ValueError(f"rewards[{i}] (name={s.name!r}, params={s.params}): {e}") from None


class RewardScorer:
    def __init__(self, specs: list[RewardSpec], cfg: ScorerConfig):
        check_specs(specs)
        self.specs, self.cfg = specs, cfg
        self.pool = rewards.VerifierPool(num_workers=cfg.workers_per_actor, timeout_s=cfg.timeout_s)
        self.spans = SpanLog()

    def __repr__(self) -> str:
        return f"RewardScorer({', '.join(s.name for s in self.specs)})"

    @staticmethod
    def _inputs(rollouts: list[Rollout]) -> tuple[list, dict[str, list]]:
        """TRL's keyword arguments: conversational completions, prompts, completion_ids, dataset columns."""
        completions = [[{"role": "assistant", "content": r.text}] for r in rollouts]
        columns: dict[str, list] = {key: [r.columns.get(key) for r in rollouts]
                                    for key in (rollouts[0].columns if rollouts else {}) if key != "prompt"}
        columns["prompts"] = [r.columns.get("prompt") for r in rollouts]
        columns["completion_ids"] = [r.completion_ids for r in rollouts]
        return completions, columns

    def score(self, rollouts: list[Rollout]) -> tuple[list[Rollout], dict]:
        """Fill ``scores`` and ``reward`` (weighted sum; a None score adds nothing) of each rollout.

        Returns the rollouts and counts per function: timeouts, errors, seconds.
        """
        with self.spans.span("score", samples=len(rollouts)):
            return self._score(rollouts)

    def _score(self, rollouts: list[Rollout]) -> tuple[list[Rollout], dict]:
        t0 = time.perf_counter()
        completions, columns = self._inputs(rollouts)
        stats: dict[str, float] = {}
        for r in rollouts:
            r.reward = 0.0
        for spec in self.specs:
            res = self.pool.score(spec.name, spec.params, completions, columns, [r.sample_id for r in rollouts])
            for r, s in zip(rollouts, res.scores):
                if s is not None and math.isnan(s):
                    s = None
                r.scores[spec.name] = s
                if s is not None:
                    r.reward += spec.weight * s
            stats[f"{spec.name}/timeouts"] = len(res.timeouts)
            stats[f"{spec.name}/errors"] = len(res.errors)
        stats["time_s"] = time.perf_counter() - t0
        return rollouts, stats

    def score_one(self, rollouts: list[Rollout], name: str, params: dict | None = None) -> list[float | None]:
        """Scores of one function (e.g. accuracy for evaluation), configured or not."""
        completions, columns = self._inputs(rollouts)
        return self.pool.score(name, params or {}, completions, columns, [r.sample_id for r in rollouts]).scores

    def close(self) -> None:
        self.pool.close()

    def drain_spans(self) -> list[dict]:
        return self.spans.drain()

    def ping(self) -> str:
        return "ok"
