"""Utilisation accounting and the Chrome-trace timeline, from the actors' busy spans."""
from __future__ import annotations

import json
from pathlib import Path

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
    wall = max(end - start, 1e-9)
    out = {}
    for name, actors, kinds, n in groups:
        own = {a: by_kind for a, by_kind in by_actor.items() if a.rsplit("-", 1)[0] == actors}
        busy = _busy(own, start, end, kinds) / max(n, 1)  # n is 0 while a group's only actor is replaced
        out[name] = {"actors": n, "busy_s": round(busy, 3), "idle_s": round(max(0.0, wall - busy), 3),
                     "idle_ratio": round(max(0.0, 1 - busy / wall), 4)}
    return out


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


def write_timeline(spans: list[dict], path: Path) -> None:
    """Chrome trace format (chrome://tracing, ui.perfetto.dev): one row per actor, one box per span."""
    if not spans:
        path.write_text(json.dumps({"traceEvents": [], "displayTimeUnit": "ms"}))
        return
    t0 = min(sp["t0"] for sp in spans)
    actors = sorted({sp["actor"] for sp in spans})
    tid = {a: i + 1 for i, a in enumerate(actors)}
    events = [{"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": "r1ray"}}]
    events += [{"name": "thread_name", "ph": "M", "pid": 1, "tid": tid[a], "args": {"name": a}} for a in actors]
    for sp in sorted(spans, key=lambda s: s["t0"]):
        events.append({"name": sp["kind"], "cat": sp["actor"].rsplit("-", 1)[0], "ph": "X", "pid": 1, "tid": tid[sp["actor"]],
                       "ts": round((sp["t0"] - t0) * 1e6, 1), "dur": round(max(0.0, sp["t1"] - sp["t0"]) * 1e6, 1),
                       "args": sp.get("args", {})})
    path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))


class SpanCollector:
    """The busy spans of every actor of a ``System``, labelled with their dashboard names."""

    def __init__(self, system):
        self.system, self.spans = system, []  # every span of the run: the timeline, the run's utilisation
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
        s = self.system
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
            self.spans.extend(part)
            self.recent.extend(part)

    def window(self) -> dict:
        """``step_timing`` since the previous call (a learner step's window)."""
        now = transport.wall()
        self.drain()
        out = step_timing(self.recent, self.window_start, now, self.groups())
        self.window_start = now
        self.recent = still_open(self.recent, now)
        return out

    def utilisation(self, start: float, end: float) -> dict:
        return utilisation(self.spans, start, end, self.groups())

    def write_timeline(self, path: Path) -> None:
        write_timeline(self.spans, path)
