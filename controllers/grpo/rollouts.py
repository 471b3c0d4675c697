"""The rollout side of the GRPO loop: prompt groups admitted under the staleness bound, then
generated, scored, (when the KL weight is on) given reference log-probs and (with a teacher)
the teacher's log-probs, both at once, and held until the learner takes them, in admission
order."""
from __future__ import annotations

from ...actors.generator import Generator
from ...actors.learner import LearnerRank
from ...actors.reference import Reference
from ...actors.rollout import TrainSample
from ...actors.scorer import RewardScorer
from ..common.data import EpochSampler, PreparedData, PromptRenderer
from ..common.elastic import Elastic
from ..common.inflight import InFlight, Work
from ..common.system import System
from ..config import Recipe
from .groups import DynamicSampling, Group, attach
from .reward_book import RewardBook
from .staleness import StalenessManager


class RolloutStream:
    """Each ``on_*`` takes one finished piece of work and sends the next stage off; groups that
    are done wait in ``ready`` until ``take_batch``. ``tally`` counts what happened."""

    def __init__(self, system: System, recipe: Recipe, data: PreparedData, renderer: PromptRenderer,
                 books: StalenessManager, inflight: InFlight, rewards: RewardBook, tally, taken: int = 0):
        self.system, self.r, self.train, self.renderer = system, recipe, data.train, renderer
        self.books, self.inflight, self.rewards, self.tally = books, inflight, rewards, tally
        g = recipe.grpo
        self.G = g.num_generations
        # vLLM: one group per call, so each returns the moment its G completions are done.
        self.per_request = g.groups_per_request or (
            1 if system.batches_requests else max(1, g.prompts_per_step // len(system.generators)))
        self.sampler = EpochSampler(len(data.train), recipe.seed, data.train_rows)
        if taken:
            self.sampler.seek(taken)  # a resumed run: the same data order from where it stopped
        self.filter = DynamicSampling(g.dynamic_sampling, g.prompts_per_step)
        self.ready: dict[int, Group] = {}  # seq -> a group that may be consumed
        self.parts: dict[int, int] = {}  # seq -> log-prob parts (reference, teacher) still to come
        self.elastic: Elastic | None = None  # set by the driver: its generators, and the groups to redo

    def admit(self) -> None:
        """Start as many groups as the staleness bound allows, ``per_request`` per generate call;
        groups whose generator was lost go first, in admission order."""
        if not self.elastic.usable():
            return  # every generator is starting: their groups wait
        self.elastic.flush_requeued()
        while self.books.may_admit():
            groups = []
            while self.books.may_admit() and len(groups) < self.per_request:
                idx, pid = self.sampler.take(1)[0]
                seq, at = self.books.admit()
                groups.append(Group(seq, self.renderer.prompt(self.train[idx], pid), at))
            self.generate(groups)

    def generate(self, groups: list[Group]) -> None:
        i = self.inflight.pick("generate", len(self.system.generators), self.elastic.usable())
        ref = self.system.generators.call(i, Generator.generate, [g.prompt for g in groups], self.G, self.r.sampling,
                                          False, self.r.grpo.partial_rollout_tokens)
        self.inflight.submit(Work("generate", [ref], groups, actor=i))

    def on_generated(self, work: Work) -> None:
        attach(work.groups, work.value, self.G)
        if not self.system.scorers.ready():  # every scorer is being replaced
            self.elastic.rescore += work.groups
            return
        self.score(work.groups)

    def score(self, groups: list[Group]) -> None:
        j = self.inflight.pick("score", len(self.system.scorers), self.system.scorers.ready())
        rollouts = [r for g in groups for r in g.rollouts]
        self.inflight.submit(Work("score", [self.system.scorers.call(j, RewardScorer.score, rollouts)], groups, actor=j))

    def on_scored(self, work: Work) -> None:
        scores = work.value  # only numbers come back: they go onto the driver's rollouts
        scores.apply([r for g in work.groups for r in g.rollouts])
        self.rewards.add(scores.stats)
        kept = [g for g in work.groups if self._keep(g)]
        if not kept:
            return
        samples = [TrainSample.of(r) for g in kept for r in g.rollouts]
        parts = []
        if self.system.reference is not None:
            parts.append(Work("reference", [self.system.reference.call(0, Reference.logprobs, samples)], kept, actor=0))
        elif self.r.reference_on_learner:  # LoRA: the learner ranks, adapters off, between train steps
            parts.append(Work("reference", self.system.learners.shard(LearnerRank.reference_logprobs, samples), kept,
                              queue="learner"))
        if self.system.teacher is not None:  # on-policy distillation: beside the reference, not after it
            k = self.inflight.pick("teacher", len(self.system.teacher), self.system.teacher.ready())
            parts.append(Work("teacher", [self.system.teacher.call(k, Reference.logprobs, samples)], kept, actor=k))
        if not parts:
            self._ready(kept)
            return
        for g in kept:
            self.parts[g.seq] = len(parts)
        for part in parts:
            self.inflight.submit(part)

    def on_referenced(self, work: Work) -> None:
        for r, lp in zip((r for g in work.groups for r in g.rollouts), work.value):
            r.ref_logprobs = lp
        self._part_done(work.groups)

    def on_taught(self, work: Work) -> None:
        """The teacher's log-probs of the groups' sampled tokens."""
        for r, lp in zip((r for g in work.groups for r in g.rollouts), work.value):
            r.teacher_logprobs = lp
        self._part_done(work.groups)

    def _part_done(self, groups: list[Group]) -> None:
        """One log-prob part of ``groups`` arrived; those with every part go to ``ready``."""
        done = []
        for g in groups:
            self.parts[g.seq] -= 1
            if not self.parts[g.seq]:
                del self.parts[g.seq]
                done.append(g)
        self._ready(done)

    def take_batch(self) -> list[Group] | None:
        """The next batch (the next B useful groups in admission order), or None while it is not complete."""
        seqs = self.books.next_batch()
        return None if seqs is None else [self.ready.pop(s) for s in seqs]

    def _keep(self, g: Group) -> bool:
        """False when dynamic sampling drops the group (then admission may start another)."""
        if self.filter.keep(g):
            return True
        self.books.drop(g.seq)
        self.tally({"groups/dropped": 1})
        return False

    def _ready(self, groups: list[Group]) -> None:
        for g in groups:
            self.books.ready(g.seq)
            self.ready[g.seq] = g
