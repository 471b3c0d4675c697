"""The GRPO driver: prompt groups stream through generators -> scorers -> reference -> learner.

The driver moves object references and keeps counts; actors do the work, ``StalenessManager``
decides which groups may start and which form the next batch, ``Elastic`` keeps the generator
and scorer groups whole. Every rollout carries the policy versions that generated it;
samples.jsonl records them.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from ...actors.batching import learner_shards
from ...actors.learner import LearnerRank
from ...cluster import transport
from ...cluster.ray_metrics import RunMetrics
from ..common import interrupt
from ..common.checkpoint import Checkpoints
from ..common.data import PreparedData, PromptRenderer
from ..common.elastic import Elastic, Hooks
from ..common.inflight import InFlight, Work
from ..common.system import System
from ..config import Recipe
from .groups import train_batch
from .manager import Managers, start_managers
from .records import Progress, completion_lines, phase_summary, sample_lines, step_record
from .reward_book import RewardBook
from .rollouts import STAGES, RolloutStream
from .staleness import StalenessManager
from .telemetry import SpanCollector


class GrpoDriver:
    """Streams prompt groups through the actor groups; ``run`` returns one record per step.
    ``resume``: a checkpoint's driver state (``Progress.restore``) to continue from."""

    def __init__(self, system: System, recipe: Recipe, data: PreparedData, renderer: PromptRenderer, metrics,
                 completions_log=None, samples_log=None, checkpoints: Checkpoints | None = None,
                 resume: dict | None = None, benchmark_step=None, timeline: Path | None = None):
        self.system, self.r, self.G = system, recipe, recipe.grpo.num_generations
        self.metrics, self.completions_log, self.samples_log = metrics, completions_log, samples_log
        self.done = Progress.restore(resume, self.G) if resume is not None else Progress(self.G)
        self.window_counts = Counter()  # the run's counts since the last learner step
        self.rewards = RewardBook(recipe, system.scorers, self.tally, self.done.reward_names)
        self.checkpoints = checkpoints
        self.saving: dict[int, tuple[list, dict]] = {}  # policy version -> (learners' save refs, driver state)
        g = recipe.grpo
        self.books = StalenessManager(g.prompts_per_step, g.max_staleness, g.steps - len(self.done.records),
                                      system.version)
        self.books.histogram.update(self.done.histogram)
        self.inflight = InFlight(system.watchdog, recipe.ray, self.G, self.rewards.score_budget)
        if system.batches_requests:
            self.inflight.batched.add("generate")
        self.stream = RolloutStream(system, recipe, data, renderer, self.books, self.inflight, self.rewards,
                                    self.tally, self.done.taken0)
        self.elastic = self.stream.elastic = Elastic(system, self.inflight, recipe, self.stream.per_request, Hooks(
            self.stream.send, self.stream.score, self.rewards.dropped, self.tally,
            retiring=lambda i: self.telemetry.drain_one(system.generators, i)))  # (its spans kept, not lost with it)
        if system.managers is None:
            system.managers = start_managers(system, recipe)
        self.managers = self.stream.managers = Managers(self) if system.managers is not None else None
        self.training = False
        self.unsynced: dict[int, dict] = {}  # a step's record waits for its weights to reach the generators
        # every actor's busy intervals (utilisation) and timeline.json (of logging.timeline_steps)
        self.telemetry = SpanCollector(system, timeline, recipe.logging.timeline_steps, len(self.done.records) + 1)
        self.ray_metrics = RunMetrics(recipe.ray.namespace)  # the dashboard's Metrics view, Prometheus
        self.benchmark_step = benchmark_step  # (step, dropped rewards) -> eval/<task>/... metrics, every eval.every_steps steps

    @property
    def records(self) -> list[dict]:
        return self.done.records

    # -- the loop ----------------------------------------------------------------------------
    def run(self, progress=None) -> list[dict]:
        self.t0, self.wall0 = transport.now(), transport.wall()
        self.t_last = self.t0
        self.telemetry.window_start = self.wall0
        self.system.watchdog.doing = self.inflight.doing
        self.system.watchdog.on_lost, self.inflight.on_lost = self.elastic.actor_lost, self.elastic.work_lost
        self.elastic.control = self.system.control
        self.elastic.reconcile()  # grow towards generator.max_actors whenever the cluster has room
        while len(self.records) < self.r.grpo.steps:
            interrupt.check()
            self.elastic.heartbeat(self.r.ray.heartbeat_s)
            self.stream.admit()
            if self.managers is not None:
                self.managers.flush()
            self.maybe_train()
            self.elastic.resync(self.training, self.books.confirmed)
            work = self.inflight.next_done()
            if work.stage == "join":
                self.elastic.on_join(work)
            elif work.stage in STAGES:  # generate -> score -> reference / teacher
                self.stream.on_done(work)
                if work.stage == "generate":
                    self.elastic.retire_drained()
            elif work.stage == "manage":
                self.managers.on_report(work)
            elif work.stage == "train":
                self.on_trained(work)
            elif self.elastic.synced(work):  # (a sync that reached no generator is sent again)
                for record in self.on_synced(work):
                    if progress is not None:  # (the step's figures first: the update shows them)
                        progress.set_postfix(reward=f"{record['reward/mean']:.3f}", loss=f"{record['loss']:.4f}",
                                             stale=f"{record['staleness/mean']:.2f}", refresh=False)
                        progress.update(1)
        self.finish()
        self.t1, self.wall1 = transport.now(), transport.wall()
        self.system.watchdog.doing = lambda name: ""
        self.system.watchdog.on_lost = self.inflight.on_lost = None
        return self.records

    # -- the learner's side -------------------------------------------------------------------
    def maybe_train(self) -> None:
        """Send the next batch (the next B useful groups in admission order) to the learner."""
        if self.training or (batch := self.stream.take_batch()) is None:
            return
        rollouts = [r for g in batch for r in g.rollouts]
        version = self.system.version
        self.books.consume(version, [r.version for r in rollouts])
        samples, denom, tokens = train_batch(rollouts, self.r, len(self.system.learners))
        self.tally({"samples/masked_truncated": sum(not s.in_loss for s in samples)})
        if self.system.sleeps_generators:  # colocated vLLM: the device is the learner's until the next sync
            self.system.sleep_generators()
        lc = self.r.learner
        shards = learner_shards(samples, len(self.system.learners), lc.max_tokens_per_micro_batch,
                                lc.sequence_parallel_size)
        refs = self.system.learners.scatter(LearnerRank.grpo_step, shards, denom, tokens)
        self.training = True
        self.inflight.submit(Work("train", refs, batch, version=version, queue="learner"))

    def on_trained(self, work: Work) -> None:
        """Publish the new weights, send the learner its next batch when one is ready, then log
        the consumed samples and keep the step's record until the weights land."""
        self.training = False
        step = len(self.records) + len(self.unsynced) + 1
        self.rewards.end_step()
        version = self.elastic.publish().version
        rollouts = [r for g in work.groups for r in g.rollouts]
        lines = sample_lines(step, work.version, work.groups)
        self.done.prompts_consumed += len(work.groups)
        self.done.tokens += sum(x["tokens"] for x in lines)
        # (model tokens' versions never go down: more than one is its oldest below the newest)
        self.tally({"samples/interrupted": sum(x["min_version"] != x["max_version"] for x in lines)})
        if self.checkpoints is not None and self.checkpoints.due(step):
            # Queued behind the weight export, before the next batch: the state after exactly this step.
            self.saving[version] = (self.checkpoints.save(step, self.system.learners),
                                    self.done.state(step, version, max(g.seq for g in work.groups),
                                                    self.books.histogram, self.rewards.names))
        window, self.window_counts = dict(self.window_counts), Counter()
        now, depths = transport.now(), self.queue_depths()
        # The rest is bookkeeping the learner need not wait for (the batch's samples.jsonl lines,
        # the step's record, every actor's spans drained): at 1,024 generators done first, it made
        # the simulated step 7.6% longer; now 0.4% (docs/simulator.md, the driver at scale).
        self.maybe_train()
        if self.samples_log is not None:
            self.samples_log.write_many(lines)
        self.unsynced[version] = step_record(step, version, work.version, rollouts, lines, work.value,
                                             self.rewards.names, self.G, now - self.t_last,
                                             {**window, **self.telemetry.window(), **depths})
        self.t_last = now
        if self.r.grpo.log_completions_every and step % self.r.grpo.log_completions_every == 0:
            self._log(self.completions_log, *completion_lines(step, work.groups[0]))

    def on_synced(self, work: Work) -> list[dict]:
        """The generators hold ``work.version``: the records of the steps up to it are written
        (more than one when an earlier sync reached no generator and this one caught up)."""
        self.books.confirm(work.version)
        written = []
        for version in sorted(v for v in self.unsynced if v <= work.version):
            record = self.unsynced.pop(version)
            record["time/weight_sync_s"] = transport.now() - work.started
            every = self.r.eval.every_steps
            if self.benchmark_step is not None and every and record["step"] % every == 0:
                # The generators hold exactly this step's weights now. The loop waits meanwhile, so
                # the work in flight gets the evaluation's time added to its deadlines.
                t0 = transport.now()
                record.update(self.benchmark_step(record["step"], self.rewards.dropped))
                record["time/eval_s"] = transport.now() - t0
                self.inflight.postpone(record["time/eval_s"])
                if self.managers is not None:
                    self.managers.postpone(record["time/eval_s"])
            self.metrics.write(record)
            self.ray_metrics.record(record)
            self.records.append(record)
            if version in self.saving:  # the step's record is written: the checkpoint may be committed
                refs, state = self.saving.pop(version)
                saved = self.system.learners.get(refs, "save_checkpoint")
                self.checkpoints.commit(state, saved, self.system.learners)  # jsonl lines are written unbuffered
            written.append(record)
        return written

    # -- helpers -----------------------------------------------------------------------------
    def tally(self, counts: dict) -> None:
        """Add to the run's totals and to the window the next learner step reports."""
        self.done.counts.update(counts)
        self.window_counts.update(counts)

    @staticmethod
    def _log(writer, *records: dict) -> None:
        for record in records if writer is not None else ():
            writer.write(record)

    def queue_depths(self) -> dict:
        return {**self.inflight.depths(), "queue/ready_groups": len(self.stream.ready),
                "queue/requeued_groups": self.elastic.waiting(), "generators/ready": len(self.system.generators.ready())}

    def finish(self) -> None:
        """Let spare work drain (the generators serve evaluation next) and collect the last spans.
        Actors still starting are not waited for (one may wait for a node that never comes)."""
        self.elastic.finishing = True
        while any(w.stage != "join" for w in self.inflight.work):  # only dynamic sampling's spare groups
            if (work := self.inflight.next_done()).stage == "join":
                self.elastic.on_join(work)
            elif work.stage == "manage":  # (the managers' spare groups: until they hold none)
                self.managers.on_report(work)
                self.managers.flush()
        for w in [w for w in self.inflight.work if w.stage == "join"]:
            self.inflight.remove(w)
        if self.checkpoints is not None:  # on object storage: the last checkpoints' uploads
            self.checkpoints.flush(self.system.learners, wait=True)
        self.telemetry.drain()

    def summary(self) -> dict:
        """The GRPO phase's totals for summary.json."""
        return phase_summary(self.done, self.t1 - self.t0, self.system.version, self.r.grpo.max_staleness,
                             self.books.histogram, self.telemetry.utilisation(self.wall0, self.wall1),
                             self.elastic.summary())
