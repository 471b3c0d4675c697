"""What a GRPO run records: each step's record (metrics.jsonl), its samples (samples.jsonl) and
completions (completions.jsonl), and its progress as a checkpoint saves it."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ...actors.advantages import reverse_kl
from ...actors.learner import GrpoStats
from ...actors.rollout import Rollout


def _mean_std(values) -> tuple[float, float]:
    """Mean and population standard deviation (float64; nan for none: a reward no sample got)."""
    if not len(values):
        return float("nan"), float("nan")
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std())


def rollout_metrics(rollouts: list[Rollout], reward_names: list[str], group_size: int, lengths: list[int]) -> dict:
    """Rewards per function, completion lengths (``lengths``: each completion's tokens) and group
    statistics of one batch."""
    m: dict[str, float] = {}
    rewards = np.array([r.reward for r in rollouts], dtype=np.float64)
    m["reward/mean"], m["reward/std"] = _mean_std(rewards)
    for name in reward_names:
        vals = [v for r in rollouts if (v := r.scores.get(name)) is not None]
        m[f"reward/{name}/mean"], m[f"reward/{name}/std"] = _mean_std(vals)
    m["completion_len/mean"], m["completion_len/max"] = sum(lengths) / len(lengths), max(lengths)
    m["completion/truncated_ratio"] = sum(r.finish_reason == "length" for r in rollouts) / len(rollouts)
    if rollouts and all(r.teacher_logprobs is not None for r in rollouts):  # teacher.model: how far from it
        kl = [x for r in rollouts for x, m in zip(reverse_kl(r.logprobs, r.teacher_logprobs, r.loss_mask),
                                                   r.loss_mask or [1] * len(r.logprobs)) if m]
        m["teacher/reverse_kl"] = float(np.mean(kl)) if kl else 0.0
        m["teacher/reverse_kl_per_sample"] = sum(kl) / len(rollouts)
    by_group = rewards.reshape(-1, group_size)  # (a batch is whole groups)
    m["groups/zero_std_ratio"] = float(np.mean(by_group.min(axis=1) == by_group.max(axis=1)))
    if any(r.messages is not None for r in rollouts):  # multi-turn episodes with tools
        n = len(rollouts)
        m["turns/mean"] = sum(r.turns for r in rollouts) / n
        m["tools/calls_per_sample"] = sum(r.tool_calls for r in rollouts) / n
        m["tools/errors_per_sample"] = sum(r.tool_errors for r in rollouts) / n
        m["tools/success_share"] = sum(r.tool_calls > r.tool_errors for r in rollouts) / n  # >= 1 call that worked
        m["tools/time_s"] = sum(r.tool_time_s for r in rollouts)
        m["completion_len/model_mean"] = sum(sum(r.loss_mask or []) for r in rollouts) / n
    return m


def sample_lines(step: int, trained_at: int, groups) -> list[dict]:
    """samples.jsonl: the batch's trained samples in order, each with the policy versions that
    generated it (what the step's record and counts read too: each rollout's versions read once)."""
    out = []
    for g in groups:
        for r in g.rollouts:
            oldest, newest = r.version_range()
            line = {"step": step, "sample_id": r.sample_id, "trained_at": trained_at, "admitted_at": g.admitted_at,
                    "min_version": oldest, "max_version": newest, "tokens": len(r.completion_ids),
                    "logprobs": len(r.logprobs), "reward": r.reward, "finish_reason": r.finish_reason}
            if r.messages is not None:
                line.update(turns=r.turns, tool_calls=r.tool_calls, tool_errors=r.tool_errors)
            out.append(line)
    return out


def completion_lines(step: int, group) -> list[dict]:
    """completions.jsonl: a group's completions as text, every ``grpo.log_completions_every`` steps."""
    return [{"step": step, "sample_id": r.sample_id, "text": r.text, "reward": r.reward, "scores": r.scores,
             "versions": sorted(set(r.model_versions))} for r in group.rollouts]


def step_record(step: int, version: int, trained_at: int, rollouts: list[Rollout], lines: list[dict], stats: list,
                reward_names: list[str], group_size: int, seconds: float, extra: dict) -> dict:
    """metrics.jsonl: one learner step (``lines``: its samples' ``sample_lines``; ``stats``: each
    learner rank's GrpoStats; ``extra``: the window's counts, utilisation and queue depths)."""
    staleness = [trained_at - x["min_version"] for x in lines]
    lengths = [x["tokens"] for x in lines]
    tokens = sum(lengths)
    return {"step": step, "policy_version": version, "samples": len(rollouts), **extra,
            **rollout_metrics(rollouts, reward_names, group_size, lengths), **GrpoStats.combine(stats),
            "staleness/mean": sum(staleness) / len(staleness), "staleness/max": max(staleness), "time/step_s": seconds,
            "throughput/samples_per_s": len(rollouts) / seconds, "throughput/tokens_per_s": tokens / seconds}


@dataclass
class Progress:
    """What the run has done, as a GRPO checkpoint saves it and a resumed run restores it
    (besides the learners' state): the steps' records, how many prompts were trained on and how
    many the sampler handed out, the totals and the staleness histogram. (Which prompts, each
    sample's id: samples.jsonl. The ids were kept here too, in memory and in every checkpoint's
    driver.json: about 140 KB more a step at 2,048 prompts a step, the ids and the list; 18 MB a
    driver.json by step 500.)"""

    group_size: int
    records: list[dict] = field(default_factory=list)
    prompts_consumed: int = 0
    taken0: int = 0  # prompts the sampler handed out before this driver (a resumed run)
    counts: Counter = field(default_factory=Counter)  # dropped groups, interrupted samples, verifier counts
    tokens: int = 0
    histogram: Counter = field(default_factory=Counter)
    reward_names: list[str] | None = None  # the reward functions still in use when it was saved

    @classmethod
    def restore(cls, state: dict, group_size: int) -> "Progress":
        """From a checkpoint's driver state (``records``: metrics.jsonl up to it)."""
        consumed = state["prompts_consumed"] if "prompts_consumed" in state else len(state["consumed_prompts"])  # (older)
        return cls(group_size, list(state["records"]), consumed, state["sampler_taken"],
                   Counter(state["counts"]), state["tokens"],
                   Counter({int(k): v for k, v in state["staleness_histogram"].items()}), list(state["reward_names"]))

    @property
    def samples(self) -> int:
        """The samples the learner trained on."""
        return self.prompts_consumed * self.group_size

    def state(self, step: int, version: int, last_seq: int, histogram: Counter, reward_names: list[str]) -> dict:
        """What a resumed run needs besides the learners' state: every group admitted up to the
        last one of this batch (``last_seq``) was consumed or dropped; the ones after it are
        admitted again."""
        return {"step": step, "policy_version": version, "sampler_taken": self.taken0 + last_seq + 1,
                "prompts_consumed": self.prompts_consumed, "counts": dict(self.counts), "tokens": self.tokens,
                "staleness_histogram": {str(k): v for k, v in histogram.items()}, "reward_names": list(reward_names)}


def phase_summary(done: Progress, seconds: float, version: int, max_staleness: int, histogram: Counter,
                  utilisation: dict, generator_group: dict) -> dict:
    """summary.json's ``grpo``: the phase's totals."""
    records = done.records
    return {
        "steps": len(records), "time_s": seconds, "samples": done.samples, "policy_version": version,
        "max_staleness": max_staleness, "samples_per_s": done.samples / seconds, "tokens_per_s": done.tokens / seconds,
        "reward_first": records[0]["reward/mean"] if records else None,
        "reward_last": records[-1]["reward/mean"] if records else None,
        "staleness_histogram": {str(k): v for k, v in sorted(histogram.items())},
        "counts": dict(done.counts), "utilisation": utilisation, "generator_group": generator_group,
    }
