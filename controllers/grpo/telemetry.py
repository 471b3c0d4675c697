"""Utilisation accounting and the Chrome-trace timeline, from the actors' busy spans."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ...cluster import transport
from ...cluster.groups import RemoteCallError


def _covered(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Seconds of [start, end] covered by at least one interval (overlaps count once)."""
    total, reach = 0.0, start
    for t0, t1 in sorted(intervals):
        t0, t1 = max(t0, reach), min(t1, end)
        if t1 > t0:
            total += t1 - t0
            reach = t1
    return total


def _by_actor(spans: list[dict], start: float, end: float) -> dict[str, dict[str, list]]:
    """actor -> span kind -> the (t0, t1) of its spans that overlap [start, end]: one pass."""
    out: dict[str, dict[str, list]] = {}
    for sp in spans:
        if sp["t1"] > start and sp["t0"] < end:
            out.setdefault(sp.get("actor", ""), {}).setdefault(sp["kind"], []).append((sp["t0"], sp["t1"]))
    return out


def _busy(by_actor: dict[str, dict[str, list]], start: float, end: float, kinds) -> float:
    """Seconds inside [start, end] when an actor had a span of ``kinds`` open, summed over actors
    (calls that overlap on one actor, as a vLLM generator's do, count once)."""
    return sum(_covered([iv for k in kinds for iv in by_kind.get(k, ())], start, end) for by_kind in by_actor.values())


def busy_seconds(spans: list[dict], start: float, end: float) -> dict[str, float]:
    """Busy seconds of each span kind inside [start, end] (summed over actors)."""
    return _busy_seconds(_by_actor(spans, start, end), start, end)


def _busy_seconds(by_actor: dict[str, dict[str, list]], start: float, end: float) -> dict[str, float]:
    kinds = {k for by_kind in by_actor.values() for k in by_kind}
    return {kind: _busy(by_actor, start, end, (kind,)) for kind in kinds}


Groups = list[tuple[str, str, tuple[str, ...], int]]  # (group, its actors' name, the span kinds of its busy time, actors)


def utilisation(spans: list[dict], start: float, end: float, groups: Groups) -> dict:
    """Busy and idle seconds and the idle ratio of each actor group over [start, end]: the spans
    of ``kinds`` on the group's own actors (``<actors>-<i>``), so that a kind two groups log, as
    the reference actors' and LoRA's learner ranks' ``ref_logprobs``, counts for each group's own."""
    return _utilisation(_by_actor(spans, start, end), start, end, groups)


def _utilisation(by_actor: dict[str, dict[str, list]], start: float, end: float, groups: Groups) -> dict:
    out = {}
    for name, actors, kinds, n in groups:
        own = {a: by_kind for a, by_kind in by_actor.items() if _group_of(a) == actors}
        out[name] = _figures(n, _busy(own, start, end, kinds), start, end)
    return out


def _group_of(actor: str) -> str:
    """The name of an actor's group: ``learner-rank-1`` -> ``learner-rank``."""
    return actor.rsplit("-", 1)[0]


def _figures(n: int, busy: float, start: float, end: float) -> dict:
    """A group's utilisation over [start, end] from its ``n`` actors' busy seconds, summed."""
    wall = max(end - start, 1e-9)
    busy /= max(n, 1)  # n is 0 while a group's only actor is replaced
    return {"actors": n, "busy_s": round(busy, 3), "idle_s": round(max(0.0, wall - busy), 3),
            "idle_ratio": round(max(0.0, 1 - busy / wall), 4)}


def step_timing(spans: list[dict], start: float, end: float, groups: Groups) -> dict:
    """A learner step's timing keys over its window [start, end]: the busy seconds of each stage
    (the learner's per rank) and each group's ``utilisation``: one pass over ``spans`` for both."""
    by_actor = _by_actor(spans, start, end)
    busy = _busy_seconds(by_actor, start, end)
    ranks = next(n for name, _, _, n in groups if name == "learner")
    out = {"time/generate_s": busy.get("generate", 0.0), "time/score_s": busy.get("score", 0.0),
           "time/reference_s": busy.get("ref_logprobs", 0.0), "time/train_s": busy.get("train", 0.0) / ranks}
    if any(name == "teacher" for name, *_ in groups):
        out["time/teacher_s"] = busy.get("teacher_logprobs", 0.0)
    for group, u in _utilisation(by_actor, start, end, groups).items():
        out[f"util/{group}/busy_s"], out[f"util/{group}/idle_ratio"] = u["busy_s"], u["idle_ratio"]
    return out


def still_open(spans: list[dict], start: float) -> list[dict]:
    """The spans that end after ``start``: all that a window from ``start`` on can overlap."""
    return [sp for sp in spans if sp["t1"] > start]


class TimelineWriter:
    """``timeline.json`` written as the spans are drained, so that the driver keeps none of them:
    Chrome trace format (chrome://tracing, ui.perfetto.dev), one row per actor, one box per span,
    times from the first span written. It is written to a hidden ``.part-`` file (which a staged
    run directory does not upload while it grows) and takes its name at ``close``. The timelines
    of earlier attempts (a resumed run) are kept, oldest first, as ``timeline.1.json``,
    ``timeline.2.json``, ...: a finished one, and one whose driver was killed (its ``.part-``
    file, closed after its last whole event)."""

    HEAD = '{"displayTimeUnit": "ms", "traceEvents": [\n'

    def __init__(self, path: Path):
        self.path = Path(path)
        if self.path.exists():
            self.path.rename(self._older())
        for orphan in sorted(self.path.parent.glob(f".{self.path.name}.part-*"), key=lambda p: p.stat().st_mtime):
            self._recover(orphan, self._older())
        self.part = self.path.with_name(f".{self.path.name}.part-{os.getpid()}")
        self.f = self.part.open("w")
        self.f.write(self.HEAD + '{"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": "r1ray"}}')
        self.tid: dict[str, tuple[int, str]] = {}  # actor -> (its row, its group)
        self.origin: float | None = None

    def _older(self) -> Path:
        n = 1
        while (older := self.path.with_name(f"{self.path.stem}.{n}{self.path.suffix}")).exists():
            n += 1
        return older

    def _recover(self, part: Path, to: Path) -> None:
        """A killed driver's timeline, closed after its last whole event (one a line)."""
        with part.open() as src, to.open("w") as dst:
            src.readline()
            dst.write(self.HEAD)
            sep = ""
            for line in src:
                event = line.rstrip("\n").rstrip(",")
                try:
                    json.loads(event)
                except ValueError:
                    break  # cut in the middle of a write
                dst.write(sep + event)
                sep = ",\n"
            dst.write("\n]}\n")
        part.unlink()

    def write(self, spans: list[dict]) -> None:
        if not spans or self.f is None:
            return
        if self.origin is None:
            self.origin = min(sp["t0"] for sp in spans)
        out = []
        for sp in sorted(spans, key=lambda s: s["t0"]):
            actor = sp["actor"]
            if (row := self.tid.get(actor)) is None:
                row = self.tid[actor] = (len(self.tid) + 1, _group_of(actor))
                out.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": row[0], "args": {"name": actor}})
            out.append({"name": sp["kind"], "cat": row[1], "ph": "X", "pid": 1, "tid": row[0],
                        "ts": round((sp["t0"] - self.origin) * 1e6, 1), "dur": round(max(0.0, sp["t1"] - sp["t0"]) * 1e6, 1),
                        "args": sp.get("args", {})})
        self.f.write("".join(",\n" + json.dumps(e) for e in out))  # (6 µs a span: 40 ms a step at 256 generators)
        self.f.flush()

    def close(self) -> None:
        """The events closed and the file given its name (a run stopped or failed: what was drained)."""
        if self.f is None:
            return
        self.f.write("\n]}\n")
        self.f.close()
        self.f = None
        self.part.rename(self.path)


def write_timeline(spans: list[dict], path: Path) -> None:
    """All of ``spans`` as a ``timeline.json`` at once (``TimelineWriter``)."""
    writer = TimelineWriter(path)
    writer.write(spans)
    writer.close()


class BusyIntervals:
    """Each actor's busy time as disjoint intervals: the spans of its group's kinds merged as
    they are drained, so that the run's utilisation over any window is exact without keeping
    the spans (16 bytes an interval; a stretch of work without a gap is one)."""

    def __init__(self):
        self.bounds: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # actor -> (starts, ends), sorted

    def add(self, spans: list[dict], groups: Groups) -> None:
        kinds = {actors: set(k) for _, actors, k, _ in groups}
        counted: dict[str, set] = {}  # actor -> its group's busy kinds (an actor's spans come together)
        new: dict[str, list] = {}
        for sp in spans:
            actor = sp["actor"]
            if (own := counted.get(actor)) is None:
                own = counted[actor] = kinds.get(_group_of(actor), set())
            if sp["t1"] > sp["t0"] and sp["kind"] in own:
                new.setdefault(actor, []).append((sp["t0"], sp["t1"]))
        for actor, intervals in new.items():
            t = np.array(intervals, dtype=np.float64)
            starts, ends = self.bounds.get(actor, (np.empty(0), np.empty(0)))
            # the intervals that end before the earliest new start stay as they are (ends grow
            # with starts): only the tail is merged again, not the run's history (sorting all of
            # it each step grew a step's cost by 12.6 ms over 500 steps at 256 generators)
            k = int(np.searchsorted(ends, t[:, 0].min()))
            tail_s, tail_e = np.concatenate([starts[k:], t[:, 0]]), np.concatenate([ends[k:], t[:, 1]])
            order = np.argsort(tail_s, kind="stable")
            tail_s, tail_e = tail_s[order], tail_e[order]
            reach = np.maximum.accumulate(tail_e)  # the furthest end so far: a start past it opens an interval
            first = np.flatnonzero(np.r_[True, tail_s[1:] > reach[:-1]])
            self.bounds[actor] = (np.concatenate([starts[:k], tail_s[first]]),
                                  np.concatenate([ends[:k], reach[np.r_[first[1:] - 1, len(tail_s) - 1]]]))

    def intervals(self) -> int:
        return sum(len(s) for s, _ in self.bounds.values())

    def utilisation(self, start: float, end: float, groups: Groups) -> dict:
        """``utilisation`` of the spans added, over [start, end]."""
        return {name: _figures(n, sum(float(np.sum(np.clip(e, start, end) - np.clip(s, start, end)))
                                      for a, (s, e) in self.bounds.items() if _group_of(a) == actors), start, end)
                for name, actors, _, n in groups}


class SpanCollector:
    """The busy spans of every actor of a ``System``, labelled with their dashboard names, drained
    into what the driver needs of them: each step's timing, the run's busy intervals (its
    utilisation), and ``timeline.json`` on disk (``timeline``). It keeps no span past the window
    it may still count in: at 256 generators a step has 6,500 spans, 2.2 MB of dicts, and
    keeping every span of the run (as it did) grew the driver by that every step."""

    def __init__(self, system, timeline: Path | None = None, steps: list[int] | None = None, first_step: int = 1):
        self.system = system
        self.timeline = TimelineWriter(timeline) if timeline is not None else None
        self.busy = BusyIntervals()
        self.sinks = [self._to_timeline] if self.timeline is not None else []  # each drained part, labelled
        # ``logging.timeline_steps``: the steps whose spans the timeline keeps (None: every one);
        # ``step``: the step whose window is open (``window`` closes it)
        self.steps, self.step = (None if steps is None else set(steps)), first_step
        # the spans a step's window may still overlap (``recent``): a step's timing scans those,
        # not the run's every span (6,500 more each step with 256 generators, 0.7 µs a span to
        # scan: a step's timing grew by 4.6 ms a step, 0.46 s by step 100)
        self.recent: list[dict] = []
        self.window_start = transport.wall()

    def groups(self) -> Groups:
        """(group, its actors' name, the span kinds that count as its busy time, actors) for utilisation."""
        s = self.system
        out = [("generator", s.generators.name, ("generate", "load_weights", "weight_update"), len(s.generators.ready())),
               ("scorer", s.scorers.name, ("score",), len(s.scorers.ready())),
               # ref_logprobs: LoRA's reference, the learner with its adapters off
               ("learner", s.learners.name, ("train", "export_weights", "send_weights", "ref_logprobs"), len(s.learners))]
        if s.reference is not None:
            out.append(("reference", s.reference.name, ("ref_logprobs",), len(s.reference.ready())))
        if s.teacher is not None:
            out.append(("teacher", s.teacher.name, ("teacher_logprobs",), len(s.teacher.ready())))
        return out

    def drain(self) -> None:
        s, drained = self.system, []
        calls = [(grp, name, ref) for grp in s.groups()
                 for name, ref in zip(grp.names(), grp.call_all(grp.cls.drain_spans, control=True))]
        for grp, name, ref in calls:
            try:
                part = grp.get(ref, "drain_spans", s.timeout)
            except RemoteCallError:
                if grp.elastic:  # lost meanwhile: the driver replaces it; its spans are gone with it
                    continue
                raise
            for sp in part:
                sp["actor"] = name
            drained += part
        self._take(drained)

    def drain_one(self, grp, i: int) -> None:
        """The spans of one actor about to leave (a drained generator retired), before they go with it."""
        try:
            part = grp.get(grp.call(i, grp.cls.drain_spans, control=True), "drain_spans", self.system.timeout)
        except RemoteCallError:  # (lost meanwhile: its spans are gone with it)
            return
        for sp in part:
            sp["actor"] = grp.name_of(i)
        self._take(part)

    def _take(self, drained: list[dict]) -> None:
        """Spans as drained: each step's timing and the run's busy time count the spans still
        open as far as they have run (``SpanLog.drain``), so that a call spanning steps counts in
        each; the timeline and the sinks get each span once, when it has ended."""
        self.recent += drained
        self.busy.add(drained, self.groups())
        ended = [sp for sp in drained if not sp.get("open")]
        for sink in self.sinks:
            sink(ended)

    def _to_timeline(self, drained: list[dict]) -> None:
        if self.steps is None or self.step in self.steps:
            self.timeline.write(drained)

    def window(self) -> dict:
        """``step_timing`` since the previous call (a learner step's window)."""
        now = transport.wall()
        self.drain()
        out = step_timing(self.recent, self.window_start, now, self.groups())
        self.window_start = now
        self.step += 1
        # (a span drained open comes again, as far as it has run or whole, with the next drain)
        self.recent = [sp for sp in still_open(self.recent, now) if not sp.get("open")]
        return out

    def utilisation(self, start: float, end: float) -> dict:
        return self.busy.utilisation(start, end, self.groups())

    def close(self) -> None:
        """``timeline.json`` complete with what was drained (also of a run stopped or failed)."""
        if self.timeline is not None:
            self.timeline.close()
