"""The run's reward functions: the scorers' stats of each step, and the ones that broke."""
from __future__ import annotations

import logging
import math
from collections.abc import Callable

from ...actors.scorer import RewardHealth, RewardScorer, add_stats, check_specs
from ...cluster.groups import ActorGroup
from ..config import Recipe

log = logging.getLogger("r1ray")


class RewardBook:
    """The reward functions in use (``names``). Every score() call's stats are counted
    (``tally``) and added to the step's window; once per step a function that failed on every
    completion for ``scorer.max_failed_steps`` steps stops the run (BrokenRewardError) or,
    under ``scorer.on_broken: drop``, is dropped on every scorer. ``kept``: the names a resumed
    run's checkpoint still used (the others were dropped before it)."""

    def __init__(self, recipe: Recipe, scorers: ActorGroup, tally: Callable[[dict], None], kept: list[str] | None = None):
        self.configured = [s.name for s in recipe.rewards]
        self.names = list(self.configured)
        self.scorers, self.tally, self.sc = scorers, tally, recipe.scorer
        for name in [n for n in self.names if kept is not None and n not in kept]:
            scorers.run_all(RewardScorer.drop, name, control=True)
            self.names.remove(name)
        # a judge's calls end by its deadline (rewards/judge.py), whatever the number of samples
        self.deadlines = {s.name: fn.deadline_s for s, fn in zip(recipe.rewards, check_specs(recipe.rewards))
                          if getattr(fn, "concurrent", False)}
        self.health = RewardHealth(self.names, self.sc.max_failed_steps, self.sc.on_broken)
        self.window: dict = {}  # the scorers' stats since the last learner step

    def add(self, stats: dict) -> None:
        """One score() call's stats."""
        self.tally({f"reward/{k}": v for k, v in stats.items() if k != "time_s" and not isinstance(v, str)})
        add_stats(self.window, stats)

    def end_step(self) -> None:
        window, self.window = self.window, {}
        for name in self.health.end_step(window):
            log.warning("reward %r failed on every completion for %d steps: dropped (scorer.on_broken=drop); "
                        "example: %s", name, self.health.failed_steps[name], window.get(f"{name}/first_error"))
            self.scorers.run_all(RewardScorer.drop, name, control=True)
            self.names.remove(name)
            self.tally({f"reward/{name}/dropped": 1})

    def dropped(self) -> list[str]:
        return [n for n in self.configured if n not in self.names]

    def score_budget(self, samples: int) -> float:
        """The longest a scorer can take on ``samples``: every function may time out on each, and
        every judge may use its deadline."""
        pooled = [n for n in self.names if n not in self.deadlines]
        return (self.sc.timeout_s * len(pooled) * math.ceil(samples / self.sc.workers_per_actor)
                + sum(d for n, d in self.deadlines.items() if n in self.names))
