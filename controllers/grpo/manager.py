"""Rollout managers (``grpo.rollout_managers``): the per-group work of the rollouts off the one driver.

At hundreds of generators one driver that every group passes through makes three Ray calls a
group (generate, score, reference) and runs the chain's Python for each: about a tenth of a
step at 256 generators (``benchmarks/simulate.py overhead``). A rollout manager runs that chain
(``rollouts.Chain``: generate -> score -> dynamic sampling -> reference / teacher log-probs) for
the groups the driver hands it, on generators ``i`` with ``i % managers == its index``, with its
own table of work in flight; the driver keeps admission, the staleness bound, batches, the
learner, weight syncs and the generators' membership (``Elastic``).

The driver and a manager talk through ``RolloutManager.step``, at most one in flight per
manager: it carries the groups admitted since the last one (each with the generator the
driver picked; those admitted while a step is in flight go with ``submit``, which the step
takes within ``ORDERS_S``) and returns what finished meanwhile (``Report``): the generate
calls done (the driver frees their generator's slot), the groups through every stage (rewards
and log-probs on their rollouts), dynamic sampling's drops, reward stats, counts, and lost
work. It answers at once when the last of the groups it holds that the next batch waits for
(``urgent``) is ready, a generate call returned while groups wait in the driver for a
generator with room (``wants_room``), work was lost, or it holds nothing more; else once it
has news and ``grpo.manager_report_s`` passed; else after ``wait_s``. So calls scale with
managers x step seconds / ``manager_report_s``, not with groups.

Losses: a generator that fails under a manager's call is reported with the call's groups; the
driver re-queues them and replaces the generator as before (``Elastic``). A scorer that fails
is reported too: the manager scores its groups again once a scorer is ready, and the driver
replaces the scorer. A manager calls only the generator incarnation the driver picked (a call
whose generator was replaced meanwhile comes back as lost). Work the driver gave up on (its
watchdog found the generator lost first) is ``forget``-ed, and whatever the manager still
reports of it is ignored: no group is consumed twice. A manager that dies stops the run, naming
it, like the reference (``--resume`` continues it).
"""
from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from dataclasses import dataclass, field

from ray.exceptions import RayActorError

from ...cluster import transport
from ...cluster.groups import ActorGroup, RemoteCallError, Watchdog, describe
from ..common.inflight import InFlight, Work
from ..config import Recipe
from .groups import Group
from .reward_book import RewardBook
from .rollouts import Chain

log = logging.getLogger("r1ray")

ORDERS_S = 0.05  # a step call looks for the driver's submits at least this often


@dataclass
class Dispatch:
    """Groups for one generate call on generator ``slot`` as the driver picked it (its
    ``incarnation``: a replacement started since is not the one picked); ``key``: the driver's
    name for the call."""

    key: int
    slot: int
    incarnation: int
    units: list[Group]


@dataclass
class Orders:
    """What the driver sends a manager: groups to generate, keys to forget, what it waits for,
    the groups' membership when it changed since the last orders (else None), and the seconds
    its loop did something else (an evaluation) that its work in flight gets added."""

    dispatch: list[Dispatch] = field(default_factory=list)
    forget: list[int] = field(default_factory=list)
    urgent: int = -1  # the next batch waits for the groups with a seq below it
    wants_room: bool = False  # groups wait in the driver for a generator with room
    groups: dict | None = None
    postpone_s: float = 0.0


@dataclass
class Report:
    """What finished under a manager since its last report."""

    generated: list[int] = field(default_factory=list)  # keys whose generate call returned
    ready: list[tuple[int, Group]] = field(default_factory=list)  # (key, group) through every stage
    dropped: list[tuple[int, int]] = field(default_factory=list)  # (key, seq): dynamic sampling dropped it
    stats: list[dict] = field(default_factory=list)  # each score call's stats
    counts: Counter = field(default_factory=Counter)
    # generate calls that failed: (key, generator, its incarnation, whether it died, the error)
    lost: list[tuple[int, int, int, bool, str]] = field(default_factory=list)
    scorers_lost: list[tuple[int, int, bool, str]] = field(default_factory=list)  # (scorer, incarnation, died, error)

    def news(self) -> bool:
        return bool(self.generated or self.ready or self.dropped or self.lost or self.scorers_lost)


class View:
    """A manager's view of one of the run's groups: its calls, less the actors it saw fail
    (until the driver replaced them: a new incarnation). A newer view of the group keeps what the
    older one saw fail, and its record of the calls in flight (``ActorGroup.slot_of``)."""

    def __init__(self, group: ActorGroup, old: "View | None" = None):
        self.group = group
        self.down: set = old.down if old is not None else set()
        if old is not None and old.group is not group:  # (a run's snapshots; the simulator's groups are shared)
            group.follow(old.group)

    def call(self, i, method, *args, **kwargs):
        return self.group.call(i, method, *args, **kwargs)

    def name_of(self, i: int) -> str:
        return self.group.name_of(i)

    def __len__(self) -> int:
        return len(self.group)

    def incarnation(self, i: int) -> int:
        return self.group.incarnation[i]

    def ready(self) -> list[int]:
        ready = self.group.ready()
        return [i for i in ready if (i, self.group.incarnation[i]) not in self.down] if self.down else ready


class _Groups:
    """The groups the chain calls (the learners never: the manager needs a reference actor)."""

    learners = None

    def __init__(self):
        self.generators = self.scorers = self.reference = self.teacher = None


class RolloutManager:
    """A plain class: the simulator runs it in-process, a run as a Ray actor per ``index``."""

    def __init__(self, recipe: Recipe, index: int = 0, watcher=None):
        self.name = f"rollout-manager-{index}"
        book = RewardBook(recipe, None, lambda counts: None)
        self.inflight = InFlight(Watchdog([], every_s=math.inf), recipe.ray, recipe.grpo.num_generations,
                                 book.score_budget, what=self.name, watcher=watcher)
        self.inflight.on_lost = self._lost
        # Each manager balances by its own calls only: started at the same actor, they would all
        # send their first calls to the same scorer and reference, and go round in step.
        for stage, actors in (("score", recipe.scorer.num_actors), ("reference", recipe.reference.num_actors),
                              ("teacher", recipe.teacher.num_actors)):
            self.inflight.turns[stage] = index * actors // max(1, recipe.grpo.rollout_managers)
        if recipe.generator.backend == "vllm":
            self.inflight.batched.add("generate")
        self.groups = _Groups()
        self.report = Report()
        self.chain = Chain(self.groups, recipe, self.inflight, lambda stats: self.report.stats.append(stats),
                           lambda counts: self.report.counts.update(counts), self._ready, self._drop, self._park)
        self.key_of: dict[int, int] = {}  # id(group) -> its dispatch's key
        self.slot_of: dict[int, tuple[int, int]] = {}  # key -> (generator, incarnation) it was sent to
        self.units: Counter = Counter()  # key -> its groups not yet reported
        self.open: Counter = Counter()  # the seqs of the groups it holds (a requeued one may come twice)
        self.forgotten: set[int] = set()
        self.parked: list = []  # generated while no scorer was ready
        self.orders: list[Orders] = []  # submit's, for the step in progress
        self.lock = threading.Lock()
        self.urgent = -1  # groups with a seq below it: the next batch waits for them
        self.wants_room = False  # groups wait in the driver for a generator with room

    def ping(self) -> str:
        return "ok"

    # -- the driver's calls ------------------------------------------------------------------
    def step(self, orders: Orders, report_s: float, wait_s: float) -> Report:
        """Take ``orders`` (as ``submit``), then wait until there is something to report (see the module)."""
        t0 = transport.now()
        self.submit(orders)
        while True:
            self.take_orders()
            self.pump()
            if self.answers(t0, report_s, wait_s):
                return self.take_report()
            end = t0 + (report_s if self.report.news() else wait_s)
            # (in slices: orders the driver submits meanwhile, on another thread, are taken within one)
            work = self.inflight.next_done(max(0.0, min(ORDERS_S, end - transport.now())))
            if work is not None:
                self.handle(work)

    def submit(self, orders: Orders) -> None:
        """Orders for the ``step`` in progress (the driver's calls while one is)."""
        with self.lock:
            self.orders.append(orders)

    def take_orders(self) -> None:
        with self.lock:
            orders, self.orders = self.orders, []
        for o in orders:
            self.accept(o)

    def accept(self, o: Orders) -> None:
        if o.groups is not None:
            self.set_groups(o.groups)
        if o.postpone_s:
            self.inflight.postpone(o.postpone_s)
        self.urgent, self.wants_room = o.urgent, o.wants_room
        for key in o.forget:
            self._forget(key)
        gens = self.groups.generators
        for d in o.dispatch:
            if gens.incarnation(d.slot) != d.incarnation:
                # replaced (or lost) since the driver picked it: back to the driver, as a lost call's
                self.report.lost.append((d.key, d.slot, d.incarnation, True, "replaced before its call was made"))
                continue
            self.units[d.key] = len(d.units)
            self.slot_of[d.key] = (d.slot, d.incarnation)
            for g in d.units:
                self.key_of[id(g)] = d.key
                self.open[g.seq] += 1
            self.chain.generate(d.units, d.slot)

    def set_groups(self, groups: dict) -> None:
        """The run's groups as they are now (``generators``, ``scorers``, ``reference``, ``teacher``)."""
        for name, group in groups.items():
            setattr(self.groups, name, None if group is None else View(group, getattr(self.groups, name)))

    def pump(self) -> None:
        """Deal with every piece of work done by now (no waiting)."""
        if self.parked and self.groups.scorers.ready():
            parked, self.parked = self.parked, []
            self.chain.score(parked)
        while (work := self.inflight.next_done(0.0)) is not None:
            self.handle(work)

    def handle(self, work: Work) -> None:
        if work.stage == "generate":
            key = self.key_of.get(id(work.groups[0]))
            if key in self.forgotten:  # the driver sent its groups again elsewhere
                for g in work.groups:
                    self._done(g)
                return
            if key is not None:
                self.report.generated.append(key)
        self.chain.on_done(work)

    def answers(self, t0: float, report_s: float, wait_s: float) -> bool:
        """Whether ``step`` returns now (see the module)."""
        rep, now = self.report, transport.now()
        if rep.lost or rep.scorers_lost or not self.units or now - t0 >= wait_s or self.wants_room and rep.generated:
            return True
        if (any(g.seq < self.urgent for _, g in rep.ready) or any(seq < self.urgent for _, seq in rep.dropped)) and \
                not any(seq < self.urgent for seq in self.open):
            return True  # the last of its groups the next batch waits for
        return rep.news() and now - t0 >= report_s

    def take_report(self) -> Report:
        report, self.report = self.report, Report()
        return report

    # -- the chain's outputs -----------------------------------------------------------------
    def _done(self, group: Group) -> int | None:
        """The key of ``group``'s dispatch, or None when the driver gave it up."""
        key = self.key_of.pop(id(group), None)
        if key is not None:
            self._close(group.seq)
        if key is None or key in self.forgotten:
            return None
        self.units[key] -= 1
        if self.units[key] <= 0:
            del self.units[key]
            self.slot_of.pop(key, None)
        return key

    def _ready(self, groups: list[Group]) -> None:
        for g in groups:
            if (key := self._done(g)) is not None:
                self.report.ready.append((key, g))

    def _drop(self, group: Group) -> None:
        if (key := self._done(group)) is not None:
            self.report.dropped.append((key, group.seq))

    def _park(self, units: list) -> None:
        self.parked += units

    def _close(self, seq: int) -> None:
        self.open[seq] -= 1
        if self.open[seq] <= 0:
            del self.open[seq]

    def _forget(self, key: int) -> None:
        self.units.pop(key, None)
        self.slot_of.pop(key, None)
        self.forgotten.add(key)

    def _lost(self, work: Work, ref, error: BaseException) -> bool:
        """A call of ``work`` failed: a generator's or a scorer's loss is reported (see the
        module); anything else ends the step call with the error."""
        self.inflight.remove(work)
        died, why = isinstance(error, RayActorError), describe(error)
        if work.stage == "generate":
            keys = {self.key_of.pop(id(g), None) for g in work.groups} - {None}
            for g in work.groups:
                self._close(g.seq)
            for key in keys - self.forgotten:
                slot, incarnation = self.slot_of.pop(key)
                del self.units[key]
                self.report.lost.append((key, slot, incarnation, died, why))
            return True
        if work.stage == "score":  # (the incarnation the call went to: a newer one may be in the view now)
            slot, incarnation = self.groups.scorers.group.slot_of(ref) or (work.actor, None)
            self.groups.scorers.down.add((slot, incarnation))
            self.report.scorers_lost.append((slot, incarnation, died, why))
            self._park(work.groups)
            return True
        raise RemoteCallError(f"{self.name}: {work.stage} on {', '.join(work.who)} failed: {describe(error)}") from error


MANY_GENERATORS = 64  # from here on, a run without managers is told about them


def start_managers(system, recipe: Recipe) -> ActorGroup | None:
    """``grpo.rollout_managers`` actors, watched with the run's other actors. No CPU is reserved
    for them (each is mostly waiting); they run on the driver's node where it has room: a node
    that goes takes its generators' work with it, the driver's takes the run anyway. None
    without them (a run of many generators is told they exist)."""
    if not recipe.grpo.rollout_managers:
        if recipe.generator.actor_range()[1] >= MANY_GENERATORS:
            log.info("%d generators and no rollout managers: every group's calls go through the driver; "
                     "grpo.rollout_managers (one per node of 8 generators) takes them off it (docs/cluster.md)",
                     recipe.generator.actor_range()[1])
        return None
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    group = ActorGroup("rollout-manager", RolloutManager, recipe.grpo.rollout_managers, lambda i: ((recipe, i), {}),
                       num_cpus=0, timeout_s=system.timeout, namespace=recipe.ray.namespace,
                       max_concurrency=2,  # (a submit beside the step in progress)
                       scheduling=lambda name: here)
    group.wait_ready()
    group.watchdog = system.watchdog
    system.watchdog.groups.append(group)
    log.info("%d rollout managers up: generator i's groups go through rollout-manager-(i %% %d)", len(group), len(group))
    return group


class Managers:
    """The driver's side: which manager holds which generate call, one ``step`` in flight each."""

    def __init__(self, driver):
        self.d = driver
        self.system, self.inflight, self.stream = driver.system, driver.inflight, driver.stream
        self.group: ActorGroup = driver.system.managers
        self.n = len(self.group)
        g = driver.r.grpo
        self.report_s, self.wait_s = g.manager_report_s, max(g.manager_report_s, driver.r.ray.heartbeat_s)
        self.outbox: list[list[Dispatch]] = [[] for _ in range(self.n)]
        self.forget: list[list[int]] = [[] for _ in range(self.n)]
        self.calling: dict[int, Work] = {}  # manager -> its step call in flight
        self.pending: dict[int, Work] = {}  # key -> the generate work the driver keeps for it, until generated
        self.units: Counter = Counter()  # key -> its groups not yet ready or dropped
        self.holder: dict[int, int] = {}  # key -> manager
        self.held = Counter()  # manager -> keys it holds
        self.seen: list = [None] * self.n  # the groups' membership each manager was last sent
        self.postponed = [0.0] * self.n  # seconds of the driver's loop elsewhere, not yet sent
        self.next_key = 0

    def of_slot(self, i: int) -> int:
        return i % self.n

    def dispatch(self, i: int, units: list) -> None:
        """``units`` for one generate call on generator ``i``, through its manager (sent at ``flush``)."""
        key, m = self.next_key, self.of_slot(i)
        self.next_key += 1
        self.pending[key] = self.inflight.submit(Work("generate", [], units, actor=i, samples=self.stream.size(units),
                                                      who=[self.system.generators.name_of(i)]))
        self.units[key], self.holder[key] = len(units), m
        self.held[m] += 1
        self.outbox[m].append(Dispatch(key, i, self.system.generators.incarnation[i], units))

    def flush(self) -> None:
        """A step call to every manager that has groups to take or holds some, and none in flight."""
        urgent = self.d.books.first_open() + self.d.books.groups_per_step
        wants_room = self.d.books.may_admit() or bool(self.d.elastic.requeued)  # (admit() stopped for room)
        seen = None
        for m in range(self.n):
            if self.outbox[m]:  # (a call re-queued before it was sent: its generator was lost meanwhile)
                self.outbox[m] = [d for d in self.outbox[m] if self._sendable(d.key)]
            if not (self.outbox[m] or self.forget[m] or self.postponed[m] or self.held[m] and m not in self.calling):
                continue
            seen = seen or self.membership()
            orders = Orders(self.outbox[m], self.forget[m], urgent, wants_room, postpone_s=self.postponed[m])
            if seen != self.seen[m]:
                self.seen[m], orders.groups = seen, self.system.manager_views()
            if m in self.calling:  # (not watched: a manager that fails fails its step call too)
                self.group.call(m, RolloutManager.submit, orders)
            else:
                ref = self.group.call(m, RolloutManager.step, orders, self.report_s, self.wait_s)
                self.calling[m] = self.inflight.submit(Work("manage", [ref], actor=m, samples=1,
                                                            who=[self.group.name_of(m)]))
            self.outbox[m], self.forget[m], self.postponed[m] = [], [], 0.0

    def postpone(self, seconds: float) -> None:
        """The driver's loop did something else for ``seconds`` (an evaluation, on the same
        generators): the managers' work in flight gets that much more time, as the driver's does."""
        self.postponed = [x + seconds for x in self.postponed]

    def membership(self) -> tuple:
        gens, scorers = self.system.generators, self.system.scorers
        return tuple(gens.state), tuple(gens.incarnation), tuple(scorers.state), tuple(scorers.incarnation)

    def on_report(self, work: Work) -> None:
        self.calling.pop(work.actor, None)
        rep: Report = work.value
        d, elastic = self.d, self.d.elastic
        for key in rep.generated:
            w = self.pending.pop(key, None)
            if w is not None and w in self.inflight.work:
                self.inflight.finish(w)  # its generator has room again
            elif w is not None:
                self._give_up(key)  # its generator was replaced meanwhile: the groups went back to the queue
        gens, via = self.system.generators, self.group.name_of(work.actor)
        for key, slot, incarnation, died, why in rep.lost:
            w = self.pending.pop(key, None)
            self._resolve(key)
            if w is None or w not in self.inflight.work:
                continue
            current = incarnation == gens.incarnation[slot] and gens.state[slot] != "gone"
            if current and not died and not elastic.silent(gens, [slot]):  # it lives and answers: a bug, not a loss
                raise RemoteCallError(f"GRPO generate on {gens.name_of(slot)} (through {via}): raised {why}")
            self.inflight.remove(w)
            elastic.requeue_work(w)
            if current:  # (else it was replaced already)
                elastic.actor_lost(gens, slot, f"died ({why})" if died else f"raised {why} and fails its pings")
        for key, group in rep.ready:
            if key in self.units:
                self._resolve(key, 1)
                d.stream.on_ready([group])
        for key, seq in rep.dropped:
            if key in self.units:
                self._resolve(key, 1)
                d.books.drop(seq)
        for stats in rep.stats:
            d.rewards.add(stats)
        d.tally({**rep.counts, "managers/reports": 1})
        scorers = self.system.scorers
        for slot, incarnation, died, why in rep.scorers_lost:
            if incarnation != scorers.incarnation[slot] or scorers.state[slot] == "gone":
                continue
            if not died and not elastic.silent(scorers, [slot]):
                raise RemoteCallError(f"GRPO score on {scorers.name_of(slot)} (through {via}): raised {why}")
            elastic.actor_lost(scorers, slot, f"died ({why})" if died else f"raised {why} and fails its pings")

    def _sendable(self, key: int) -> bool:
        if self.pending[key] in self.inflight.work:
            return True
        del self.pending[key]
        self._resolve(key)
        return False

    def _resolve(self, key: int, units: int | None = None) -> None:
        """``units`` of ``key``'s groups are done (None: all of them)."""
        if key not in self.units:
            return
        self.units[key] -= self.units[key] if units is None else units
        if self.units[key] <= 0:
            del self.units[key]
            self.held[self.holder.pop(key)] -= 1

    def _give_up(self, key: int) -> None:
        """The driver re-queued ``key``'s groups: its manager forgets them."""
        if key in self.units:
            self.forget[self.holder[key]].append(key)
            self._resolve(key)
