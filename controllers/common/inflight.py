"""The driver's work in flight: what each piece waits on, which actors do it, and its deadline.

Ray-free bookkeeping around the refs' completions (a watcher of ``cluster/transport.py``):
``InFlight.next_done`` hands back finished work one piece at a time, while the system's
watchdog pings the actors and work past its deadline ends the run with the actors' names and
what they were doing.
"""
from __future__ import annotations

import bisect
import math
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from ...cluster import transport
from ...cluster.groups import RemoteCallError, Watchdog


@dataclass(eq=False)
class Work:
    """One piece of in-flight work: done when every one of its object refs is."""

    # join: an actor starting; manage: a rollout manager's report (controllers/grpo/manager.py)
    stage: Literal["generate", "score", "reference", "teacher", "train", "sync", "join", "manage"]
    refs: list
    groups: list = field(default_factory=list)  # the prompt groups it carries
    actor: int | None = None  # the generator or scorer doing it (load balancing)
    version: int | None = None  # train: the version it trains at; sync: the version it publishes
    who: list[str] = field(default_factory=list)  # the actors doing it, by name (default: the refs' owners)
    started: float = field(default_factory=transport.now)
    deadline: float = math.inf  # perf_counter time, set by InFlight.submit
    value: Any = None  # the results: a list for train and sync (one per ref), else the one result
    # (or the parts' lists joined: reference log-probs from the learner ranks)
    samples: int | None = None  # completions it carries (default: its groups x the group size)
    # the actors' queue it waits in, when not its stage's on ``actor`` alone: "learner" for the
    # train steps and LoRA's reference log-probs, which the learner ranks run one after another
    queue: str | None = None

    def __post_init__(self):
        self.pending = set(self.refs)
        self.values: dict = {}
        self.flight: InFlight | None = None  # the table that waits for it

    def drop(self, ref) -> None:
        """Stop waiting for ``ref`` (a lost actor's part of a weight sync)."""
        self.pending.discard(ref)
        self.refs.remove(ref)
        if self.flight is not None:
            self.flight._refs.pop(ref, None)
            self.flight._watch.forget([ref])


class InFlight:
    """Deadlines: the work queued ahead on the same actor, then ``ray.deadline_factor`` x the
    slowest seconds per sample seen for the stage x the work's samples (at least
    ``ray.deadline_min_s``); the first work of a stage gets ``ray.call_timeout_s``, and scoring
    ``score_budget(samples)`` (the verifier timeouts bound it).

    Stages in ``batched`` run their calls on an actor at once (vLLM's continuous batching): a
    call's seconds grow with everything else the engine holds, which the rate seen at a lighter
    load does not bound (the first replacement to join after a loss may get a backlog). There
    the engine's progress is the sign of life: each call that finishes gives that actor's other
    calls of the stage their budget again from then."""

    def __init__(self, watchdog: Watchdog, ray_cfg, group_size: int, score_budget: Callable[[int], float],
                 what: str = "GRPO", watcher=None):
        self.dog, self.rc, self.G, self.score_budget, self.what = watchdog, ray_cfg, group_size, score_budget, what
        self.work: dict[Work, None] = {}  # (a dict: ordered, and O(1) to leave)
        self._watch = watcher or transport.watcher()  # the refs' completions, as they come
        self._done: deque = deque()  # refs finished, not yet dealt with
        # Indexes of ``work``, so that a fleet of hundreds of actors with thousands of calls in
        # flight costs the driver O(1) per call: the pending refs (-> their work, in submission
        # order), the work on each queue, the work of each (stage, actor), of each stage, and a
        # lower bound of the deadlines (deadlines are only ever raised after submit).
        self._refs: dict = {}
        self._queues: dict = {}
        self._ends: dict = {}  # queue -> the latest deadline of its work (the next work there starts after it)
        self._load: dict[str, list[int]] = {}  # stage -> work in flight on each actor
        self.stages: Counter = Counter()
        self._soonest = math.inf
        self.rates: dict[str, float] = {}  # stage -> the slowest seconds per sample seen
        self.batched: set[str] = set()  # stages whose calls run at once on their actor (see above)
        self.turns: Counter = Counter()  # stage -> picks so far: round-robin among equally loaded actors
        # (work, ref, error) -> True when the driver dealt with an actor lost under ``ref`` (an
        # elastic group's: the work was re-queued, or ``ref`` dropped from it); else the run stops
        self.on_lost: Callable[[Work, Any, BaseException], bool] | None = None

    def samples(self, w: Work) -> int:
        return w.samples if w.samples is not None else len(w.groups) * self.G

    def budget(self, work: Work) -> float:
        """The seconds ``work`` may take once the work ahead of it is done."""
        samples = max(1, self.samples(work))
        if work.queue == "learner" and work.stage != "train" or work.stage == "manage":
            # behind a train step (and any checkpoint it saves), or a rollout manager's report (it
            # answers within grpo.manager_report_s): bounded like a first call
            return self.rc.call_timeout_s
        if work.stage == "score":
            return self.score_budget(samples) + self.rc.deadline_min_s
        if work.stage in self.rates:
            return max(self.rc.deadline_min_s, self.rc.deadline_factor * self.rates[work.stage] * samples)
        return self.rc.call_timeout_s

    def submit(self, work: Work) -> Work:
        budget = self.budget(work)
        key = self._queue(work)
        queue = self._queues.setdefault(key, [])
        # an actor that starts may wait for a node to join: no deadline (the run goes on without it)
        work.deadline = math.inf if work.stage == "join" else max(work.started, self._ends.get(key, -math.inf)) + budget
        # (the callers that make a call per group name its actor: looking every ref up is not free)
        work.who = work.who or sorted({self.dog.owner(ref) or "?" for ref in work.refs})
        self.work[work] = None
        queue.append(work)
        self._ends[key] = max(self._ends.get(key, -math.inf), work.deadline)
        work.flight = self
        for ref in work.pending:
            self._refs[ref] = work
        self._watch.watch(work.refs)  # (all pending: nothing is dropped before submit)
        if work.actor is not None:
            self._loads(work.stage, work.actor + 1)[work.actor] += 1
        self.stages[work.stage] += 1
        self._soonest = min(self._soonest, work.deadline)
        return work

    def _forget(self, work: Work) -> None:
        del self.work[work]
        key = self._queue(work)
        queue = self._queues[key]
        queue.remove(work)
        if not queue:
            del self._ends[key]
        elif work.deadline >= self._ends[key]:  # (the latest one left: rare, work ends in order)
            self._ends[key] = max(w.deadline for w in queue)
        for ref in work.pending:
            self._refs.pop(ref, None)
        self._watch.forget(list(work.pending))
        if work.actor is not None:
            self._load[work.stage][work.actor] -= 1
        self.stages[work.stage] -= 1

    @staticmethod
    def _queue(w: Work):
        return w.queue or (w.stage, w.actor)

    def pick(self, stage: str, actors: int, among: list[int]) -> int:
        """The least loaded of ``among`` (of a group of ``actors``) for ``stage``; ties go
        round-robin so every actor gets work."""
        self.turns[stage] += 1  # (per stage: one counter shared by the stages could keep landing on one actor)
        turn = self.turns[stage] % actors
        loads = self._loads(stage, actors)
        if len(among) == actors:  # every actor (the usual case): scans in C
            least = min(loads[:actors])
            return loads.index(least, turn, actors) if least in loads[turn:actors] else loads.index(least)
        loads = [loads[i] for i in among]
        least = min(loads)
        tied = sorted(i for i, n in zip(among, loads) if n == least)
        k = bisect.bisect_left(tied, turn)  # the first at or after ``turn``, cyclically
        return tied[k] if k < len(tied) else tied[0]

    def load(self, stage: str, actors: int) -> list[int]:
        """Work of ``stage`` in flight on each of ``actors`` actors."""
        return self._loads(stage, actors)[:actors]

    def _loads(self, stage: str, actors: int) -> list[int]:
        loads = self._load.setdefault(stage, [])
        if len(loads) < actors:  # (an elastic group grew)
            loads.extend([0] * (actors - len(loads)))
        return loads

    def next_done(self, timeout: float | None = None) -> Work | None:
        """Wait for the next piece of work whose refs are all done; its results land in ``value``.
        With ``timeout``: None once that many seconds passed without one."""
        end = math.inf if timeout is None else transport.now() + timeout
        while True:
            now = transport.now()
            if now >= self._soonest:  # (a bound gone stale: work removed, deadlines raised)
                self._soonest = min((w.deadline for w in self.work), default=math.inf)
            wait_s = min(self.dog.every_s, self._soonest - now, end - now)
            if self.stages["join"] == len(self.work):
                wait_s = min(wait_s, 1.0)  # the driver re-checks control (r1ray scale) meanwhile
            if not self._done:
                self._done.extend(self._watch.wait(max(0.0, wait_s)))
            while self._done:
                ref = self._done.popleft()
                work = self._refs.get(ref)
                if work is None:  # (given up meanwhile: its actor was lost)
                    continue
                try:
                    work.values[ref] = self._watch.get(ref)
                except Exception as e:  # noqa: BLE001 - every failure becomes one named error
                    # the driver may repair the work of a lost actor (dead, or its vLLM engine dead)
                    # or a weight sync a lost generator broke; anything else ends the run
                    if self.on_lost is None or not self.on_lost(work, ref, e):
                        raise self.dog.failure(f"{self.what} {work.stage}", ref, e) from e
                work.pending.discard(ref)
                self._refs.pop(ref, None)
                if work in self.work and not work.pending:
                    return self._finished(work)
            self._check_deadlines()
            self.dog.check(self.what)
            if transport.now() >= end:
                return None

    def postpone(self, seconds: float) -> None:
        """The driver did something else for ``seconds`` (an evaluation): the work in flight,
        queued behind it on the same actors, gets that much more time."""
        for w in self.work:
            w.deadline += seconds
        for key in self._ends:
            self._ends[key] += seconds
        self._soonest += seconds

    def extend(self, work: Work, deadline: float) -> None:
        """Give ``work`` until ``deadline`` (never less than it had)."""
        work.deadline = max(work.deadline, deadline)
        if work in self.work:
            key = self._queue(work)
            self._ends[key] = max(self._ends[key], work.deadline)

    def remove(self, work: Work) -> None:
        """Forget ``work`` (its actor was lost; the driver re-queues what it carried)."""
        if work in self.work:
            self._forget(work)

    def finish(self, work: Work) -> None:
        """``work``, which has no refs here, is done elsewhere (a rollout manager generated its
        groups): it leaves, and its seconds count towards the stage's rate as any work's do."""
        if work in self.work:
            self._finished(work)

    def of_actor(self, stage: str, actor: int) -> list[Work]:
        return [w for w in self.work if w.stage == stage and w.actor == actor]

    def _finished(self, work: Work) -> Work:
        self._forget(work)
        values = [work.values[ref] for ref in work.refs]
        work.value = values if work.stage in ("train", "sync") else values[0] if len(values) == 1 else \
            [x for part in values for x in part]  # reference log-probs sharded over the learner ranks
        now = transport.now()
        self.rates[work.stage] = max(self.rates.get(work.stage, 0.0), (now - work.started) / max(1, self.samples(work)))
        if work.stage in self.batched:  # the engine makes progress: its other calls get their budget again
            for w in self._queues.get(self._queue(work), []):
                self.extend(w, now + self.budget(w))
        return work

    def _check_deadlines(self) -> None:
        now = transport.now()
        if now <= self._soonest:
            return
        late = [w for w in self.work if now > w.deadline]
        if not late:
            return
        bad = self.dog.probe()  # a dead or hung actor is the better explanation
        if bad:
            raise RemoteCallError(f"{self.what}: {self.dog.explain(bad)}")
        w = late[0]
        raise RemoteCallError(
            f"{self.what} {w.stage} on {', '.join(w.who)} ({self.samples(w)} samples) has run {now - w.started:.0f} s, "
            f"past its deadline of {w.deadline - w.started:.0f} s; the actors answer pings, so the work is stuck or "
            "slower than before: raise ray.deadline_factor (or ray.call_timeout_s for a first call) if it is slow "
            "but progressing")

    def doing(self, name: str) -> str:
        """What actor ``name`` is doing, for error messages."""
        now = transport.now()
        for w in self.work:
            if name in w.who:
                step = f" at version {w.version}" if w.version is not None else ""
                size = f" ({self.samples(w)} samples)" if w.groups else ""
                return f", while it was running {w.stage}{step}{size} for {now - w.started:.0f} s"
        return ""

    def depths(self) -> dict:
        groups = Counter()
        for w in self.work:
            groups[w.stage] += len(w.groups)
        return {"queue/generate_groups": groups["generate"], "queue/score_groups": groups["score"],
                "queue/reference_groups": groups["reference"], "queue/teacher_groups": groups["teacher"],
                "queue/sync_pending": sum(w.stage == "sync" for w in self.work)}
