"""A simulated fleet for the GRPO driver: its actors, their devices and a clock, no Ray, no model.

``benchmarks/simulate.py`` runs r1ray's own ``GrpoDriver`` (admission, the staleness bound,
the in-flight table, elastic slots, weight-sync sequencing) against this fleet: ``SimSystem``
is a ``System`` whose groups are ``SimGroup`` s, ``ActorGroup`` s whose calls (checked
against the real actor classes' signatures, as every call is) go to simulated actors, and
``SimTransport`` is installed as the driver's transport (``cluster/transport.py``), so its
waits advance a simulated clock from one event to the next.

Devices:

- ``Pool``: actors that run their work calls one at a time in order (Ray's default), on
  ``cores`` shared by every busy actor of the pool (processor sharing: each running call
  progresses at ``min(1, cores / demand)`` of its solo speed). One pool with the CPU's cores
  models the tiny recipe on this machine; a pool per GPU (``cores=inf``) a learner rank, the
  reference or a scorer on its own device.
- ``VllmDevice``: a vLLM engine: continuous batching of up to ``max_num_seqs`` sequences,
  each decoding one token per engine step, the step's time from the cost model's
  ``decode_step(running, context)``; prefill of a new prompt stalls the batch
  (``prefill``); a weight update pauses it (``pause_mode: keep``). A generate call returns
  when its last sequence does.

Costs come from a ``CostModel`` (``GpuCosts`` from published figures, ``CpuCosts`` measured
from a run's timeline); completion lengths from ``Lengths``.
"""
from __future__ import annotations

import heapq
import math
import random
import tempfile
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import NormalDist

import numpy as np
from ray.exceptions import ActorDiedError

from r1ray.actors.generator import Generator
from r1ray.actors.learner import GrpoStats, LearnerRank
from r1ray.actors.reference import Reference
from r1ray.actors.rollout import Rollout, TokenIds
from r1ray.actors.scorer import RewardScorer, Scores
from r1ray.actors.spans import around_gap
from r1ray.cluster.groups import ActorGroup, RemoteCallError, Watchdog
from r1ray.controllers.common.data import PreparedData
from r1ray.controllers.common.runlog import MetricsWriter, read_jsonl
from r1ray.controllers.common.system import GRPO, System
from r1ray.controllers.grpo.manager import RolloutManager

WALL0 = 1.8e9  # the simulated wall clock's epoch seconds at time 0 (the actors' spans use it)
EPS = 1e-9


# -- the clock and the refs ------------------------------------------------------------------
class Ref:
    """A simulated object ref: done once its call finished."""

    __slots__ = ("value", "error", "done", "then")

    def __init__(self):
        self.value, self.error, self.done, self.then = None, None, False, []


class SimWatcher:
    """Refs the driver waits on: ``wait`` runs the fleet's events in time order until one of
    them is done or the timeout passes on the simulated clock."""

    def __init__(self, tr: "SimTransport"):
        self.tr, self.watched, self.ready = tr, set(), deque()

    def watch(self, refs: list) -> None:
        self.tr.calls["futures"] += len(refs)  # (what a future costs the driver is Ray's: priced by ray-costs)
        with self.tr.simulating():
            for ref in refs:
                self.watched.add(ref)
                if ref.done:
                    self.ready.append(ref)
                else:
                    ref.then.append(lambda ref=ref: self.finished(ref))

    def finished(self, ref: "Ref") -> None:
        self.ready.append(ref)

    def forget(self, refs: list) -> None:
        with self.tr.simulating():
            self.watched.difference_update(refs)

    def wait(self, timeout: float) -> list:
        self.tr.calls["waits"] += 1
        self.tr.driver_turn()
        with self.tr.simulating():
            if not self.ready:  # (a real wait takes some time, even of 0 s)
                self.tr.run_until(lambda: bool(self.ready), self.tr.t + max(timeout, 1e-6))
            done = [ref for ref in self.ready if ref in self.watched]
            self.ready.clear()
            return done

    def get(self, ref: "Ref"):
        self.watched.discard(ref)
        return self.tr.get(ref)


class PassiveWatcher(SimWatcher):
    """A rollout manager's refs (``SimManager``): it never runs the clock, it runs inside the
    fleet's events; ``on_ready()`` is called as each finishes."""

    def __init__(self, tr: "SimTransport", on_ready):
        super().__init__(tr)
        self.on_ready = on_ready

    def finished(self, ref: "Ref") -> None:
        self.ready.append(ref)
        self.on_ready()

    def wait(self, timeout: float) -> list:
        done = [ref for ref in self.ready if ref in self.watched]
        self.ready.clear()
        return done


class SimTransport:
    """The driver's transport over the simulated fleet (``SimWatcher``). ``calls`` counts what
    a run would ask of Ray (remote calls, futures, waits, gets)."""

    def __init__(self, latency_s: float = 0.0):
        self.t = 0.0
        self.latency_s = latency_s  # from a work call to its start on the actor (Ray's dispatch)
        self._timer = Pool(self)
        self._heap: list = []
        self._n = 0
        self.calls: Counter = Counter()
        self.sim_cpu_s = 0.0  # CPU seconds spent simulating the fleet (not the driver's)
        self._depth = 0
        self._simulating = _Simulating(self)
        self.price = None  # charge_driver: the driver's own time on the clock
        self.driver_s = 0.0  # simulated seconds the driver's turns took (charge_driver)
        self._mark = (0.0, 0.0, Counter())

    def now(self) -> float:
        return self.t

    def wall(self) -> float:
        return WALL0 + self.t

    def resolve(self, ref: Ref, value=None, error: BaseException | None = None) -> None:
        ref.value, ref.error, ref.done = value, error, True
        then, ref.then = ref.then, []
        for fn in then:
            fn()

    def push(self, device: "Device") -> None:
        """(Re)schedule ``device``'s next event (its older entries become stale)."""
        device.stamp += 1
        t = device.next_time()
        if t < math.inf:
            self._n += 1
            heapq.heappush(self._heap, (t, self._n, device.stamp, device))

    def run_until(self, done, t_end: float) -> bool:
        """Process events up to ``t_end`` until ``done()``; returns ``done()``."""
        while self._heap and not done():
            t, _, stamp, dev = self._heap[0]
            if stamp != dev.stamp:
                heapq.heappop(self._heap)
                continue
            if t > t_end:
                break
            heapq.heappop(self._heap)
            self.t = max(self.t, t)
            dev.advance(self.t)
            self.push(dev)
        if not done():
            if t_end == math.inf:
                raise RuntimeError("simulation: the driver waits for work no device is doing (a deadlock)")
            self.t = max(self.t, t_end)
        return done()

    def charge_driver(self, price) -> None:
        """Put the driver's own time on the simulated clock. Without it the driver is free: its
        decisions take no simulated time. With it, at each of the driver's calls and waits, what
        it did since the previous one passes on the clock first, the fleet running meanwhile:
        ``price(cpu_s, calls)`` seconds, from the CPU seconds its Python took (the simulator's
        own left out) and the Ray calls, values fetched and numbers pickled meanwhile
        (``calls``, counted as ``self.calls`` counts them). A call reaches its actor, and a
        completion is handled, only once the driver's thread got to it: whether the driver is
        the bottleneck shows in the steps' seconds."""
        self.price, self.driver_s = price, 0.0
        self._mark = (time.process_time(), self.sim_cpu_s, Counter(self.calls))

    def driver_turn(self) -> None:
        """The driver's work since its last call or wait, charged to the clock (``charge_driver``)."""
        if self.price is None or self._depth:  # (the simulator's own calls are not the driver's)
            return
        cpu = time.process_time() - self._mark[0] - (self.sim_cpu_s - self._mark[1])
        with self.simulating():
            calls = self.calls.copy()
            calls.subtract(self._mark[2])
            seconds = self.price(max(0.0, cpu), calls)
            self.driver_s += seconds
            if seconds > 0:
                self.run_until(lambda: False, self.t + seconds)
            counted = Counter(self.calls)
        self._mark = (time.process_time(), self.sim_cpu_s, counted)

    def simulating(self) -> "_Simulating":
        """Count the CPU time inside as the simulator's (once, however deeply nested)."""
        return self._simulating

    def watcher(self) -> SimWatcher:
        return SimWatcher(self)

    def get(self, ref: Ref):
        self.calls["ray.get"] += 1
        if ref.error is not None:
            raise ref.error
        with self.simulating():
            got = payload(ref.value)
            self.calls["numbers received"] += got["numbers"]
            self.calls["arrays received"] += got["arrays"]
            self.calls["array numbers received"] += got["array numbers"]
        return ref.value

    def later(self, seconds: float, fn) -> None:
        """``fn()`` after ``seconds`` on the simulated clock (the simulator's time: a call's
        dispatch latency is set from the driver's side, but the timer is no work of the driver's)."""
        ref = Ref()
        ref.then.append(fn)
        with self.simulating():
            self._timer.submit(Job(ref, _NOBODY, "", seconds, None, 0.0, None, True))

    def wait_all(self, refs: list) -> None:
        """Run until every one of ``refs`` is done (a blocking ``ray.get`` of them)."""
        self.calls["ray.get"] += 1
        self.driver_turn()
        with self.simulating():
            self.run_until(lambda: all(r.done for r in refs), math.inf)


class _Simulating:
    """``SimTransport.simulating``: a plain context manager, not a generator's, whose own cost
    (about 40,000 entries a step at 256 generators) would otherwise fall on the driver's side."""

    __slots__ = ("tr", "t0")

    def __init__(self, tr: SimTransport):
        self.tr, self.t0 = tr, 0.0

    def __enter__(self) -> None:
        tr = self.tr
        tr._depth += 1
        if tr._depth == 1:
            self.t0 = time.process_time()

    def __exit__(self, *exc) -> None:
        tr = self.tr
        tr._depth -= 1
        if not tr._depth:
            tr.sim_cpu_s += time.process_time() - self.t0


def payload(x, seen: set | None = None, out: Counter | None = None) -> Counter:
    """What serialising ``x`` for a remote call costs grows with (``simulate.py ray-costs``
    prices each): ``numbers``, those in its lists (prompt ids, versions), one Python object
    each; ``arrays``, its numpy arrays (completion ids, log-probs), one buffer each.
    As pickle does within one object: an object counts what its ``__getstate__`` sends (a
    rollout's uniform versions: 2 numbers), and a ``prompt_ids`` list met again counts once
    (the real generator gives a group's rollouts one prompt list, and the rollouts' samples
    keep it; the simulator's other lists and arrays are shared only to save memory, so they
    count each time)."""
    seen = set() if seen is None else seen
    out = Counter() if out is None else out
    if isinstance(x, (list, tuple)):
        if x and isinstance(x[0], (int, float)) and isinstance(x[-1], (int, float)):  # (not a (key, group) pair)
            out["numbers"] += len(x)
        else:
            for v in x:
                payload(v, seen, out)
    elif isinstance(x, np.ndarray):
        out["arrays"] += 1
        out["array numbers"] += x.size
    elif isinstance(x, dict):
        for k, v in x.items():
            if k == "prompt_ids" and isinstance(v, list):
                if id(v) in seen:
                    continue
                seen.add(id(v))
            payload(v, seen, out)
    elif hasattr(x, "__dict__") and not isinstance(x, type):
        payload(x.__getstate__(), seen, out)
    return out


def numbers(x) -> int:
    return payload(x)["numbers"]


def call_payload(args: tuple, kwargs: dict) -> Counter:
    """What a call's arguments send: Ray pickles each argument on its own, so sharing counts
    within an argument, not across them."""
    out = Counter()
    for a in (*args, *kwargs.values()):
        out += payload(a)
    return out


# -- devices ---------------------------------------------------------------------------------
class SimCallFailed(Exception):
    """Raised by a job's value: the call fails with ``error``."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


@dataclass(eq=False)
class Job:
    ref: Ref
    actor: "SimActor"
    kind: str  # the span it records ("" for none)
    seconds: float  # solo seconds (Pool)
    value: object = None  # a callable: the result, made when the job finishes
    demand: float = 1.0  # cores it keeps busy
    on_start: object = None
    control: bool = False
    t0: float = 0.0
    remaining: float = 0.0
    args: dict = field(default_factory=dict)
    # (t0, t1, kind): a stretch of the call spent waiting on others, a span of its own (no busy time)
    gap: tuple | None = None


class Device:
    def __init__(self, tr: SimTransport):
        self.tr, self.t, self.stamp = tr, 0.0, 0

    def next_time(self) -> float:
        raise NotImplementedError

    def advance(self, t: float) -> None:
        raise NotImplementedError

    def touch(self) -> None:
        """Bring the device to the transport's time before its state changes."""
        if self.t < self.tr.t:
            self.advance(self.tr.t)

    def finish(self, job: Job, t: float) -> None:
        job.actor.open.pop(job, None)
        for a, b, waiting in around_gap(job.t0, t, job.gap):  # (as SpanLog.end splits a span)
            job.actor.span(job.gap[2] if waiting else job.kind, a, b, None if waiting else job.args)
        try:
            value = job.value() if callable(job.value) else job.value
        except SimCallFailed as e:  # the call raises, as the real one would (a peer of its collective died)
            self.tr.resolve(job.ref, None, e.error)
            return
        self.tr.resolve(job.ref, value)


class Pool(Device):
    """Actors running one work call at a time each (control calls beside it), sharing ``cores``."""

    def __init__(self, tr: SimTransport, cores: float = math.inf, background: float = 0.0):
        super().__init__(tr)
        self.cores, self.background = cores, background  # background: cores other processes keep busy
        self.queues: dict[SimActor, deque] = {}
        self.control: list[Job] = []

    def submit(self, job: Job) -> None:
        self.touch()
        job.remaining = job.seconds
        if job.control:
            self._start(job)
            self.control.append(job)
        else:
            q = self.queues.setdefault(job.actor, deque())
            q.append(job)
            if len(q) == 1:
                self._start(job)
        self.tr.push(self)

    def _start(self, job: Job) -> None:
        job.t0 = self.t
        job.actor.open[job] = None
        if job.on_start is not None:
            job.on_start(job)

    def running(self) -> list[Job]:
        return [q[0] for q in self.queues.values() if q] + self.control

    def drop(self, actor: "SimActor") -> None:
        """Forget ``actor``'s jobs (it was killed)."""
        self.touch()
        self.queues.pop(actor, None)
        self.control = [j for j in self.control if j.actor is not actor]
        self.tr.push(self)

    def complete(self, job: Job) -> None:
        """End a running job of unknown length now (a collective its peers finished)."""
        self.touch()
        job.remaining = 0.0
        self.tr.push(self)

    def rate(self, run: list[Job]) -> float:
        demand = sum(j.demand for j in run) + self.background
        return min(1.0, self.cores / demand) if demand > 0 else 1.0

    def next_time(self) -> float:
        run = self.running()
        if not run:
            return math.inf
        return self.t + min(j.remaining for j in run) / self.rate(run)

    def advance(self, t: float) -> None:
        while True:
            run = self.running()
            if not run:
                self.t = max(self.t, t)
                return
            rate = self.rate(run)
            step = min(j.remaining for j in run) / rate
            if self.t + step > t + EPS:
                for j in run:
                    j.remaining -= (t - self.t) * rate
                self.t = t
                return
            self.t += step
            for j in run:
                j.remaining -= step * rate
            for j in [j for j in run if j.remaining <= EPS * (1.0 + (j.seconds if j.seconds < math.inf else 0.0))]:
                if j.control:
                    self.control.remove(j)
                else:
                    q = self.queues[j.actor]
                    q.popleft()
                    if q:
                        self._start(q[0])
                self.finish(j, self.t)


class VllmDevice(Device):
    """One vLLM engine: continuous batching, one token per running sequence per engine step.

    Its KV cache holds ``kv_tokens`` tokens (prompts and what is decoded so far, of every
    running sequence): a waiting sequence is admitted, first come first served, while
    ``max_num_seqs`` and the cache leave room for its prompt with 1% of the cache to spare
    (vLLM's admission watermark); when the running sequences' next token does not fit, the
    newest is preempted (vLLM's recompute mode: its blocks freed, back to the head of the queue,
    its whole context prefilled again when it is admitted again). ``peak_kv`` (tokens),
    ``peak_running``, ``peak_waiting`` and ``preempted`` count what happened."""

    WATERMARK = 0.01

    def __init__(self, tr: SimTransport, costs: "GpuCosts", max_num_seqs: int, kv_tokens: float = math.inf):
        super().__init__(tr)
        self.costs, self.max_num_seqs, self.kv_tokens = costs, max_num_seqs, kv_tokens
        self.peak_kv, self.peak_running, self.peak_waiting, self.preempted = 0.0, 0, 0, 0
        self.rem = np.zeros(0)  # tokens each running sequence still decodes
        self.ctx = np.zeros(0)  # its context so far (prompt + decoded)
        self.owner: list[Job] = []  # the call each running sequence belongs to
        self.waiting: deque = deque()  # (job, prompt tokens, completion tokens), admitted in order
        self.left: dict[Job, int] = {}  # call -> its sequences not finished
        self.stall = 0.0  # prefill seconds the batch still owes
        self.paused_until = -math.inf
        self.draining: list = []  # pause_mode wait: updates waiting for the running sequences to finish
        self.prefilled: set = set()  # prompts whose prefix is cached (a group's samples share it)
        self.asleep = False  # colocated: the device is the learner rank's until the next update

    def submit(self, job: Job, seqs: list[tuple[int, int, object]]) -> None:
        """``seqs``: (prompt tokens, completion tokens, prompt key) of the call's sequences."""
        self.touch()
        job.t0 = self.t
        job.actor.open[job] = None
        self.left[job] = len(seqs)
        self.waiting.extend((job, p, n, key) for p, n, key in seqs)
        self._admit()
        self.peak_waiting = max(self.peak_waiting, len(self.waiting))
        self.tr.push(self)

    def sleep(self, seconds: float, done) -> None:
        """Colocated (``Generator.sleep``): the running sequences finish, admitting none, then
        the engine frees the device in ``seconds``; it admits nothing until the next update
        wakes it. ``done(t0, t1)`` when it sleeps."""
        self.touch()
        self.asleep = True
        if self.owner:
            self.draining.append((seconds, done))
        else:
            self._pause(seconds, done)
        self.tr.push(self)

    def update(self, seconds: float, mode: str, done) -> None:
        """A weight update of ``seconds``: ``keep`` pauses the running sequences now (they go
        on with the new weights: partial rollouts); ``wait`` first lets them finish, admitting
        none. ``done(t0, t1)`` when the new weights are in. A sleeping engine wakes first
        (``costs.wake_s``: its weights' and KV cache's memory back)."""
        self.touch()
        if self.asleep:
            self.asleep = False
            seconds += self.costs.wake_s
        if mode == "wait" and self.owner:
            self.draining.append((seconds, done))
        else:
            self._pause(seconds, done)
        self.tr.push(self)

    def _pause(self, seconds: float, done) -> None:
        t0 = max(self.paused_until, self.t)
        self.paused_until = t0 + seconds
        self.tr.later(self.paused_until - self.tr.t, lambda: done(t0, self.paused_until))

    def _admit(self) -> None:
        if self.draining or self.asleep:
            return
        new_rem, new_ctx = [], []
        live, room = float(self.ctx.sum()), (1 - self.WATERMARK) * self.kv_tokens
        while self.waiting and len(self.owner) < self.max_num_seqs and live + self.waiting[0][1] <= room:
            job, p, n, key = self.waiting.popleft()
            live += p
            if key is None:  # preempted: its prompt and what it had decoded, computed again
                self.stall += self.costs.prefill(p)
            elif key not in self.prefilled:  # prefix caching: the group's other samples reuse it
                self.prefilled.add(key)
                self.stall += self.costs.prefill(p)
            self.owner.append(job)
            new_rem.append(n)
            new_ctx.append(p)
        if new_rem:
            self.rem = np.concatenate([self.rem, np.asarray(new_rem, float)])
            self.ctx = np.concatenate([self.ctx, np.asarray(new_ctx, float)])
            self.peak_kv = max(self.peak_kv, live)
            self.peak_running = max(self.peak_running, len(self.owner))
        elif self.waiting and not self.owner:
            raise RuntimeError(f"a prompt of {self.waiting[0][1]} tokens does not fit the engine's KV cache of "
                               f"{self.kv_tokens:.0f} tokens")

    def _tokens_to_go(self) -> float:
        """Tokens every running sequence decodes before one finishes or the KV cache is full."""
        return min(float(self.rem.min()), (self.kv_tokens - float(self.ctx.sum())) / len(self.owner))

    def _preempt(self) -> None:
        """The KV cache is full: the newest running sequence gives its blocks back and waits
        at the head of the queue (what it decoded is computed again, as prompt)."""
        if len(self.owner) == 1:
            raise RuntimeError(f"a sequence of {self.ctx[0]:.0f} tokens fills the engine's KV cache of "
                               f"{self.kv_tokens:.0f} tokens")
        job, ctx, rem = self.owner.pop(), float(self.ctx[-1]), float(self.rem[-1])
        self.rem, self.ctx = self.rem[:-1], self.ctx[:-1]
        self.waiting.appendleft((job, round(ctx), rem, None))
        self.preempted += 1
        self.peak_waiting = max(self.peak_waiting, len(self.waiting))

    def next_time(self) -> float:
        if not self.owner:
            if self.waiting and self.paused_until > self.t and not self.asleep:  # resume admitting after a drained update
                return self.paused_until
            return math.inf
        start = max(self.t, self.paused_until) + self.stall
        return start + max(0.0, self._tokens_to_go()) * self.costs.decode_step(len(self.owner), float(self.ctx.sum()))

    def advance(self, t: float) -> None:
        if not self.owner and not self.draining and self.waiting and t >= self.paused_until:
            self._admit()
        while self.owner:
            start = max(self.t, self.paused_until)
            if start >= t:
                self.t = t
                return
            if self.stall > 0:
                used = min(self.stall, t - start)
                self.stall -= used
                start += used
                if start >= t - EPS and self.stall > EPS:
                    self.t = t
                    return
                self.stall = max(0.0, self.stall)
            k = self._tokens_to_go()  # (> 0: a cache filled by a step is freed at its end, below)
            step_s = self.costs.decode_step(len(self.owner), float(self.ctx.sum()))
            t_fin = start + k * step_s
            tokens = k if t_fin <= t + EPS else (t - start) / step_s
            self.rem -= tokens
            self.ctx += tokens
            self.peak_kv = max(self.peak_kv, float(self.ctx.sum()))
            self.t = min(t_fin, t)
            if t_fin > t + EPS:
                return
            done = np.flatnonzero(self.rem <= 1e-6)
            keep = np.ones(len(self.owner), bool)
            keep[done] = False
            finished = [self.owner[i] for i in done]
            self.owner = [j for j, k in zip(self.owner, keep) if k]
            self.rem, self.ctx = self.rem[keep], self.ctx[keep]
            for job in finished:
                self.left[job] -= 1
                if not self.left[job]:
                    del self.left[job]
                    self.finish(job, self.t)
            if self.draining and not self.owner:
                for seconds, done_fn in self.draining:
                    self._pause(seconds, done_fn)
                self.draining = []
                return
            if self.owner and self._tokens_to_go() < 1e-9:  # the KV cache is full: vLLM preempts before the next step
                self._preempt()
            self._admit()
        self.t = max(self.t, t)


# -- actors ----------------------------------------------------------------------------------
class SimActor:
    """One simulated actor: its methods (named as the real class's) queue jobs on its device."""

    def __init__(self, name: str, fleet: "Fleet", device: Device):
        self.name, self.fleet, self.device = name, fleet, device
        self.spans: list[dict] = []
        self.open: dict[Job, None] = {}  # its jobs started and not finished (drained as open spans)
        self.version = 0
        self.dead = False  # killed (or retired): its calls fail as a dead actor's do
        self.calls: set[Ref] = set()  # its callers' refs not yet answered

    def span(self, kind: str, t0: float, t1: float, args: dict | None = None) -> None:
        if kind:
            self.spans.append({"kind": kind, "t0": WALL0 + t0, "t1": WALL0 + t1, "args": dict(args or {})})

    def run(self, method: str, args: tuple, kwargs: dict, control: bool) -> Ref:
        ref = Ref()
        if self.dead:
            self.fleet.tr.resolve(ref, None, ActorDiedError())
            return ref
        handler = getattr(self, f"do_{method}", None)
        if handler is None:
            if method not in ("ping", "drain_spans"):
                raise NotImplementedError(f"the simulated {self.name} has no model of {method}")
            self.fleet.tr.resolve(ref, "ok" if method == "ping" else self.drain())
            return ref
        handler(ref, *args, **kwargs)
        return ref

    def drain(self) -> list[dict]:
        """As ``SpanLog.drain``: the spans ended, then the jobs running as far as they have run."""
        out, self.spans = self.spans, []
        return out + [{"kind": j.kind, "t0": WALL0 + j.t0, "t1": WALL0 + self.fleet.tr.t, "args": dict(j.args),
                       "open": True} for j in self.open if j.kind]

    def kill(self) -> None:
        """Dead from now on: every call in flight fails with ``ActorDiedError``, and so does
        every later one; its device drops its work (a vLLM engine is its own device: left)."""
        self.dead = True
        calls, self.calls = self.calls, set()
        for ref in calls:
            if not ref.done:
                self.fleet.tr.resolve(ref, None, ActorDiedError())
        if isinstance(self.device, Pool):
            self.device.drop(self)

    def pool_job(self, ref: Ref, kind: str, seconds: float, value=None, control: bool = False, demand: float = 1.0,
                 on_start=None, **args) -> None:
        self.device.submit(Job(ref, self, kind, seconds, value, demand, on_start, control, args=args))


class SimGenerator(SimActor):
    def do_generate(self, ref: Ref, prompts: list[dict], n: int, sampling, greedy: bool = False,
                    partial_rollout_tokens: int | None = None, first_sample: int = 0) -> None:
        f = self.fleet
        lengths = [f.lengths.group(f.rng, n) for _ in prompts]
        cap = f.lengths.cap

        v = self.version  # (what it holds when the call arrives: its tokens are no older)

        def rollouts() -> list[Rollout]:  # (at the call's end)
            out = []
            for p, ls in zip(prompts, lengths):
                for k, m in enumerate(ls):
                    # weights updated during the call (pause_mode keep): its tokens' versions are
                    # mixed, a list the rollout pickles whole (which tokens are newer is not modelled)
                    versions = f.versions(m, v) if self.version == v or m < 2 else \
                        [v] * (m // 2) + [self.version] * (m - m // 2)
                    out.append(Rollout(f"{p['prompt_id']}/{first_sample + k}", p["prompt_id"], p["prompt_ids"], f.tokens(m),
                                       f.logprobs(m), versions, "length" if m >= cap else "stop"))
                    out[-1].version_range()  # (as the real generator does, so that the driver does not)
            return out

        if isinstance(self.device, VllmDevice):
            seqs = [(len(p["prompt_ids"]), m, (id(p), p["prompt_id"])) for p, ls in zip(prompts, lengths) for m in ls]
            self.device.submit(Job(ref, self, "generate", 0.0, rollouts, args={"sequences": len(seqs)}), seqs)
        else:
            self.pool_job(ref, "generate", f.costs.generate(len(prompts) * n, sum(map(sum, lengths))), rollouts,
                          demand=f.costs.demand("generate"), sequences=len(prompts) * n)

    def do_sleep(self, ref: Ref) -> None:
        """Colocated vLLM: level 2 (the next update brings every weight), ``costs.sleep_s``."""
        def slept(t0: float, t1: float) -> None:
            self.span("sleep", t0, t1, {"level": 2})
            self.fleet.tr.resolve(ref, {"level": 2, "seconds": t1 - t0})
        self.device.sleep(self.fleet.costs.sleep_s, slept)

    def do_load_weights(self, ref: Ref, blob, version: int) -> None:  # hf generators: the export, loaded
        def loaded():
            self.version = version
            return self.fleet.costs.seconds("load_weights")
        self.pool_job(ref, "load_weights", self.fleet.costs.seconds("load_weights"), loaded, control=True,
                      demand=self.fleet.costs.demand("load_weights"), version=version)


class SimScorer(SimActor):
    def do_score(self, ref: Ref, rollouts: list[Rollout]) -> None:
        f = self.fleet
        names = [s.name for s in f.recipe.rewards]

        def scores() -> Scores:
            rewards = [float(f.rng.random() < f.solve_rate(r.prompt_id)) for r in rollouts]
            stats = {"time_s": 0.0}
            for name in names:
                stats[f"{name}/calls"] = len(rollouts)
                stats[f"{name}/errors"] = stats[f"{name}/invalid"] = stats[f"{name}/timeouts"] = 0
            return Scores([{name: x for name in names} for x in rewards], rewards, stats)

        self.pool_job(ref, "score", f.costs.score(len(rollouts)), scores, demand=f.costs.demand("score"))


class SimReference(SimActor):
    def do_logprobs(self, ref: Ref, samples: list) -> None:
        f = self.fleet
        tokens = sum(len(s.prompt_ids) + len(s.completion_ids) for s in samples)
        self.pool_job(ref, "ref_logprobs", f.costs.reference(len(samples), tokens),
                      lambda: [f.logprobs(len(s.completion_ids)) for s in samples], demand=f.costs.demand("ref_logprobs"))


class SimLearner(SimActor):
    sent = 0  # send_weights calls so far: every rank's n-th is one transfer

    def do_grpo_step(self, ref: Ref, shard: list, denom: float, tokens: float) -> None:
        f = self.fleet
        ranks = len(f.system.learners)  # (a step ends on every rank at once: the batch's tokens / ranks)
        seconds = f.costs.train(len(shard), int(tokens + ranks * sum(len(s.prompt_ids) for s in shard)) // ranks, ranks)
        self.pool_job(ref, "train", seconds, lambda: GrpoStats(tokens=float(sum(len(s.completion_ids) for s in shard)),
                                                               ratio_max=1.0, ratio_min=1.0, grad_norm=1.0),
                      demand=f.costs.demand("train"))

    def do_export_weights(self, ref: Ref, dtype: str) -> None:  # hf generators: through the object store
        self.pool_job(ref, "export_weights", self.fleet.costs.seconds("export_weights"), "weights",
                      demand=self.fleet.costs.demand("export_weights"))

    def do_init_weight_transfer(self, ref: Ref, client, backend: str, master_address: str, master_port: int,
                                world_size: int, bucket_bytes: int, dtype: str, timeout_s: float = 600.0) -> None:
        """The transfer group formed again (its members changed): ``costs.seconds``."""
        f = self.fleet
        self.pool_job(ref, "init_weight_transfer", f.costs.seconds("init_weight_transfer"), {},
                      demand=f.costs.demand("init_weight_transfer"))

    def do_send_weights(self, ref: Ref, version: int) -> None:
        """vLLM generators: every rank gathers (ZeRO-3), rank 0 broadcasts to the transfer
        group's members; the ranks are done when every member has the weights
        (``generator.pause_mode``: see ``VllmDevice.update``). As ``LearnerRank.send_weights``:
        rank 0 first pings the members, and sends nothing when one is dead (``lost`` names it);
        a member killed mid-transfer makes rank 0 raise once the others have the weights."""
        f = self.fleet
        self.sent = n = self.sent + 1
        rank0 = self is f.system.learners.actors[0]
        gens = [f.system.generators.actors[i] for i in f.system.transfer_members]
        seconds = f.costs.sync_seconds(len(gens))
        t = f.transfers.setdefault(n, {"jobs": [], "done": False, "lost": [], "broken": None})

        def outcome():
            if rank0 and t["broken"]:
                raise SimCallFailed(RuntimeError(f"weight transfer of version {version}: {t['broken']} closed "
                                                 "its connection"))
            return {"seconds": seconds, "lost": t["lost"] if rank0 else []}

        def finish() -> None:
            t["done"] = True
            for j in t.pop("jobs"):
                # the ranks waited for every engine to pause (pause_mode wait: until its running
                # sequences end) before any weight moved: rank 0 in its client's pause, the
                # others in ZeRO-3's gathers (LearnerRank.send_weights logs it apart on each)
                if "paused" in t:
                    j.gap = (*t["paused"], "await_generators")
                j.actor.device.complete(j)

        def start(job: Job) -> None:
            if t["done"]:  # a rank that starts after the weights landed is done at once
                job.remaining = 0.0
                return
            t["jobs"].append(job)
            if not rank0:
                return
            t["lost"] = [g.name for g in gens if g.dead]
            if t["lost"] or not gens:  # nothing is sent
                finish()
                return
            if f.on_send is not None:
                f.on_send(version)
            left, asked = [len(gens)], f.tr.t

            def landed(g, t0, t1):
                if g.dead:  # killed mid-transfer: the broadcast fails on rank 0
                    t["broken"] = t["broken"] or g.name
                else:
                    g.version = version
                    g.span("weight_update", t0, t1, {"version": version})
                t["paused"] = (asked, max(t0, t.get("paused", (0.0, asked))[1]))
                left[0] -= 1
                if not left[0]:
                    finish()

            for g in gens:
                g.device.update(seconds, f.recipe.generator.pause_mode, lambda t0, t1, g=g: landed(g, t0, t1))

        self.pool_job(ref, "send_weights", math.inf, outcome, on_start=start,
                      demand=f.costs.demand("send_weights"), version=version)


class SimManager(SimActor):
    """A rollout manager: the real ``RolloutManager`` in-process, its calls to the fleet's
    groups on the simulated clock. Its ``step`` answers as the real one's does, at the simulated
    time: the completions of its calls are dealt with as they come (``PassiveWatcher``). Its
    CPU time and the Ray calls it would make are counted apart from the driver's (``cpu_s``,
    ``ray_calls``); its time is not on the clock (a manager serves a node's generators: an eighth
    of a 256-generator fleet's groups at 32 managers)."""

    def __init__(self, name: str, fleet: "Fleet", device: Device):
        super().__init__(name, fleet, device)
        self.watcher = PassiveWatcher(fleet.tr, self._wake)
        self.ray_calls: Counter = Counter()
        self.cpu_s = 0.0
        self.pending: Ref | None = None
        self.woken = False
        with self.acting():
            self.manager = RolloutManager(fleet.recipe, int(name.rsplit("-", 1)[1]), watcher=self.watcher)

    def acting(self) -> "_Acting":
        return _Acting(self)

    def do_step(self, ref: Ref, orders, report_s: float, wait_s: float) -> None:
        tr = self.fleet.tr
        self.pending, self.t0, self.report_s, self.wait_s, self.timed = ref, tr.t, report_s, wait_s, False
        self._take(orders)
        tr.later(wait_s, lambda: self._answer(ref))

    def do_submit(self, ref: Ref, orders) -> None:
        self._take(orders)
        self.fleet.tr.resolve(ref, None)

    def _take(self, orders) -> None:
        # (as pickled: the driver's groups are not the manager's objects)
        orders = replace(orders, dispatch=[replace(d, units=[replace(g, rollouts=[]) for g in d.units])
                                           for d in orders.dispatch])
        with self.acting():
            self.manager.accept(orders)
            self.manager.pump()
        self._answer(self.pending)

    def _wake(self) -> None:
        if not self.woken:
            self.woken = True
            self.fleet.tr.later(0.0, self._pump)

    def _pump(self) -> None:
        self.woken = False
        with self.acting():
            self.manager.pump()
        self._answer(self.pending)

    def _answer(self, ref: Ref | None) -> None:
        """Answer ``ref`` (the step call in flight) if the manager would now."""
        if ref is None or ref is not self.pending:
            return
        tr = self.fleet.tr
        if not self.manager.answers(self.t0, self.report_s, self.wait_s):
            if self.manager.report.news() and not self.timed:  # (it answers once report_s passed)
                self.timed = True
                tr.later(max(0.0, self.t0 + self.report_s - tr.t), lambda: self._answer(ref))
            return
        self.pending = None
        with self.acting():
            report = self.manager.take_report()
        tr.resolve(ref, report)


class _Acting:
    """``SimManager.acting``: the manager's CPU time and Ray calls, apart from the driver's."""

    __slots__ = ("m", "t0", "calls")

    def __init__(self, m: SimManager):
        self.m = m

    def __enter__(self) -> None:
        tr = self.m.fleet.tr
        tr.simulating().__enter__()
        self.calls, tr.calls = tr.calls, self.m.ray_calls
        self.t0 = time.process_time()

    def __exit__(self, *exc) -> None:
        tr = self.m.fleet.tr
        self.m.cpu_s += time.process_time() - self.t0
        tr.calls = self.calls
        tr.simulating().__exit__()


class SimGroup(ActorGroup):
    """An ``ActorGroup`` of simulated actors: the same typed calls (``call(i, Cls.method,
    ...)``, signatures checked), answered by the fleet on the simulated clock. Elastic as a
    real group: an actor killed (``SimActor.kill``) or retired fails its calls in flight and
    every later one with ``ActorDiedError``; ``restart`` and ``add`` start a new one (``make``),
    which answers its first ping after the cost model's ``seconds("start")``."""

    def __init__(self, name: str, cls: type, actors: list[SimActor], tr: SimTransport, timeout_s: float,
                 make=None, start_s: float = 0.0):
        self.name, self.timeout_s, self.cls, self.tr = name, timeout_s, cls, tr
        self._owners: OrderedDict = OrderedDict()
        self.watchdog = None
        self.elastic = False
        self.actors = actors
        self.state = ["ready"] * len(actors)
        self.incarnation = [0] * len(actors)
        self.make, self.start_s = make, start_s  # make(i): a new simulated actor for slot i

    def call(self, i: int, method, *args, control: bool = False, **kwargs) -> Ref:
        name = self._method(method, args, kwargs)
        self.tr.calls["remote calls"] += 1
        with self.tr.simulating():
            sent = call_payload(args, kwargs)
            self.tr.calls["numbers sent"] += sent["numbers"]
            self.tr.calls["arrays sent"] += sent["arrays"]
            self.tr.calls["array numbers sent"] += sent["array numbers"]
        self.tr.driver_turn()  # (the call reaches its actor once the driver made it)
        pending = [a for a in args if isinstance(a, Ref) and not a.done]
        ref, actor = Ref(), self.actors[i]  # (this incarnation: a replacement does not take its calls)
        self._owners[ref] = (i, self.incarnation[i])
        if len(self._owners) > 4096:
            self._owners.popitem(last=False)
        actor.calls.add(ref)

        def answer(inner: Ref) -> None:
            actor.calls.discard(ref)
            if not ref.done:  # (a killed actor's calls failed already)
                self.tr.resolve(ref, inner.value, inner.error)

        def run():  # once the refs among the arguments are done (Ray resolves them first)
            if any(isinstance(a, Ref) and not a.done for a in args):
                return
            with self.tr.simulating():  # (the actor's side: the simulator's time, not the driver's)
                inner = actor.run(name, tuple(a.value if isinstance(a, Ref) else a for a in args), kwargs, control)
            if inner.done:
                answer(inner)
            else:
                inner.then.append(lambda: answer(inner))

        latency = 0.0 if control else self.tr.latency_s  # Ray's dispatch of a task to its actor
        if pending:
            for a in pending:
                a.then.append(run)
        elif latency > 0:
            self.tr.later(latency, run)
        else:
            run()
        return ref

    def probe(self, timeout_s: float) -> dict[str, str]:
        return {}

    def done(self, refs: list) -> bool:
        return all(r.done for r in refs)

    def get(self, refs, what: str, timeout_s: float | None = None):
        """As ``ActorGroup.get``: a failed call raises ``RemoteCallError`` naming its actor."""
        many = isinstance(refs, list)
        self.tr.wait_all(refs if many else [refs])
        values = []
        for r in refs if many else [refs]:
            try:
                values.append(self.tr.get(r))
            except ActorDiedError as e:
                raise RemoteCallError(f"{self.name} group: {what}: {self.owner(r) or 'an actor'} died") from e
        return values if many else values[0]

    def silent(self, slots: list[int], timeout_s: float) -> list[int]:
        return [i for i in slots if self.actors[i].dead]  # (a live simulated actor always answers)

    def retire(self, i: int) -> None:
        """Stop slot ``i``'s actor: its calls fail as a dead actor's do."""
        self._set(i, "gone")
        self.actors[i].kill()

    def restart(self, i: int) -> Ref:
        """A new actor in slot ``i`` (the old one killed); ``starting`` until ``mark_ready``.
        Returns its first ping, answered ``start_s`` later."""
        if self.make is None:
            raise NotImplementedError(f"the simulated {self.name} group cannot start actors")
        if self.actors[i] is not None:
            self.actors[i].kill()
        self.incarnation[i] += 1
        self.actors[i] = self.make(i)
        self._set(i, "starting")
        ref = Ref()
        self._owners[ref] = (i, self.incarnation[i])
        self.tr.later(self.start_s, lambda: self.tr.resolve(ref, "ok"))
        return ref

    def kill(self) -> None:
        pass


class SimPlacement:
    def add(self, plan) -> None:  # (every simulated actor has its device: nothing to reserve)
        pass

    def rescheduling(self, names: list) -> list:
        return []

    def release(self, name: str) -> None:
        pass

    def renew(self, name: str) -> None:
        pass

    def remove(self) -> None:
        pass


class Fleet:
    """The simulated actors' shared state: the clock, the cost model, the random draws, and
    shared token lists (the driver reads lengths and versions, never the ids)."""

    def __init__(self, recipe, costs, lengths: "Lengths", seed: int = 0):
        self.recipe, self.costs, self.lengths = recipe, costs, lengths
        self.tr = SimTransport(costs.latency_s)
        self.rng = random.Random(seed)
        self.system: SimSystem | None = None
        self._lists: dict = {}
        self._newest = 0  # the newest version a list of versions was made for
        # the n-th weight transfer (every rank's n-th send_weights): its ranks' jobs under way,
        # whether it is done, the members rank 0 found dead (nothing sent), the member killed mid-way
        self.transfers: dict[int, dict] = {}
        self.on_send = None  # called with the version once learner rank 0's members answered and it sends (a test's hook)
        self.driver = None  # the GrpoDriver run on this fleet (``run_driver``)
        self.on_driver = None  # called with it before it runs (a scenario's hook)
        self._solve: dict[str, float] = {}

    def later(self, seconds: float, fn) -> None:
        self.tr.later(seconds, fn)

    def tokens(self, n: int) -> np.ndarray:
        """As the generator's completion ids: int32 arrays."""
        key = ("t32", n)
        if key not in self._lists:
            self._lists[key] = TokenIds.of([1] * n)
        return self._lists[key]

    def logprobs(self, n: int) -> np.ndarray:
        """As the generator's and the reference's (``batching.completion_logprobs``): float32 arrays."""
        key = ("l32", n)
        if key not in self._lists:
            self._lists[key] = np.full(n, -0.5, dtype=np.float32)
        return self._lists[key]

    def versions(self, n: int, v: int) -> list[int]:
        if v > self._newest:  # the lists of versions no generator holds any more (4 MB a step at 256 generators)
            self._newest = v
            for key in [k for k in self._lists if isinstance(k[0], tuple) and k[0][1] < v - 4]:
                del self._lists[key]
        return self._list(("v", v), n, v)

    def _list(self, kind, n: int, x):
        key = (kind, n)
        if key not in self._lists:
            self._lists[key] = [x] * n
        return self._lists[key]

    def solve_rate(self, prompt_id: str) -> float:
        base = prompt_id.split(".")[0]
        if base not in self._solve:
            self._solve[base] = self.rng.random()
        return self._solve[base]


class _Nobody(SimActor):
    def __init__(self):
        self.name, self.spans, self.open = "timer", [], {}

    def span(self, *a, **k) -> None:
        pass


_NOBODY = _Nobody()


class SimSystem(System):
    """The run's groups as simulated actors on their devices: one pool for a CPU machine
    (``costs.cores``), else one device per actor (vLLM engines for the generators)."""

    def __init__(self, recipe, fleet: Fleet):
        super().__init__(recipe, "simulated", GRPO)
        self.fleet = fleet
        fleet.system = self
        tr, r, ns = fleet.tr, recipe, recipe.ray.call_timeout_s
        shared = Pool(tr, fleet.costs.cores, fleet.costs.background) if fleet.costs.cores < math.inf else None

        def device(kind: str) -> Device:
            if kind == "generator" and self.batches_requests:
                g = r.generator
                return VllmDevice(tr, fleet.costs, g.max_num_seqs,
                                  fleet.costs.kv_tokens(g.gpu_memory_utilization, g.tensor_parallel_size))
            return shared or Pool(tr)

        def group(name: str, cls: type, sim: type, n: int, kind: str) -> SimGroup:
            def make(i: int) -> SimActor:
                return sim(f"{name}-{i}", fleet, device(kind))

            return SimGroup(name, cls, [make(i) for i in range(n)], tr, ns, make, fleet.costs.seconds("start"))

        self.learners = group("learner-rank", LearnerRank, SimLearner, r.learner.num_ranks, "learner")
        self.generators = group("generator", Generator, SimGenerator, r.generator.num_actors, "generator")
        self.scorers = group("reward-scorer", RewardScorer, SimScorer, r.scorer.num_actors, "scorer")
        if r.reference_actor:
            self.reference = group("reference", Reference, SimReference, r.reference.num_actors, "reference")
        if r.grpo.rollout_managers:
            self.managers = group("rollout-manager", RolloutManager, SimManager, r.grpo.rollout_managers, "manager")
            for m in self.managers.actors:
                with m.acting():
                    m.manager.set_groups({"generators": self.generators, "scorers": self.scorers,
                                          "reference": self.reference, "teacher": self.teacher})
        self.placement = SimPlacement()
        self.transfer_members = self.generators.ready() if self.streams_weights else None
        self.watchdog = Watchdog(self.groups(), r.ray.heartbeat_s, r.ray.liveness_timeout_s)
        for g in self.groups():
            g.watchdog = self.watchdog

    def start(self) -> "SimSystem":
        return self

    def manager_views(self) -> None:
        """(the simulated managers call the fleet's groups themselves: nothing to send)"""
        return None

    def form_transfer(self, members: list[int]) -> list:
        """The learners' side of forming the transfer group with ``members`` (the generators'
        side is inside it, as in ``cluster/weight_sync.start_transfer``)."""
        r = self.r
        self.transfer_members = list(members)
        return self.learners.call_all(LearnerRank.init_weight_transfer, None, "nccl", "", 0,
                                      1 + len(members) * r.generator.tensor_parallel_size, r.generator.bucket_mb << 20,
                                      r.generator.dtype, self.timeout)


# -- what things cost ------------------------------------------------------------------------
@dataclass
class Lengths:
    """Completion lengths: per prompt a log-normal median (``median`` x exp(N(0, prompt_sigma)):
    hard prompts run long), each sample log-normal around it (``sigma``), cut at ``cap``."""

    cap: int
    median: float
    sigma: float = 0.5
    prompt_sigma: float = 0.5
    floor: int = 1

    def group(self, rng: random.Random, n: int) -> list[int]:
        mu = math.log(self.median) + rng.gauss(0.0, self.prompt_sigma)
        return [max(self.floor, min(self.cap, int(math.exp(mu + rng.gauss(0.0, self.sigma))))) for _ in range(n)]

    @classmethod
    def fitted(cls, cap: int, mean: float, truncated: float, prompt_share: float = 0.45) -> "Lengths":
        """The log-normal whose draws, cut at ``cap``, have this ``mean`` and this fraction ``truncated``
        at the cap (two published figures, two parameters: the median and the total sigma), its
        variance split between prompts (``prompt_share``) and a prompt's samples."""
        z = NormalDist().inv_cdf(1.0 - truncated)  # log(cap) = mu + z sigma

        def capped_mean(sigma: float) -> float:
            mu = math.log(cap) - z * sigma
            return math.exp(mu + sigma * sigma / 2) * NormalDist().cdf(z - sigma) + cap * truncated

        lo, hi = 1e-3, 4.0  # the capped mean falls as sigma grows with the cap's quantile held
        if not capped_mean(hi) < mean < capped_mean(lo):
            raise ValueError(f"no log-normal cut at {cap} has mean {mean} with {truncated:.1%} at the cap")
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if capped_mean(mid) > mean else (lo, mid)
        sigma = (lo + hi) / 2
        return cls(cap, math.exp(math.log(cap) - z * sigma), sigma * math.sqrt(1 - prompt_share),
                   sigma * math.sqrt(prompt_share))

    def with_mean(self, mean: float, at_cap: int) -> "Lengths":
        """These spreads with the median moved so that draws cut at ``at_cap`` have ``mean``
        (one published figure, one parameter)."""
        s = math.hypot(self.sigma, self.prompt_sigma)

        def capped_mean(median: float) -> float:
            z = (math.log(at_cap) - math.log(median)) / s
            return median * math.exp(s * s / 2) * NormalDist().cdf(z - s) + at_cap * (1 - NormalDist().cdf(z))

        lo, hi = 1.0, 100.0 * at_cap  # the capped mean grows with the median, towards the cap
        if not capped_mean(lo) < mean < at_cap:
            raise ValueError(f"no median gives a mean of {mean} cut at {at_cap} with sigma {s:.2f}")
        for _ in range(200):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if capped_mean(mid) < mean else (lo, mid)
        return replace(self, median=math.sqrt(lo * hi))

    def stats(self, draws: int = 20000, seed: int = 0) -> dict:
        rng = random.Random(seed)
        xs = [x for _ in range(draws // 8) for x in self.group(rng, 8)]
        xs.sort()
        return {"mean": sum(xs) / len(xs), "median": xs[len(xs) // 2], "p90": xs[int(0.9 * len(xs))],
                "truncated": sum(x >= self.cap for x in xs) / len(xs)}


@dataclass
class Model:
    name: str
    params: float
    layers: int
    kv_heads: int
    head_dim: int

    @property
    def kv_bytes_per_token(self) -> float:  # K and V, bf16
        return self.layers * 2 * self.kv_heads * self.head_dim * 2

    @property
    def weight_bytes(self) -> float:  # bf16
        return 2 * self.params


QWEN_1_5B = Model("Qwen2.5-1.5B", 1.54e9, 28, 2, 128)
QWEN_7B = Model("Qwen2.5-7B", 7.6e9, 28, 4, 128)


@dataclass
class GpuCosts:
    """H100 SXM costs (sources in docs/simulator.md): 989 TFLOPS dense bf16, 3.35 TB/s HBM,
    NVLink 380 GB/s measured one way, NDR InfiniBand 45 GB/s per NIC effective."""

    model: Model
    peak_flops: float = 989e12
    hbm_bw: float = 3.35e12
    nvlink_bw: float = 380e9
    ib_bw: float = 45e9
    gpus_per_node: int = 8
    step_overhead_s: float = 0.003  # per decode step: scheduling, launches (vLLM V1, fit to 5-8 ms at 7-8B)
    hbm_efficiency: float = 0.8
    decode_mfu: float = 0.2  # a large decode batch: fit to vLLM 0.6 8B bf16, 256 seqs, 25.6 ms TPOT (Lambda)
    prefill_mfu: float = 0.5
    train_mfu: float = 0.35  # effective, ZeRO-3 communication included (torchtitan FSDP: 33-39%)
    reference_mfu: float = 0.45
    gradient_checkpointing: bool = True
    score_s: float = 0.004  # math-verify, per completion, one worker
    scorer_workers: int = 8
    sync_overhead_s: float = 0.25  # a weight sync beyond the wire time (verl: 0.12-0.3 s at 7B)
    optimizer_s: float = 0.5  # ZeRO-3 Adam step and gradient reduce-scatter tail
    # colocated vLLM (placement.mode colocate): sleep level 2 frees the weights and the KV cache;
    # waking allocates them again before the weights arrive (vLLM's sleep-mode post: level-2
    # wakes of 0.8-2.6 s on A100s, weights reloaded from disk included; here they come by IPC)
    sleep_s: float = 0.3
    wake_s: float = 1.0
    # assumed, not measured: an actor started mid-run (replaced or added) answers after start_s
    # (its process, the weights from local disk, a vLLM engine's CUDA graphs); a weight-transfer
    # group formed again (its members changed) takes transfer_form_s (NCCL's communicator start)
    start_s: float = 60.0
    transfer_form_s: float = 2.0
    cores: float = math.inf  # every actor on its own device
    background: float = 0.0
    latency_s: float = 0.002  # Ray's dispatch of a task to an actor
    # a vLLM engine's KV cache: gpu_memory_utilization of the device's memory (an H100 SXM's
    # 80 GB as torch reports it, 79.2 GiB), less the weights and what vLLM keeps beside them
    # (assumed: the activations of its profiling run, CUDA graphs, the CUDA context)
    hbm_bytes: float = 79.2 * 2**30
    vllm_reserved_bytes: float = 3e9
    kv_bound: bool = True  # False: the engines' caches hold everything (as the simulator assumed before)

    def decode_step(self, running: int, context_tokens: float) -> float:
        m = self.model
        memory = (m.weight_bytes + m.kv_bytes_per_token * context_tokens) / (self.hbm_efficiency * self.hbm_bw)
        compute = 2 * m.params * running / (self.decode_mfu * self.peak_flops)
        return self.step_overhead_s + max(memory, compute)

    def prefill(self, tokens: int) -> float:
        return 2 * self.model.params * tokens / (self.prefill_mfu * self.peak_flops)

    def kv_tokens(self, gpu_memory_utilization: float, tensor_parallel_size: int = 1) -> float:
        """Tokens a vLLM engine's KV cache holds (over its ``tensor_parallel_size`` GPUs)."""
        if not self.kv_bound:
            return math.inf
        tp = tensor_parallel_size
        free = tp * (gpu_memory_utilization * self.hbm_bytes - self.vllm_reserved_bytes) - self.model.weight_bytes
        return free / self.model.kv_bytes_per_token

    def generate(self, sequences: int, tokens: int) -> float:  # (vLLM devices model it themselves)
        raise NotImplementedError

    def score(self, samples: int) -> float:
        return self.score_s * samples / self.scorer_workers

    def reference(self, samples: int, tokens: int) -> float:
        return 2 * self.model.params * tokens / (self.reference_mfu * self.peak_flops)

    def train(self, samples: int, tokens: int, ranks: int) -> float:
        flops = (8 if self.gradient_checkpointing else 6) * self.model.params * tokens
        return flops / (self.train_mfu * self.peak_flops) + self.optimizer_s

    def sync_seconds(self, generators: int) -> float:
        """Learner rank 0 gathers the weights and broadcasts them to the generators: over
        NVLink within a node, over one NIC per hop beyond it (NCCL's ring: about one copy)."""
        bw = self.nvlink_bw if generators < self.gpus_per_node else self.ib_bw
        return self.sync_overhead_s + 2 * self.model.weight_bytes / bw

    def seconds(self, kind: str) -> float:
        return {"start": self.start_s, "init_weight_transfer": self.transfer_form_s}.get(kind, 0.0)

    def demand(self, kind: str) -> float:
        return 1.0


@dataclass
class CpuCosts:
    """Solo seconds per call measured on this machine (``fit_cpu_costs``), and the cores the
    actors share: every call of a kind keeps ``threads[kind]`` of them busy."""

    per_call: dict  # kind -> solo seconds per call (generate, train, export_weights, load_weights)
    per_sample: dict  # kind -> solo seconds per sample (score, ref_logprobs)
    threads: dict  # kind -> cores it keeps busy
    cores: float = 2.0
    background: float = 0.0  # cores kept busy beside the actors' calls whenever one runs (driver, Ray)
    latency_s: float = 0.0  # Ray's dispatch of a work call, measured as the gaps between stages

    def generate(self, sequences: int, tokens: int) -> float:
        return self.per_call["generate"]

    def score(self, samples: int) -> float:
        return self.per_sample["score"] * samples

    def reference(self, samples: int, tokens: int) -> float:
        return self.per_sample["ref_logprobs"] * samples

    def train(self, samples: int, tokens: int, ranks: int) -> float:
        return self.per_call["train"]

    def sync_seconds(self, generators: int) -> float:
        return self.per_call.get("send_weights", 0.0)

    def seconds(self, kind: str) -> float:
        return self.per_call.get(kind, 0.0)

    def demand(self, kind: str) -> float:
        return self.threads.get(kind, 1.0)


def solo_seconds(spans: list[dict], cores: float, threads: dict, background: float = 0.0) -> list[tuple[dict, float]]:
    """Each span's solo seconds under processor sharing: the integral over the span of the
    speed it had, ``min(1, cores / busy threads)`` with every span open at that moment counted."""
    edges = sorted({sp["t0"] for sp in spans} | {sp["t1"] for sp in spans})
    # the busy threads in each elementary interval (spans of one actor and kind overlap only
    # for a vLLM generator, which is one engine: counted once)
    open_at = [0.0] * (len(edges) - 1)
    index = {t: i for i, t in enumerate(edges)}
    seen: dict = {}
    for sp in spans:
        key = (sp["actor"], sp["kind"])
        for i in range(index[sp["t0"]], index[sp["t1"]]):
            if (key, i) not in seen:
                seen[(key, i)] = True
                open_at[i] += threads.get(sp["kind"], 1.0)
    speed = [min(1.0, cores / (d + background)) if d > 0 else 1.0 for d in open_at]
    width = [edges[i + 1] - edges[i] for i in range(len(edges) - 1)]
    out = []
    for sp in spans:
        i0, i1 = index[sp["t0"]], index[sp["t1"]]
        out.append((sp, sum(speed[i] * width[i] for i in range(i0, i1))))
    return out


def read_timeline(path: Path) -> list[dict]:
    """A run's ``timeline.json`` back as spans (``actor``, ``kind``, ``t0``, ``t1`` in seconds, ``args``)."""
    import json

    events = json.loads(Path(path).read_text())["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e["tid"]}
    return [{"actor": names[e["tid"]], "kind": e["name"], "t0": e["ts"] / 1e6, "t1": (e["ts"] + e["dur"]) / 1e6,
             "args": e.get("args", {})} for e in events if e.get("ph") == "X"]


def fit_cpu_costs(spans: list[dict], cores: float, threads: dict, background: float = 0.0) -> CpuCosts:
    """Solo costs from a run's spans (``read_timeline``): seconds per call (generate, train on
    each rank, export, load) and per sample (score, reference)."""
    per: dict[str, list[tuple[float, int]]] = {}
    for sp, solo in solo_seconds([sp for sp in spans if sp["kind"] in threads], cores, threads, background):
        size = sp["args"].get("samples") or sp["args"].get("sequences") or 1
        per.setdefault(sp["kind"], []).append((solo, size))
    if "train" not in per:
        raise ValueError("the timeline has no train spans: not a GRPO run's")
    per_call = {k: sum(s for s, _ in per[k]) / len(per[k])
                for k in ("generate", "train", "export_weights", "load_weights") if k in per}
    per_sample = {k: sum(s for s, _ in per[k]) / max(1, sum(n for _, n in per[k])) if k in per else 0.0
                  for k in ("score", "ref_logprobs")}
    return CpuCosts(per_call, per_sample, threads, cores, background)


def run_driver(recipe, fleet: Fleet, prompts: int = 100_000, prompt_tokens=lambda rng: 64, samples_log=None,
               spans: list | None = None, timeline: Path | None = None):
    """``GrpoDriver`` on the simulated fleet; returns (driver, records). ``samples_log``: a
    ``MetricsWriter`` of samples.jsonl (``run_logged``); ``spans``: a list that gets every
    actor's spans as the driver drains them (labelled, as the timeline has them); ``timeline``:
    where to write timeline.json, as a run does."""
    from r1ray.cluster import transport
    from r1ray.controllers.grpo.driver import GrpoDriver

    class Renderer:
        def __init__(self):
            self.rng = random.Random(recipe.seed)
            self.lengths: dict = {}

        def prompt(self, row: dict, prompt_id: str) -> dict:
            n = self.lengths.setdefault(row["row"], prompt_tokens(self.rng))
            # (its own list, as a real prompt's: ``payload`` counts a prompt list met twice in an argument once)
            return {"prompt_id": prompt_id, "prompt_ids": [1] * n, "columns": {}}

    class Metrics:
        def __init__(self):
            self.records = []

        def write(self, record: dict) -> None:
            self.records.append(record)

    rows = [{"row": i} for i in range(prompts)]
    data = PreparedData(rows, [], range(prompts), [])
    system = fleet.system or SimSystem(recipe, fleet)
    with transport.use(fleet.tr):
        driver = fleet.driver = GrpoDriver(system, recipe, data, Renderer(), Metrics(), samples_log=samples_log,
                                           timeline=timeline)
        if fleet.on_driver is not None:
            fleet.on_driver(driver)
        driver.ray_metrics = _NoMetrics()
        if spans is not None:
            driver.telemetry.sinks.append(spans.extend)
        try:
            records = driver.run()
        finally:
            driver.telemetry.close()
    return driver, records


def run_logged(recipe, fleet: Fleet, **kw) -> tuple:
    """``run_driver`` with samples.jsonl written as a run writes it (``MetricsWriter``, in a
    directory of its own): (driver, records, samples.jsonl's lines)."""
    with tempfile.TemporaryDirectory() as tmp:
        log = MetricsWriter(Path(tmp), "samples.jsonl")
        try:
            driver, records = run_driver(recipe, fleet, samples_log=log, **kw)
        finally:
            log.close()
        return driver, records, read_jsonl(Path(tmp) / "samples.jsonl")


class _NoMetrics:
    def record(self, rec: dict) -> None:
        pass
