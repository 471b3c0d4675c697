"""The rollout side of the GRPO loop: prompt groups admitted under the staleness bound, then
generated, scored, (when the KL weight is on) given reference log-probs and (with a teacher)
the teacher's log-probs, both at once, and held until the learner takes them, in admission
order. With ``grpo.completions_per_request`` a group goes through those stages in parts, each
as soon as its completions are done, and is whole again before it is ready."""
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
from .groups import DynamicSampling, Group, Part, attach, split
from .reward_book import RewardBook
from .staleness import StalenessManager


def whole(unit) -> Group:
    """The group of ``unit`` (a group, or a part of one)."""
    return unit.group if isinstance(unit, Part) else unit


STAGES = ("generate", "score", "reference", "teacher")  # the chain's work (Chain.on_done)


class Chain:
    """Generate -> score -> (dynamic sampling) -> reference / teacher log-probs of the units it is
    handed: each ``on_*`` takes one finished piece of work and sends the next stage off. The
    driver runs one (``RolloutStream``); so does each rollout manager (``manager.py``), for the
    groups the driver hands it. What comes out goes to the callbacks: ``on_ready(groups)``
    (every completion through every stage), ``on_drop(group)`` (dynamic sampling dropped it),
    ``add_stats`` (each score call's stats), ``tally`` (counts) and ``park(units)`` (generated
    while no scorer is ready: scored once one is)."""

    def __init__(self, system, recipe: Recipe, inflight: InFlight, add_stats, tally, on_ready, on_drop, park):
        self.system, self.r, self.inflight = system, recipe, inflight
        self.add_stats, self.tally, self.on_ready, self.on_drop, self.park = add_stats, tally, on_ready, on_drop, park
        g = recipe.grpo
        self.G = g.num_generations
        self.split = 0 < g.completions_per_request < self.G
        self.filter = DynamicSampling(g.dynamic_sampling, g.prompts_per_step)
        # id(group) -> completions x log-prob stages (reference, teacher) still to come (by the
        # group, not its seq: a manager may hold a group sent again beside the copy it gave up)
        self.parts: dict[int, int] = {}
        self.scored: dict[int, int] = {}  # id(group) -> completions scored (groups in parts)

    def on_done(self, work: Work) -> None:
        """A finished piece of the chain's work (``stages``): the next stage."""
        {"generate": self.on_generated, "score": self.on_scored, "reference": self.on_referenced,
         "teacher": self.on_taught}[work.stage](work)

    def size(self, units: list) -> int:
        """Completions of ``units`` (groups, or parts of groups)."""
        return sum(u.count if isinstance(u, Part) else self.G for u in units)

    def generate(self, units: list, i: int) -> Work:
        """One generate call for ``units`` (groups, or one part of a group) on generator ``i``."""
        part = units[0] if isinstance(units[0], Part) else None
        n, kw = (part.count, {"first_sample": part.first}) if part else (self.G, {})
        ref = self.system.generators.call(i, Generator.generate, [u.prompt for u in units], n, self.r.sampling,
                                          False, self.r.grpo.partial_rollout_tokens, **kw)
        return self.inflight.submit(Work("generate", [ref], units, actor=i, samples=self.size(units),
                                         who=[self.system.generators.name_of(i)]))

    def on_generated(self, work: Work) -> None:
        attach(work.groups, work.value, self.G)
        if not self.system.scorers.ready():  # every scorer is being replaced
            self.park(work.groups)
            return
        self.score(work.groups)

    def score(self, units: list) -> None:
        j = self.inflight.pick("score", len(self.system.scorers), self.system.scorers.ready())
        rollouts = [r.for_scoring() for u in units for r in u.rollouts]
        self.inflight.submit(Work("score", [self.system.scorers.call(j, RewardScorer.score, rollouts)], units, actor=j,
                                  samples=len(rollouts), who=[self.system.scorers.name_of(j)]))

    def on_scored(self, work: Work) -> None:
        scores = work.value  # only numbers come back: they go onto the driver's rollouts
        scores.apply([r for u in work.groups for r in u.rollouts])
        self.add_stats(scores.stats)
        if self.split and self.filter.on:  # dynamic sampling needs the group's every reward first
            complete = []
            for part in work.groups:
                key = id(part.group)
                self.scored[key] = self.scored.get(key, 0) + part.count
                if self.scored[key] == self.G:
                    del self.scored[key]
                    complete.append(part.group)
            units = complete
        else:
            units = work.groups
        kept = [u for u in units if isinstance(u, Part) or self._keep(u)]
        if kept:
            self.log_probs(kept)

    def log_probs(self, units: list) -> None:
        """The reference's and the teacher's log-probs of ``units``' completions, both at once."""
        # (the tokens only: the log-probs of a forward pass need nothing else)
        samples = [TrainSample(r.prompt_ids, r.completion_ids) for u in units for r in u.rollouts]
        parts, n = [], len(samples)
        if self.system.reference is not None:
            ref = self.system.reference
            k = self.inflight.pick("reference", len(ref), ref.ready())
            parts.append(Work("reference", [ref.call(k, Reference.logprobs, samples)], units, actor=k, samples=n,
                              who=[ref.name_of(k)]))
        elif self.r.reference_on_learner:  # LoRA: the learner ranks, adapters off, between train steps
            parts.append(Work("reference", self.system.learners.shard(LearnerRank.reference_logprobs, samples), units,
                              queue="learner", samples=n))
        if self.system.teacher is not None:  # on-policy distillation: beside the reference, not after it
            k = self.inflight.pick("teacher", len(self.system.teacher), self.system.teacher.ready())
            parts.append(Work("teacher", [self.system.teacher.call(k, Reference.logprobs, samples)], units, actor=k,
                              samples=n, who=[self.system.teacher.name_of(k)]))
        for u in units:  # (a group's first unit sets its count: every completion through every stage)
            self.parts.setdefault(id(whole(u)), self.G * max(1, len(parts)))
        if not parts:
            self._part_done(units)
        for part in parts:
            self.inflight.submit(part)

    def on_referenced(self, work: Work) -> None:
        for r, lp in zip((r for u in work.groups for r in u.rollouts), work.value):
            r.ref_logprobs = lp
        self._part_done(work.groups)

    def on_taught(self, work: Work) -> None:
        """The teacher's log-probs of the units' sampled tokens."""
        for r, lp in zip((r for u in work.groups for r in u.rollouts), work.value):
            r.teacher_logprobs = lp
        self._part_done(work.groups)

    def _part_done(self, units: list) -> None:
        """One log-prob stage of ``units`` arrived (or they need none); groups with every
        completion through every stage go to ``ready``."""
        done = []
        for u in units:
            key = id(whole(u))
            self.parts[key] -= self.size([u])
            if self.parts[key] <= 0:
                del self.parts[key]
                done.append(whole(u))
        self.on_ready(done)

    def _keep(self, g: Group) -> bool:
        """False when dynamic sampling drops the group (then admission may start another)."""
        if self.filter.keep(g):
            return True
        self.on_drop(g)
        self.tally({"groups/dropped": 1})
        return False


class RolloutStream(Chain):
    """The driver's side of the rollouts: prompt groups admitted under the staleness bound, sent
    to a generator (or to the rollout manager of its generator: ``grpo.rollout_managers``), and
    held once ready until ``take_batch``."""

    def __init__(self, system: System, recipe: Recipe, data: PreparedData, renderer: PromptRenderer,
                 books: StalenessManager, inflight: InFlight, rewards: RewardBook, tally, taken: int = 0):
        super().__init__(system, recipe, inflight, rewards.add, tally, self._ready, lambda g: books.drop(g.seq),
                         lambda units: self.elastic.rescore.extend(units))
        self.train, self.renderer, self.books, self.rewards = data.train, renderer, books, rewards
        g = recipe.grpo
        # vLLM: one group per call, so each returns the moment its G completions are done (or one
        # part of a group: completions_per_request).
        self.per_request = g.groups_per_request or (
            1 if system.batches_requests else max(1, g.prompts_per_step // len(system.generators)))
        if self.split:
            self.per_request = 1
        self.sampler = EpochSampler(len(data.train), recipe.seed, data.train_rows)
        if taken:
            self.sampler.seek(taken)  # a resumed run: the same data order from where it stopped
        self.ready: dict[int, Group] = {}  # seq -> a group that may be consumed
        self.elastic: Elastic | None = None  # set by the driver: its generators, and the groups to redo
        self.managers = None  # set by the driver with grpo.rollout_managers: they run the chain

    def admit(self) -> None:
        """Start as many groups as the staleness bound and the generators' room allow,
        ``per_request`` per generate call; groups whose generator was lost go first, in
        admission order."""
        if not self.elastic.usable():
            return  # every generator is starting: their groups wait
        self.elastic.flush_requeued()
        while self.books.may_admit() and self.elastic.room():
            groups = []
            while self.books.may_admit() and len(groups) < self.per_request:
                idx, pid = self.sampler.take(1)[0]
                seq, at = self.books.admit()
                groups.append(Group(seq, self.renderer.prompt(self.train[idx], pid), at))
            if not self.split:
                self.send(groups)
                continue
            for g in groups:
                for part in split(g, self.G, self.r.grpo.completions_per_request):
                    self.send([part])

    def send(self, units: list) -> None:
        """``units`` to the least-loaded usable generator: a generate call, or to the rollout
        manager of that generator."""
        i = self.inflight.pick("generate", len(self.system.generators), self.elastic.usable())
        if self.managers is None:
            self.generate(units, i)
        else:
            self.managers.dispatch(i, units)

    def take_batch(self) -> list[Group] | None:
        """The next batch (the next B useful groups in admission order), or None while it is not complete."""
        seqs = self.books.next_batch()
        return None if seqs is None else [self.ready.pop(s) for s in seqs]

    def _ready(self, groups: list[Group]) -> None:
        for g in groups:
            self.books.ready(g.seq)
            self.ready[g.seq] = g
