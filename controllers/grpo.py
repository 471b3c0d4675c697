"""The GRPO driver: prompts -> generators -> reward scorers -> advantages -> reference -> learner -> sync.

The driver moves object references and keeps counts; actors do the work. Every rollout
carries the policy version that generated it, which the learner step records.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict

import torch

from ..actors.loss import group_advantages
from ..actors.rollout import Rollout
from .config import Recipe
from .data import EpochSampler, PromptRenderer
from .system import System


def split(items: list, parts: int) -> list[list]:
    """Contiguous, near-equal chunks (keeps a prompt's group together when len is a multiple)."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        out.append(items[start:end])
        start = end
    return out


def generate(system: System, prompts: list[dict], n: int, sampling, greedy: bool = False) -> list[Rollout]:
    chunks = [c for c in split(prompts, len(system.generators)) if c]
    refs = [system.generators.call(i, "generate", c, n, sampling, greedy) for i, c in enumerate(chunks)]
    return [r for part in system.generators.get(refs, "generate") for r in part]


def score(system: System, rollouts: list[Rollout], group_size: int) -> tuple[list[Rollout], dict]:
    groups = [rollouts[i : i + group_size] for i in range(0, len(rollouts), group_size)]
    chunks = [sum(c, []) for c in split(groups, len(system.scorers)) if c]
    refs = [system.scorers.call(i, "score", c) for i, c in enumerate(chunks)]
    scored, stats = [], {}
    for part, part_stats in system.scorers.get(refs, "score"):
        scored.extend(part)
        for k, v in part_stats.items():
            stats[k] = stats.get(k, 0) + v
    return scored, stats


def learner_step(system: System, rollouts: list[Rollout]) -> dict:
    """Shard the batch over ranks; losses are normalised by the whole batch's token/sequence count."""
    loss_cfg = system.r.learner.loss
    samples = [{"prompt_ids": r.prompt_ids, "completion_ids": r.completion_ids, "logprobs": r.logprobs,
                "advantage": r.advantage, "ref_logprobs": r.ref_logprobs} for r in rollouts]
    denom = (sum(len(r.completion_ids) for r in rollouts) if loss_cfg.aggregation == "token_mean" else len(rollouts))
    shards = split(samples, len(system.learners))
    refs = [system.learners.call(i, "grpo_step", s, float(max(denom, 1))) for i, s in enumerate(shards)]
    parts = system.learners.get(refs, "grpo_step")
    tokens = sum(p["tokens"] for p in parts) or 1.0
    out = {
        "loss": sum(p["loss_sum"] for p in parts),
        "clip_ratio": sum(p["clipped"] for p in parts) / tokens,
        "ratio/mean": sum(p["ratio_sum"] for p in parts) / tokens,
        "ratio/max": max(p["ratio_max"] for p in parts),
        "logprob_mismatch/mean_abs": sum(p["logp_diff_abs_sum"] for p in parts) / tokens,
        "grad_norm": parts[0]["grad_norm"],
        "lr": parts[0]["lr"],
        "kl": sum(p.get("kl_sum", 0.0) for p in parts) / tokens,
    }
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def rollout_metrics(rollouts: list[Rollout], reward_names: list[str], group_size: int) -> dict:
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
    m["staleness/max"] = max(0, max(r.versions[-1] - r.version for r in rollouts if r.versions) if rollouts else 0)
    return m


class GrpoDriver:
    def __init__(self, system: System, recipe: Recipe, train, renderer: PromptRenderer, metrics, progress=None,
                 completions_log=None):
        self.system, self.r, self.train, self.renderer = system, recipe, train, renderer
        self.metrics, self.progress, self.completions_log = metrics, progress, completions_log
        self.sampler = EpochSampler(len(train), recipe.seed)
        self.reward_names = [s.name for s in recipe.rewards]
        self.consumed: list[str] = []  # sample ids the learner trained on, in order

    def next_prompts(self) -> list[dict]:
        picks = self.sampler.take(self.r.grpo.prompts_per_step)
        return [self.renderer.prompt(self.train[idx], pid) for idx, pid in picks]

    def step(self, step: int) -> dict:
        g, t0 = self.r.grpo, time.perf_counter()
        rollouts = generate(self.system, self.next_prompts(), g.num_generations, self.r.sampling)
        t_gen = time.perf_counter()
        rollouts, score_stats = score(self.system, rollouts, g.num_generations)
        t_score = time.perf_counter()
        adv = group_advantages(torch.tensor([r.reward for r in rollouts]), g.num_generations, g.advantage_scale)
        for r, a in zip(rollouts, adv.tolist()):
            r.advantage = a
        if self.system.reference is not None:
            ref = self.system.reference.run_all("logprobs", [asdict(r) for r in rollouts])[0]
            for r, lp in zip(rollouts, ref):
                r.ref_logprobs = lp
        t_ref = time.perf_counter()
        train_metrics = learner_step(self.system, rollouts)
        t_train = time.perf_counter()
        sync_s = self.system.sync_weights()
        self.consumed.extend(r.sample_id for r in rollouts)
        dt = time.perf_counter() - t0
        record = {"step": step, "policy_version": self.system.version, "samples": len(rollouts),
                  **rollout_metrics(rollouts, self.reward_names, g.num_generations), **train_metrics,
                  **{f"reward/{k}": v for k, v in score_stats.items() if k != "time_s"},
                  "time/step_s": dt, "time/generate_s": t_gen - t0, "time/score_s": t_score - t_gen,
                  "time/reference_s": t_ref - t_score, "time/train_s": t_train - t_ref, "time/weight_sync_s": sync_s,
                  "throughput/samples_per_s": len(rollouts) / dt,
                  "throughput/tokens_per_s": sum(len(r.completion_ids) for r in rollouts) / dt}
        if self.completions_log is not None and g.log_completions_every and step % g.log_completions_every == 0:
            for r in rollouts[: g.num_generations]:
                self.completions_log.write({"step": step, "sample_id": r.sample_id, "text": r.text,
                                            "reward": r.reward, "scores": r.scores}, prefix="completions/")
        return record

    def run(self) -> list[dict]:
        records = []
        for step in range(1, self.r.grpo.steps + 1):
            record = self.step(step)
            self.metrics.write(record, prefix="grpo/")
            records.append(record)
            if self.progress is not None:
                self.progress.update(1)
                self.progress.set_postfix(reward=f"{record['reward/mean']:.3f}", loss=f"{record['loss']:.4f}",
                                          len=f"{record['completion_len/mean']:.0f}")
        return records
