"""The GRPO driver: prompt groups stream through generators -> scorers -> reference -> learner.

The driver moves object references and keeps counts; actors do the work, and
``StalenessManager`` decides which groups may start and which form the next batch. Every
rollout carries the policy versions that generated it; samples.jsonl records them.
"""
from __future__ import annotations

import logging
import math
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from ...actors.advantages import batch_advantages
from ...actors.learner import GrpoStats
from ...actors.loss import global_denominator, kl_estimate, micro_batch_count
from ...actors.rollout import Rollout, TrainSample
from ...actors.scorer import RewardHealth, add_stats
from ...cluster.ray_metrics import RunMetrics
from ..common import interrupt
from ..common.checkpoint import Checkpoints, tag_for
from ..common.data import EpochSampler, PreparedData, PromptRenderer
from ..common.inflight import InFlight, Work
from ..common.system import System
from ..config import Recipe
from .elastic import Elastic
from .records import rollout_metrics
from .staleness import StalenessManager
from .telemetry import SpanCollector

log = logging.getLogger("r1ray")


@dataclass
class Group:
    """One prompt and its G completions on their way through the pipeline."""

    seq: int  # admission order
    prompt: dict
    admitted_at: int  # the version every generator held when the group was admitted
    rollouts: list[Rollout] = field(default_factory=list)


class GrpoDriver:
    """Streams prompt groups through the actor groups; ``run`` returns one record per step."""

    def __init__(self, system: System, recipe: Recipe, data: PreparedData, renderer: PromptRenderer, metrics,
                 completions_log=None, samples_log=None, checkpoints: Checkpoints | None = None,
                 resume: dict | None = None, evaluate=None):
        self.system, self.r, self.train, self.renderer = system, recipe, data.train, renderer
        self.metrics, self.completions_log, self.samples_log = metrics, completions_log, samples_log
        g = recipe.grpo
        self.B, self.G = g.prompts_per_step, g.num_generations
        # vLLM: one group per call, so each returns the moment its G completions are done.
        self.per_request = g.groups_per_request or (1 if system.streams_weights else max(1, self.B // len(system.generators)))
        self.sampler = EpochSampler(len(data.train), recipe.seed, data.train_rows)
        self.reward_names = [s.name for s in recipe.rewards]
        self.health = RewardHealth(self.reward_names, recipe.scorer.max_failed_steps, recipe.scorer.on_broken)
        self.reward_window: dict = {}  # the scorers' stats since the last learner step, for self.health
        self.checkpoints = checkpoints
        self.saving: dict[int, tuple[list, dict]] = {}  # policy version -> (learners' save refs, driver state)
        self.records: list[dict] = []
        self.consumed: list[str] = []  # sample ids the learner trained on, in order
        self.consumed_prompts: list[str] = []
        self.taken0 = 0  # prompts the sampler handed out before this driver (a resumed run)
        self.counts = Counter()  # dropped groups, interrupted (multi-version) samples, verifier counts
        self.tokens = 0
        histogram = Counter()
        if resume is not None:  # continue where the checkpoint left off, with the same data order
            self.records = list(resume["records"])
            self.consumed_prompts = list(resume["consumed_prompts"])
            self.consumed = [f"{p}/{k}" for p in self.consumed_prompts for k in range(self.G)]
            self.taken0 = resume["sampler_taken"]
            self.sampler.seek(self.taken0)
            self.counts.update(resume["counts"])
            self.tokens = resume["tokens"]
            histogram.update({int(k): v for k, v in resume["staleness_histogram"].items()})
            for name in [n for n in self.reward_names if n not in resume["reward_names"]]:
                self.system.scorers.run_all("drop", name, control=True)
                self.reward_names.remove(name)
        self.books = StalenessManager(self.B, g.max_staleness, g.steps - len(self.records), system.version)
        self.books.histogram.update(histogram)
        self.inflight = InFlight(system.watchdog, recipe.ray, self.G, self.score_budget)
        self.ready: dict[int, Group] = {}  # seq -> a group that may be consumed
        self.training = False
        self.turn = 0
        self.unsynced: dict[int, dict] = {}  # a step's record waits for its weights to reach the generators
        self.telemetry = SpanCollector(system)  # every actor's busy intervals: utilisation, the timeline
        self.ray_metrics = RunMetrics(recipe.ray.namespace)  # the dashboard's Metrics view, Prometheus
        self.window_counts = Counter()  # the same, since the last learner step
        self.consecutive_drops = 0
        self.finishing = False
        self.requeued: list[Group] = []  # groups whose generator was lost: generated again first
        self.rescore: list[Group] = []  # groups whose scorer was lost: scored again
        self.elastic = Elastic(self)
        self.evaluate = evaluate  # step -> eval/<task>/... metrics, every eval.every_steps steps

    # -- the loop ----------------------------------------------------------------------------
    def run(self, progress=None) -> list[dict]:
        self.t0, self.wall0 = time.perf_counter(), time.time()
        self.t_last = self.t0
        self.telemetry.window_start = self.wall0
        self.system.watchdog.doing = self.inflight.doing
        self.system.watchdog.on_lost, self.inflight.on_lost = self.elastic.actor_lost, self.elastic.work_lost
        self.elastic.control = self.system.control
        self.elastic.reconcile()  # grow towards generator.max_actors whenever the cluster has room
        while len(self.records) < self.r.grpo.steps:
            interrupt.check()
            self.elastic.heartbeat(self.r.ray.heartbeat_s)
            self.admit()
            self.maybe_train()
            self.elastic.resync()
            work = self.inflight.next_done()
            if work.stage == "join":
                self.elastic.on_join(work)
            elif work.stage == "generate":
                self.on_generated(work)
                self.elastic.retire_drained()
            elif work.stage == "score":
                self.on_scored(work)
            elif work.stage == "reference":
                self.on_referenced(work)
            elif work.stage == "train":
                self.on_trained(work)
            elif self.elastic.synced(work):  # (a sync that reached no generator is sent again)
                for record in self.on_synced(work):
                    if progress is not None:
                        progress.update(1)
                        progress.set_postfix(reward=f"{record['reward/mean']:.3f}", loss=f"{record['loss']:.4f}",
                                             stale=f"{record['staleness/mean']:.2f}")
        self.finish()
        self.t1, self.wall1 = time.perf_counter(), time.time()
        self.system.watchdog.doing = lambda name: ""
        self.system.watchdog.on_lost = self.inflight.on_lost = None
        return self.records

    # -- stages ------------------------------------------------------------------------------
    def admit(self) -> None:
        """Start as many groups as the staleness bound allows, ``per_request`` per generate call;
        groups whose generator was lost go first, in admission order."""
        if not self.elastic.usable():
            return  # every generator is starting: their groups wait
        self.flush_requeued()
        while self.books.may_admit():
            groups = []
            while self.books.may_admit() and len(groups) < self.per_request:
                idx, pid = self.sampler.take(1)[0]
                seq, at = self.books.admit()
                groups.append(Group(seq, self.renderer.prompt(self.train[idx], pid), at))
            self.generate(groups)

    def generate(self, groups: list[Group]) -> None:
        i = self.pick("generate", self.system.generators, self.elastic.usable())
        ref = self.system.generators.call(i, "generate", [g.prompt for g in groups], self.G, self.r.sampling,
                                          False, self.r.grpo.partial_rollout_tokens)
        self.inflight.submit(Work("generate", [ref], groups, actor=i))

    def requeue_work(self, work: Work) -> None:
        """The work of a lost actor: its groups are generated (or scored) again."""
        if self.finishing:  # spare work after the last step: nothing to redo
            return
        if work.stage == "generate":
            self.requeued = sorted(self.requeued + work.groups, key=lambda g: g.seq)
            self.tally({"groups/requeued": len(work.groups)})
        elif work.stage == "score":
            self.rescore += work.groups
            self.tally({"groups/rescored": len(work.groups)})
        self.flush_requeued()

    def flush_requeued(self) -> None:
        """Send re-queued groups to the generators and scorers that can take them."""
        while self.requeued and self.elastic.usable():
            groups, self.requeued = self.requeued[: self.per_request], self.requeued[self.per_request :]
            self.generate(groups)
        if self.rescore and self.system.scorers.ready():
            groups, self.rescore = self.rescore, []
            self.score(groups, [r for g in groups for r in g.rollouts])

    def dropped_rewards(self) -> list[str]:
        return [s.name for s in self.r.rewards if s.name not in self.reward_names]

    def on_generated(self, work: Work) -> None:
        self._attach(work.groups, work.value)
        if not self.system.scorers.ready():  # every scorer is being replaced
            self.rescore += work.groups
            return
        self.score(work.groups, work.value)

    def score(self, groups: list[Group], rollouts: list[Rollout]) -> None:
        j = self.pick("score", self.system.scorers, self.system.scorers.ready())
        self.inflight.submit(Work("score", [self.system.scorers.call(j, "score", rollouts)], groups, actor=j))

    def on_scored(self, work: Work) -> None:
        rollouts, stats = work.value
        self.tally({f"reward/{k}": v for k, v in stats.items() if k != "time_s" and not isinstance(v, str)})
        add_stats(self.reward_window, stats)
        self._attach(work.groups, rollouts)
        kept = [g for g in work.groups if self._keep(g)]
        if kept and self.system.reference is not None:
            samples = [TrainSample.of(r) for g in kept for r in g.rollouts]
            self.inflight.submit(Work("reference", [self.system.reference.call(0, "logprobs", samples)], kept, actor=0))
        else:
            self._ready(kept)

    def on_referenced(self, work: Work) -> None:
        for r, lp in zip((r for g in work.groups for r in g.rollouts), work.value):
            r.ref_logprobs = lp
        self._ready(work.groups)

    def maybe_train(self) -> None:
        """Send the next batch (the next B useful groups in admission order) to the learner."""
        if self.training or (seqs := self.books.next_batch()) is None:
            return
        batch = [self.ready.pop(s) for s in seqs]
        rollouts = [r for g in batch for r in g.rollouts]
        version = self.system.version
        self.books.consume(version, [r.version for r in rollouts])
        samples, denom, tokens = self._train_samples(rollouts)
        refs = self.system.learners.shard("grpo_step", samples, denom, tokens)
        self.training = True
        self.inflight.submit(Work("train", refs, batch, version=version))

    def on_trained(self, work: Work) -> None:
        """Log the consumed samples, publish the new weights, keep the step's record until they land."""
        self.training = False
        step = len(self.records) + len(self.unsynced) + 1
        rollouts = [r for g in work.groups for r in g.rollouts]
        self.consumed.extend(r.sample_id for r in rollouts)
        self.consumed_prompts.extend(g.prompt["prompt_id"] for g in work.groups)
        self.tokens += sum(len(r.completion_ids) for r in rollouts)
        for g in work.groups:
            for r in g.rollouts:
                self._log(self.samples_log, {
                    "step": step, "sample_id": r.sample_id, "trained_at": work.version, "admitted_at": g.admitted_at,
                    "min_version": r.version, "max_version": max(r.versions, default=-1),
                    "tokens": len(r.completion_ids), "logprobs": len(r.logprobs), "reward": r.reward,
                    "finish_reason": r.finish_reason})
        self.tally({"samples/interrupted": sum(len(set(r.versions)) > 1 for r in rollouts)})
        self.check_rewards()
        version = self.elastic.publish().version
        if self.checkpoints is not None and self.checkpoints.due(step):
            # Queued behind the weight export, before the next batch: the state after exactly this step.
            self.checkpoints.begin(step)
            self.saving[version] = (self.system.learners.call_all("save_checkpoint", str(self.checkpoints.dir),
                                                                  tag_for(step)),
                                    self.state(step, version, max(g.seq for g in work.groups)))
        window, self.window_counts = dict(self.window_counts), Counter()
        staleness = [work.version - r.version for r in rollouts]
        now = time.perf_counter()
        self.unsynced[version] = {
            "step": step, "policy_version": version, "samples": len(rollouts), **window,
            **rollout_metrics(rollouts, self.reward_names, self.G), **GrpoStats.combine(work.value),
            "staleness/mean": statistics.fmean(staleness), "staleness/max": max(staleness),
            "time/step_s": now - self.t_last, **self.telemetry.window(), **self.queue_depths(),
            "throughput/samples_per_s": len(rollouts) / (now - self.t_last),
            "throughput/tokens_per_s": sum(len(r.completion_ids) for r in rollouts) / (now - self.t_last)}
        self.t_last = now
        if self.r.grpo.log_completions_every and step % self.r.grpo.log_completions_every == 0:
            for r in work.groups[0].rollouts:
                self._log(self.completions_log, {"step": step, "sample_id": r.sample_id, "text": r.text,
                                                 "reward": r.reward, "scores": r.scores,
                                                 "versions": sorted(set(r.versions))})

    def on_synced(self, work: Work) -> list[dict]:
        """The generators hold ``work.version``: the records of the steps up to it are written
        (more than one when an earlier sync reached no generator and this one caught up)."""
        self.books.confirm(work.version)
        written = []
        for version in sorted(v for v in self.unsynced if v <= work.version):
            record = self.unsynced.pop(version)
            record["time/weight_sync_s"] = time.perf_counter() - work.started
            every = self.r.eval.every_steps
            if self.evaluate is not None and every and record["step"] % every == 0:
                # The generators hold exactly this step's weights now. The loop waits meanwhile, so
                # the work in flight gets the evaluation's time added to its deadlines.
                t0 = time.perf_counter()
                record.update(self.evaluate(record["step"]))
                record["time/eval_s"] = time.perf_counter() - t0
                self.inflight.postpone(record["time/eval_s"])
            self.metrics.write(record, prefix="grpo/")
            self.ray_metrics.record(record)
            self.records.append(record)
            if version in self.saving:  # the step's record is written: the checkpoint may be committed
                refs, state = self.saving.pop(version)
                saved = self.system.learners.get(refs, "save_checkpoint")
                self.checkpoints.commit(state, saved)  # the jsonl files are written line by line, unbuffered
            written.append(record)
        return written

    def state(self, step: int, version: int, last_seq: int) -> dict:
        """What a resumed run needs besides the learners' state: every group admitted up to the
        last one of this batch was consumed or dropped; the ones after it are admitted again."""
        return {"step": step, "policy_version": version, "sampler_taken": self.taken0 + last_seq + 1,
                "consumed_prompts": list(self.consumed_prompts), "counts": dict(self.counts), "tokens": self.tokens,
                "staleness_histogram": {str(k): v for k, v in self.books.histogram.items()},
                "reward_names": list(self.reward_names)}

    # -- helpers -----------------------------------------------------------------------------
    def check_rewards(self) -> None:
        """Once per step: a reward function that failed on every completion for
        ``scorer.max_failed_steps`` steps stops the run (BrokenRewardError), or is dropped."""
        window, self.reward_window = self.reward_window, {}
        for name in self.health.end_step(window):
            log.warning("reward %r failed on every completion for %d steps: dropped (scorer.on_broken=drop); "
                        "example: %s", name, self.health.failed_steps[name], window.get(f"{name}/first_error"))
            self.system.scorers.run_all("drop", name, control=True)
            self.reward_names.remove(name)
            self.tally({f"reward/{name}/dropped": 1})

    def _attach(self, groups: list[Group], rollouts: list[Rollout]) -> None:
        for k, g in enumerate(groups):
            g.rollouts = rollouts[k * self.G : (k + 1) * self.G]

    def _train_samples(self, rollouts: list[Rollout]) -> tuple[list[TrainSample], float, float]:
        """The batch's advantages (computed on the whole batch, after the reference: "batch"
        scaling, REINFORCE++ and KL-in-reward need it), truncated completions masked out of the
        loss when asked, and the global denominators of the loss type and of the token mean."""
        g, lc = self.r.grpo, self.r.learner.loss
        kl = [kl_estimate(torch.tensor(r.logprobs), torch.tensor(r.ref_logprobs), lc.kl_estimator).tolist()
              for r in rollouts] if lc.kl_in_reward else None
        advantages = batch_advantages([r.reward for r in rollouts], self.G, g.advantage_estimator, g.advantage_scale,
                                      [len(r.completion_ids) for r in rollouts], kl, lc.kl_coef)
        samples = []
        for r, a in zip(rollouts, advantages):
            r.advantage = a
            in_loss = not (g.mask_truncated_completions and r.finish_reason == "length")
            samples.append(TrainSample(r.prompt_ids, r.completion_ids, r.logprobs, a, r.ref_logprobs, in_loss))
        lengths = [len(s.completion_ids) if s.in_loss else 0 for s in samples]
        micro = micro_batch_count(len(samples), len(self.system.learners), self.r.learner.micro_batch_size)
        denom = global_denominator(lc.loss_type, lengths, lc.max_completion_length or self.r.sampling.max_new_tokens,
                                   micro)
        self.tally({"samples/masked_truncated": len(lengths) - sum(s.in_loss for s in samples)})
        return samples, denom, float(max(sum(lengths), 1))

    def _keep(self, g: Group) -> bool:
        """False when dynamic sampling drops the group (all rewards equal: no learning signal)."""
        rewards = torch.tensor([r.reward for r in g.rollouts])
        if not (self.r.grpo.dynamic_sampling and len(set(rewards.tolist())) == 1):
            self.consecutive_drops = 0
            return True
        self.books.drop(g.seq)
        self.tally({"groups/dropped": 1})
        self.consecutive_drops += 1
        if self.consecutive_drops > 20 * self.B:
            raise RuntimeError(f"grpo.dynamic_sampling dropped {self.consecutive_drops} groups in a row: every "
                               "group has equal rewards (all solved or all failed); turn it off or change the data")
        return False

    def _ready(self, groups: list[Group]) -> None:
        for g in groups:
            self.books.ready(g.seq)
            self.ready[g.seq] = g

    def pick(self, stage: str, group, among: list[int]) -> int:
        """The least loaded actor of ``group`` (of those ``among``) for ``stage``; ties go
        round-robin so every actor gets work."""
        load = self.inflight.load(stage, len(group))
        self.turn += 1
        return min(among, key=lambda i: (load[i], (i - self.turn) % len(load)))

    def tally(self, counts: dict) -> None:
        """Add to the run's totals and to the window the next learner step reports."""
        self.counts.update(counts)
        self.window_counts.update(counts)

    @staticmethod
    def _log(writer, record: dict) -> None:
        if writer is not None:
            writer.write(record)

    def score_budget(self, samples: int) -> float:
        """The longest a scorer can take on ``samples``: every function may time out on each."""
        sc = self.r.scorer
        return sc.timeout_s * len(self.reward_names) * math.ceil(samples / sc.workers_per_actor)

    def queue_depths(self) -> dict:
        return {**self.inflight.depths(), "queue/ready_groups": len(self.ready),
                "queue/requeued_groups": len(self.requeued) + len(self.rescore),
                "generators/ready": len(self.system.generators.ready())}

    def finish(self) -> None:
        """Let spare work drain (the generators serve evaluation next) and collect the last spans.
        Actors still starting are not waited for (one may wait for a node that never comes)."""
        self.finishing = True
        while any(w.stage != "join" for w in self.inflight.work):  # only dynamic sampling's spare groups
            if (work := self.inflight.next_done()).stage == "join":
                self.elastic.on_join(work)
        for w in [w for w in self.inflight.work if w.stage == "join"]:
            self.inflight.remove(w)
        self.telemetry.drain()

    # -- what the run reports ----------------------------------------------------------------
    def summary(self) -> dict:
        """The GRPO phase's totals for summary.json."""
        seconds = self.t1 - self.t0
        return {
            "steps": len(self.records), "time_s": seconds, "samples": len(self.consumed),
            "policy_version": self.system.version, "max_staleness": self.r.grpo.max_staleness,
            "samples_per_s": len(self.consumed) / seconds, "tokens_per_s": self.tokens / seconds,
            "reward_first": self.records[0]["reward/mean"] if self.records else None,
            "reward_last": self.records[-1]["reward/mean"] if self.records else None,
            "staleness_histogram": {str(k): v for k, v in sorted(self.books.histogram.items())},
            "counts": dict(self.counts),
            "utilisation": self.telemetry.utilisation(self.wall0, self.wall1),
            "generator_group": self.elastic.summary(),
        }
