"""Elastic rollout workers: generators come and go while a run goes on, scorers are repaired.

The generator group holds between ``generator.min_actors`` and ``generator.max_actors``
actors and aims at ``target`` (``max_actors`` at the start: it grows whenever the cluster
has room; ``resize`` or ``r1ray scale`` move it). Each generator has a placement group of its
own, so one can be added (its group reserved without waiting: it starts when a node with
room joins, and an autoscaler sees the demand) or removed (after its work in flight is done)
without touching the others.

A generator that dies (its process, or its node) or stops answering is replaced in a new
reservation of its placement group, placed wherever there is room (a lost node's group is not
left for Ray to re-place: cluster/placement.py says why); the groups it was
generating go back to the front of the queue with their admission order, so nothing is lost
or counted twice, and the weight sync in flight stops waiting for it. A new or replaced
generator takes work only once it holds the newest published weights. Scorers are replaced
the same way, and their work goes to another scorer. A learner rank or the reference cannot be
replaced within a step: their loss stops the run, naming them (``--resume`` continues it).

``vllm`` generators receive weights over a collective whose members are fixed when it is
formed (learner rank 0 and every vLLM worker). The group is formed again, on a fresh port,
by the first weight sync after its membership changed: a generator that started (its engine is
up) joins there and takes work once that sync reached it; one that was lost is left out.
Before each sync learner rank 0 pings the members: when one is gone nothing is sent, no
generator is paused, and the sync is repeated without it (the step's record and the
staleness bound wait for it). A generator lost *during* a transfer may leave the others with
part of the new weights: they are replaced too (their groups re-queued), the weights go to
their replacements. When no train step will publish soon (the learner waits for generators
that wait for weights) the current version is sent again (``resync``). A generator that drains
is left out of the next sync's group, and leaves only once no sync it is a member of is in
flight: stopping a member mid-transfer would break the transfer for every other member.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from ray.exceptions import RayActorError

from ...actors.generator import Generator
from ...actors.scorer import RewardScorer
from ...cluster import transport
from ...cluster.groups import ActorGroup, RemoteCallError, describe
from ...cluster.placement import Bundles
from ..config import Recipe
from .inflight import InFlight, Work
from .system import System, lost_generators

log = logging.getLogger("r1ray")

MAX_FAILED_STARTS = 3  # a slot whose replacement dies this many times in a row stops the run


@dataclass
class Hooks:
    """What the elastic groups ask of the loop they serve."""

    generate: Callable[[list], None]  # send prompt groups to a usable generator (or its rollout manager)
    score: Callable[[list], None]  # send generated groups to a ready scorer
    dropped_rewards: Callable[[], list[str]]  # reward functions the run dropped (a new scorer drops them too)
    tally: Callable[[dict], None]  # add to the run's counts
    retiring: Callable[[int], None] = lambda i: None  # generator i leaves, drained: collect what it still holds


class Elastic:
    """The generator and scorer groups' membership, their lost work (re-queued here and sent
    again first) and the weight syncs that bring generators in."""

    def __init__(self, system: System, inflight: InFlight, recipe: Recipe, per_request: int, hooks: Hooks):
        self.system, self.inflight, self.r, self.per_request, self.hooks = system, inflight, recipe, per_request, hooks
        self.min, self.max = recipe.generator.actor_range()
        self.target = self.max
        self.draining: set[int] = set()  # generators that take no new work and go once idle
        self.failed_starts: Counter = Counter()  # (group, slot) -> replacements that died before joining
        self.counts: Counter = Counter()
        self.control = None  # the run's RunControl actor (``r1ray scale``), polled every heartbeat
        self.polled = 0.0
        # vllm generators: started ones waiting for a sync to bring them into the transfer group
        # (slot -> incarnation); each sync's members (slot, incarnation); syncs that delivered nothing
        self.awaiting: dict[int, int] = {}
        self.syncs: dict[Work, list[tuple[int, int]]] = {}
        self.undelivered: set[Work] = set()
        self.requeued: list = []  # groups whose generator was lost: generated again first, in admission order
        self.rescore: list = []  # groups whose scorer was lost (or none was ready): scored again
        self.finishing = False  # after the last step: lost spare work is not redone
        for group in self.groups():
            group.elastic = True

    def groups(self) -> list[ActorGroup]:
        return [self.system.scorers, self.system.generators]

    # -- the generator group's size ----------------------------------------------------------
    def active(self) -> list[int]:
        gens = self.system.generators
        return [i for i, st in enumerate(gens.state) if st in ("ready", "starting") and i not in self.draining]

    def usable(self) -> list[int]:
        """Generators that may take new work."""
        ready = self.system.generators.ready()
        return [i for i in ready if i not in self.draining] if self.draining else ready

    def resize(self, n: int) -> int:
        """Aim the generator group at ``n`` actors (clamped to min/max); returns the target."""
        clamped = max(self.min, min(self.max, int(n)))
        if clamped != n:
            log.warning("generator group: %d asked, kept within generator.min_actors=%d / max_actors=%d: %d",
                        n, self.min, self.max, clamped)
        if clamped != self.target:
            log.info("generator group: target %d -> %d actors", self.target, clamped)
        self.target = clamped
        self.reconcile()
        return clamped

    def reconcile(self) -> None:
        """Add or drain generators until the active ones match the target."""
        gens, placement = self.system.generators, self.system.placement
        active = self.active()
        while len(active) < self.target:
            revived = next((i for i in sorted(self.draining) if gens.state[i] == "ready"), None)
            if revived is not None:  # undo a drain before adding
                self.draining.discard(revived)
            else:
                i = len(gens)
                plan = Bundles(f"generator-{i}", strategy="STRICT_PACK")
                plan.add(f"generator-{i}", self.r.generator.cpus_per_actor, self.r.generator.gpus_per_actor)
                placement.add(plan)
                j, ping = gens.add()
                self.join(gens, j, ping)
                self.counts["generators/added"] += 1
                log.info("generator group: generator-%d added (placement group reserved; it joins when placed)", j)
            active = self.active()
        for i in sorted(active, reverse=True)[: max(0, len(active) - self.target)]:
            if gens.state[i] == "starting" and not self.in_sync(i):
                self.drop_slot(i)
            else:
                self.draining.add(i)
                log.info("generator group: generator-%d drains (no new work) and leaves", i)
        self.retire_drained()

    def retire_drained(self) -> None:
        """Remove the draining generators that have no work and take part in no sync."""
        for i in sorted(self.draining):
            if not self.inflight.of_actor("generate", i) and not self.in_sync(i):
                self.draining.discard(i)
                self.hooks.retiring(i)
                self.drop_slot(i)
                self.counts["generators/removed"] += 1
                log.info("generator group: generator-%d removed", i)

    def drop_slot(self, i: int) -> None:
        self.awaiting.pop(i, None)
        for w in [w for w in self.inflight.work if w.stage == "join" and w.actor == i]:
            self.inflight.remove(w)
        self.system.generators.retire(i)
        self.system.placement.release(f"generator-{i}")

    # -- joining -----------------------------------------------------------------------------
    def join(self, group: ActorGroup, i: int, ref, version: int = -1) -> None:
        """Watch a starting actor: the driver hears back when its constructor is done (``ref``
        its first ping, ``version`` -1) or when it loaded the weights of ``version``."""
        self.inflight.submit(Work("join", [ref], actor=i, who=[group.name_of(i)], version=version,
                                    groups=[group.name]))

    def on_join(self, work: Work) -> None:
        """A starting actor answered (``version`` -1), or a generator loaded weights."""
        group, i = self._group_of(work), work.actor
        if group.state[i] != "starting":
            return
        if group is self.system.scorers:
            for reward in self.hooks.dropped_rewards():
                group.call(i, RewardScorer.drop, reward, control=True)
            self.ready(group, i)
            return
        if self.system.streams_weights and self.system.learners is not None:
            # its engine is up: the next weight sync brings it in
            self.awaiting[i] = group.incarnation[i]
            log.info("%s started: it takes work once the next weight sync reaches it", group.name_of(i))
            return
        version, weights = self.system.weights
        if weights is None or work.version == version:  # nothing published since the start: it has them
            self.ready(group, i)
            return
        # the newest published weights first (a sync may publish newer ones meanwhile: then again)
        self.join(group, i, group.call(i, Generator.load_weights, weights, version, control=True), version)

    def ready(self, group: ActorGroup, i: int) -> None:
        group.mark_ready(i)
        self.failed_starts.pop((group.name, i), None)
        log.info("%s joined%s", group.name_of(i),
                 f" at policy version {self.system.weights[0]}" if group is self.system.generators else "")
        self.flush_requeued()

    # -- lost work ---------------------------------------------------------------------------
    def requeue_work(self, work: Work) -> None:
        """The work of a lost actor: its groups are generated (or scored) again."""
        if self.finishing:  # spare work after the last step: nothing to redo
            return
        if work.stage == "generate":
            self.requeued = sorted(self.requeued + work.groups, key=lambda g: g.seq)
            self.hooks.tally({"groups/requeued": len(work.groups)})
        elif work.stage == "score":
            self.rescore += work.groups
            self.hooks.tally({"groups/rescored": len(work.groups)})
        self.flush_requeued()

    def flush_requeued(self) -> None:
        """Send re-queued groups to the generators and scorers that can take them."""
        while self.requeued and self.room():
            groups, self.requeued = self.requeued[: self.per_request], self.requeued[self.per_request :]
            self.hooks.generate(groups)
        if self.rescore and self.system.scorers.ready():
            groups, self.rescore = self.rescore, []
            self.hooks.score(groups)

    def room(self) -> bool:
        """Whether a usable generator may take another generate call. A vLLM generator takes
        at most ``generator.max_requests`` at once (its actor's concurrency: more would wait in
        its queue); held here instead, they go to whichever generator has room first, a
        replacement that joins included, not all to the first one up after a loss."""
        usable = self.usable()
        if not usable:
            return False
        if not self.system.batches_requests:
            return True
        load = self.inflight.load("generate", len(self.system.generators))
        return min(map(load.__getitem__, usable)) < self.system.generator_calls

    def waiting(self) -> int:
        """Groups re-queued, not yet sent again."""
        return len(self.requeued) + len(self.rescore)

    # -- weight syncs of vllm generators -----------------------------------------------------
    def transfer_members(self) -> list[int]:
        """The generators the next sync sends to: the ready ones and those waiting to join,
        less those that drain (whatever they still generate ends on the weights they hold)."""
        gens = self.system.generators
        members = gens.ready() + [i for i, inc in self.awaiting.items()
                                  if gens.state[i] == "starting" and gens.incarnation[i] == inc]
        return sorted(i for i in members if i not in self.draining)

    def in_sync(self, i: int) -> bool:
        """Whether generator ``i`` is a member of a weight sync still in flight."""
        member = (i, self.system.generators.incarnation[i])
        return any(member in members for work, members in self.syncs.items() if work in self.inflight.work)

    def publish(self, new_version: bool = True) -> Work:
        """Queue a weight sync (a new version, or the current one again) and watch it."""
        gens = self.system.generators
        members = self.transfer_members() if self.system.streams_weights else None
        forms = members is not None and members != self.system.transfer_members
        version, refs = self.system.publish_weights(members=members, new_version=new_version)
        # Every learner rank takes part (ZeRO-3 gathers), though only rank 0 sends: all are watched.
        who = self.system.learners.names() + (gens.names() if members is None else [gens.name_of(i) for i in members])
        work = self.inflight.submit(Work("sync", refs, version=version, who=who))
        if forms:  # forming the group (engines' rendezvous) is not what a sync's pace measures
            self.inflight.extend(work, work.started + self.r.ray.call_timeout_s)
        if self.r.generator.pause_mode == "wait" and self.system.batches_requests:
            # Each engine first lets the sequences it runs reach their end: the sync is queued
            # behind its generators' generate calls (minutes of a 16K-token tail), which a
            # sync's pace does not measure. It gets what they may take, then its own budget.
            chosen = None if members is None else set(members)
            ahead = [w.deadline for w in self.inflight.work
                     if w.stage == "generate" and (chosen is None or w.actor in chosen)]
            if ahead:
                self.inflight.extend(work, max(max(ahead) + work.deadline - work.started,
                                               work.started + self.r.ray.call_timeout_s))
        self.syncs[work] = [(i, gens.incarnation[i]) for i in members or []]
        return work

    def resync(self, training: bool, confirmed: int) -> None:
        """Send the current weights again when generators wait for them (or hold older ones
        than the published ``confirmed`` after a sync that delivered nothing) and no train step
        (``training``) is queued to publish newer ones."""
        if not self.system.streams_weights or training or self.inflight.stages["sync"]:
            return
        if confirmed < self.system.version or any(
                i in self.transfer_members() for i in self.awaiting):
            work = self.publish(new_version=False)
            log.info("weights of version %d sent again, to %s (no train step is coming to publish newer ones)",
                     work.version, ", ".join(self.system.generators.name_of(i) for i, _ in self.syncs[work])
                     or "no generator")

    def synced(self, work: Work) -> bool:
        """A sync finished: True when the weights reached its generators (those that waited to
        join are ready now); False when they reached none (see the module's note)."""
        gens = self.system.generators
        members = self.syncs.pop(work, [])
        self.retire_drained()  # (those that waited for this sync to end)
        if work in self.undelivered:
            self.undelivered.discard(work)
            return False
        if lost := lost_generators(work.value or []):
            log.warning("weight sync of version %d: %s did not answer a ping; nothing was sent, it is sent again "
                        "without them", work.version, ", ".join(lost))
            self.system.transfer_members = None
            for i, inc in members:
                if gens.name_of(i) in lost and gens.incarnation[i] == inc:
                    self.actor_lost(gens, i, "did not answer a ping before a weight sync")
            return False
        for i, inc in members:
            if self.awaiting.get(i) == inc and gens.incarnation[i] == inc and gens.state[i] == "starting":
                del self.awaiting[i]
                self.ready(gens, i)
        return True

    def transfer_broken(self, work: Work, ref, error: BaseException) -> bool:
        """Learner rank 0's transfer failed: True when a generator of it was lost (then every
        member that may hold part of the weights is replaced), False to stop the run."""
        gens = self.system.generators
        members = [(i, inc) for i, inc in self.syncs.get(work, []) if gens.incarnation[i] == inc and gens.state[i] != "gone"]
        gone = {i for i, inc in self.syncs.get(work, []) if (i, inc) not in members}
        gone |= set(self.silent(gens, [i for i, _ in members]))
        if not gone or self.system.learners.probe(self.system.watchdog.timeout_s):
            return False  # no generator was lost (or a learner rank was): not a loss to repair here
        names = ", ".join(gens.name_of(i) for i in sorted(gone))
        log.warning("weight sync of version %d failed with %s gone (%s); the generators that took part may hold part "
                    "of the weights: they are replaced too", work.version, names, describe(error))
        for i, _ in members:
            self.actor_lost(gens, i, "died during a weight sync" if i in gone else f"took part in a weight sync that "
                            f"{names} broke", lost=i in gone)
        self.system.transfer_members = None
        self.undelivered.add(work)
        work.drop(ref)
        return True

    def silent(self, group: ActorGroup, slots: list[int]) -> list[int]:
        """Those of ``slots`` that do not answer a ping (dead, hung, or a vLLM engine that died
        inside a live actor), within the liveness timeout."""
        return group.silent(slots, min(30.0, self.system.watchdog.timeout_s))

    # -- losses ------------------------------------------------------------------------------
    def actor_lost(self, group: ActorGroup, i: int, why: str, lost: bool = True) -> None:
        """A dead or hung actor of an elastic group (watchdog): replace it, re-queue its work.
        ``lost=False``: a live actor replaced for the group's sake (not counted as lost)."""
        if group.state[i] == "gone":
            return
        was = group.state[i]
        self.counts[f"{group.name}/lost" if lost else f"{group.name}/replaced"] += 1
        log.warning("%s %s: %s", group.name_of(i), why, "replacing it" if i not in self.draining else "removed")
        for w in [w for w in self.inflight.work if i == w.actor and w.stage in ("generate", "score", "join")
                  and self._group_of(w) is group]:
            self.inflight.remove(w)
            self.requeue_work(w)
        for w in [w for w in self.inflight.work if w.stage == "sync"]:  # stop waiting for its weights
            for ref in [r for r in w.pending if group.owner(r) == group.name_of(i)]:
                w.drop(ref)
        if group is self.system.generators and i in self.draining:
            self.draining.discard(i)
            self.drop_slot(i)
            return
        if was == "starting" and lost:
            self.failed_starts[(group.name, i)] += 1
            if self.failed_starts[(group.name, i)] >= MAX_FAILED_STARTS:
                raise RemoteCallError(f"{group.name_of(i)}: {MAX_FAILED_STARTS} replacements in a row died before "
                                      f"they could take work (last: {why}); the actor cannot start here")
        self.counts[f"{group.name}/restarted"] += 1
        self.restart(group, i)

    def restart(self, group: ActorGroup, i: int) -> None:
        """A new actor in slot ``i``, in a new reservation of its placement group: the old one
        may be on a node that died, which Ray would re-place only by busy-looping (see
        cluster/placement.py); where its node lives, the new one is placed at once."""
        if group is self.system.generators:
            self.awaiting.pop(i, None)
        for w in [w for w in self.inflight.work if w.stage == "join" and w.actor == i and self._group_of(w) is group]:
            self.inflight.remove(w)
        self.system.placement.renew(group.name_of(i))
        self.join(group, i, group.restart(i))

    def renew_stranded(self) -> None:
        """Starting actors whose reservation lost its node after they were restarted into it
        (Ray had not yet seen the node die) start again in a new one."""
        starting = {g.name_of(i): (g, i) for g in self.groups() for i, st in enumerate(g.state) if st == "starting"}
        if not starting:
            return
        for name in self.system.placement.rescheduling(list(starting)):
            log.warning("%s: its placement group lost its node before it started; reserving it again", name)
            self.restart(*starting[name])

    def work_lost(self, work: Work, ref, error: BaseException) -> bool:
        """A ref of ``work`` failed: True when its actor was elastic and is lost (dead, or alive
        with a dead vLLM engine: replaced, the work re-queued or the ref dropped) or when a lost
        generator broke a vllm weight sync (``transfer_broken``); False to stop the run."""
        if work.stage == "sync" and self.system.streams_weights and self.system.learners.owner(ref) is not None:
            return self.transfer_broken(work, ref, error)
        group = self._group_of(work, ref)
        if group is None or not group.elastic:
            return False
        if not isinstance(error, RayActorError):
            # the actor lives but raised: lost only if it is unhealthy (a dead vLLM engine), else a bug
            i, incarnation = group.slot_of(ref) or (work.actor, group.incarnation[work.actor])
            if work.stage not in ("generate", "score"):
                return False
            current = incarnation == group.incarnation[i] and group.state[i] != "gone"
            if current and not self.silent(group, [i]):
                return False
            if work in self.inflight.work:
                self.inflight.remove(work)
                self.requeue_work(work)
            if current:
                self.actor_lost(group, i, f"raised {describe(error)} and fails its pings")
            return True
        i, incarnation = group.slot_of(ref) or (work.actor, group.incarnation[work.actor])
        if work.stage == "sync":
            work.drop(ref)
        if incarnation != group.incarnation[i] or group.state[i] == "gone":  # that actor was already replaced
            if work.stage in ("generate", "score") and work in self.inflight.work:
                self.inflight.remove(work)
                self.requeue_work(work)
            return True
        self.actor_lost(group, i, f"died ({describe(error)})")
        return True

    def _group_of(self, work: Work, ref=None) -> ActorGroup | None:
        if work.stage == "join":
            return self.system.generators if work.groups[0] == self.system.generators.name else self.system.scorers
        if work.stage == "generate":
            return self.system.generators
        if work.stage == "score":
            return self.system.scorers
        if work.stage == "sync" and ref is not None and self.system.generators.owner(ref):
            return self.system.generators
        return None

    # -- resize by hand ----------------------------------------------------------------------
    def heartbeat(self, every_s: float) -> None:
        """At most every ``every_s``: stranded reservations, then the run's RunControl actor."""
        now = transport.now()
        if now - self.polled < every_s:
            return
        self.polled = now
        self.renew_stranded()
        if self.control is not None:
            self.poll_control()

    def poll_control(self) -> None:
        """Read the run's RunControl actor (``r1ray scale``): resize, and report the group."""
        import ray

        try:
            wanted = ray.get(self.control.generators.remote(), timeout=5)
        except Exception as e:  # noqa: BLE001 - a missing control actor must not stop training
            log.warning("run control actor did not answer (%s): resizing by hand is off", describe(e))
            self.control = None
            return
        if wanted is not None and wanted != self.target:
            self.resize(wanted)
        self.control.report.remote(self.summary())

    def counts_summary(self) -> dict:
        """What happened to the groups' actors: lost, restarted, added, removed."""
        return dict(self.counts)

    def summary(self) -> dict:
        gens = self.system.generators
        return {"target": self.target, "ready": len(gens.ready()), "slots": len(gens), **self.counts}
