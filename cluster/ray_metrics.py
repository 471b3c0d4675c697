"""A run's step metrics in Ray's metrics system (``ray.util.metrics``), for the dashboard's
Metrics view and Prometheus (every node's metrics agent serves them; see the README for the
scrape configuration). Every metric carries the run's Ray namespace as the tag ``run``.

    r1ray_reward{run}                    mean reward of the step's samples
    r1ray_reward_component{run,reward}   mean score of each reward function (accuracy, ...)
    r1ray_tokens_per_second{run}         completion tokens trained per second
    r1ray_samples_per_second{run}
    r1ray_staleness{run}                 mean policy-version lag of the step's samples
    r1ray_idle_ratio{run,group}          share of the step each actor group sat idle
    r1ray_weight_sync_seconds{run}       publish to every generator holding the weights
    r1ray_queue_depth{run,stage}         groups waiting in each stage
    r1ray_policy_version{run}
    r1ray_verifier_timeouts_total{run,reward}   completions whose verifier ran out of time
"""
from __future__ import annotations

import re

from ray.util.metrics import Counter, Gauge

_PER_REWARD = re.compile(r"^reward/(?P<name>[^/]+)/(?P<what>mean|timeouts)$")


class RunMetrics:
    def __init__(self, run: str):
        self.tags = {"run": run}
        gauge = lambda name, doc, keys=(): Gauge(name, description=doc, tag_keys=("run", *keys))  # noqa: E731
        self.reward = gauge("r1ray_reward", "mean reward of the step's samples")
        self.component = gauge("r1ray_reward_component", "mean score of one reward function", ("reward",))
        self.tokens = gauge("r1ray_tokens_per_second", "completion tokens trained per second")
        self.samples = gauge("r1ray_samples_per_second", "samples trained per second")
        self.staleness = gauge("r1ray_staleness", "mean policy-version lag of the step's samples")
        self.idle = gauge("r1ray_idle_ratio", "share of the step an actor group sat idle", ("group",))
        self.sync = gauge("r1ray_weight_sync_seconds", "seconds from publishing weights to every generator holding them")
        self.queue = gauge("r1ray_queue_depth", "prompt groups waiting in a stage", ("stage",))
        self.version = gauge("r1ray_policy_version", "the learner's policy version")
        self.timeouts = Counter("r1ray_verifier_timeouts_total", description="completions whose verifier timed out",
                                tag_keys=("run", "reward"))

    def record(self, rec: dict) -> None:
        """Set every metric from one ``metrics.jsonl`` record."""
        t = self.tags
        for key, metric in [("reward/mean", self.reward), ("throughput/tokens_per_s", self.tokens),
                            ("throughput/samples_per_s", self.samples), ("staleness/mean", self.staleness),
                            ("time/weight_sync_s", self.sync), ("policy_version", self.version)]:
            if key in rec:
                metric.set(float(rec[key]), tags=t)
        for key, value in rec.items():
            if key.startswith("util/") and key.endswith("/idle_ratio"):
                self.idle.set(float(value), tags={**t, "group": key.split("/")[1]})
            elif key.startswith("queue/"):
                self.queue.set(float(value), tags={**t, "stage": key.split("/", 1)[1]})
            elif m := _PER_REWARD.match(key):
                if m["what"] == "mean":
                    self.component.set(float(value), tags={**t, "reward": m["name"]})
                elif value:
                    self.timeouts.inc(float(value), tags={**t, "reward": m["name"]})
