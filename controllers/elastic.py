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
the same way, and their work goes to another scorer. A learner rank, the reference or a
generator of the ``vllm`` backend (its weight-transfer group has a fixed size) cannot be
replaced within a step: their loss stops the run, naming them (``--resume`` continues it).
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from typing import TYPE_CHECKING

from ..cluster.groups import ActorGroup, RemoteCallError, describe
from ..cluster.placement import Bundles
from .inflight import Work

if TYPE_CHECKING:
    from .grpo import GrpoDriver

log = logging.getLogger("r1ray")

MAX_FAILED_STARTS = 3  # a slot whose replacement dies this many times in a row stops the run


class Elastic:
    def __init__(self, driver: "GrpoDriver"):
        self.d, self.system = driver, driver.system
        g = driver.r.generator
        self.min, self.max = g.min_actors or g.num_actors, g.max_actors or g.num_actors
        self.target = self.max
        self.draining: set[int] = set()  # generators that take no new work and go once idle
        self.failed_starts: Counter = Counter()  # (group, slot) -> replacements that died before joining
        self.counts: Counter = Counter()
        self.control = None  # the run's RunControl actor (``r1ray scale``), polled every heartbeat
        self.polled = 0.0
        for group in self.groups():
            group.elastic = True

    def groups(self) -> list[ActorGroup]:
        elastic = [self.system.scorers]
        if not self.system.streams_weights:
            elastic.append(self.system.generators)
        return elastic

    # -- the generator group's size ----------------------------------------------------------
    def active(self) -> list[int]:
        gens = self.system.generators
        return [i for i, st in enumerate(gens.state) if st in ("ready", "starting") and i not in self.draining]

    def usable(self) -> list[int]:
        """Generators that may take new work."""
        return [i for i in self.system.generators.ready() if i not in self.draining]

    def resize(self, n: int) -> int:
        """Aim the generator group at ``n`` actors (clamped to min/max: for the vllm backend both
        are num_actors, its weight-transfer group's fixed size); returns the target."""
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
        if self.system.streams_weights:
            return
        gens, placement = self.system.generators, self.system.placement
        active = self.active()
        while len(active) < self.target:
            revived = next((i for i in sorted(self.draining) if gens.state[i] == "ready"), None)
            if revived is not None:  # undo a drain before adding
                self.draining.discard(revived)
            else:
                i = len(gens)
                plan = Bundles(f"generator-{i}", strategy="STRICT_PACK")
                plan.add(f"generator-{i}", self.d.r.generator.cpus_per_actor, self.d.r.generator.gpus_per_actor)
                placement.add(plan)
                j, ping = gens.add()
                self.join(gens, j, ping)
                self.counts["generators/added"] += 1
                log.info("generator group: generator-%d added (placement group reserved; it joins when placed)", j)
            active = self.active()
        for i in sorted(active, reverse=True)[: max(0, len(active) - self.target)]:
            if gens.state[i] == "starting":
                self.drop_slot(i)
            else:
                self.draining.add(i)
                log.info("generator group: generator-%d drains (no new work) and leaves", i)
        self.retire_drained()

    def retire_drained(self) -> None:
        for i in sorted(self.draining):
            if not self.d.inflight.of_actor("generate", i):
                self.draining.discard(i)
                self.drop_slot(i)
                self.counts["generators/removed"] += 1
                log.info("generator group: generator-%d removed", i)

    def drop_slot(self, i: int) -> None:
        for w in [w for w in self.d.inflight.work if w.stage == "join" and w.actor == i]:
            self.d.inflight.remove(w)
        self.system.generators.retire(i)
        self.system.placement.release(f"generator-{i}")

    # -- joining -----------------------------------------------------------------------------
    def join(self, group: ActorGroup, i: int, ref, version: int = -1) -> None:
        """Watch a starting actor: the driver hears back when its constructor is done (``ref``
        its first ping, ``version`` -1) or when it loaded the weights of ``version``."""
        self.d.inflight.submit(Work("join", [ref], actor=i, who=[group.name_of(i)], version=version,
                                    groups=[group.name]))

    def on_join(self, work: Work) -> None:
        """A starting actor answered (``version`` -1), or a generator loaded weights."""
        group, i = self._group_of(work), work.actor
        if group.state[i] != "starting":
            return
        if group is self.system.scorers:
            for reward in self.d.dropped_rewards():
                group.call(i, "drop", reward, control=True)
            self.ready(group, i)
            return
        version, weights = self.system.weights
        if weights is None or work.version == version:  # nothing published since the start: it has them
            self.ready(group, i)
            return
        # the newest published weights first (a sync may publish newer ones meanwhile: then again)
        self.join(group, i, group.call(i, "load_weights", weights, version, control=True), version)

    def ready(self, group: ActorGroup, i: int) -> None:
        group.mark_ready(i)
        self.failed_starts.pop((group.name, i), None)
        log.info("%s joined%s", group.name_of(i),
                 f" at policy version {self.system.weights[0]}" if group is self.system.generators else "")
        self.d.flush_requeued()

    # -- losses ------------------------------------------------------------------------------
    def actor_lost(self, group: ActorGroup, i: int, why: str) -> None:
        """A dead or hung actor of an elastic group (watchdog): replace it, re-queue its work."""
        if group.state[i] == "gone":
            return
        was = group.state[i]
        self.counts[f"{group.name}/lost"] += 1
        log.warning("%s %s: %s", group.name_of(i), why, "replacing it" if i not in self.draining else "removed")
        for w in [w for w in self.d.inflight.work if i == w.actor and w.stage in ("generate", "score", "join")
                  and self._group_of(w) is group]:
            self.d.inflight.remove(w)
            self.d.requeue_work(w)
        for w in [w for w in self.d.inflight.work if w.stage == "sync"]:  # stop waiting for its weights
            for ref in [r for r in w.pending if group.owner(r) == group.name_of(i)]:
                w.drop(ref)
        if group is self.system.generators and i in self.draining:
            self.draining.discard(i)
            self.drop_slot(i)
            return
        if was == "starting":
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
        for w in [w for w in self.d.inflight.work if w.stage == "join" and w.actor == i and self._group_of(w) is group]:
            self.d.inflight.remove(w)
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
        """A ref of ``work`` failed because its actor died: True when that actor was elastic
        (replaced, the work re-queued or the ref dropped), False to stop the run."""
        group = self._group_of(work, ref)
        if group is None or not group.elastic:
            return False
        i, incarnation = group.slot_of(ref) or (work.actor, group.incarnation[work.actor])
        if work.stage == "sync":
            work.drop(ref)
        if incarnation != group.incarnation[i] or group.state[i] == "gone":  # that actor was already replaced
            if work.stage in ("generate", "score") and work in self.d.inflight.work:
                self.d.inflight.remove(work)
                self.d.requeue_work(work)
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
        now = time.monotonic()
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

    def summary(self) -> dict:
        gens = self.system.generators
        return {"target": self.target, "ready": len(gens.ready()), "slots": len(gens), **self.counts}
