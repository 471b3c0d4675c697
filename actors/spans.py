"""Busy intervals of an actor (what it was doing, from when to when), drained by the driver.

Wall-clock ``time.time()`` so intervals from different processes line up on one timeline.
"""
from __future__ import annotations

import itertools
import threading
import time
from contextlib import contextmanager


def around_gap(t0: float, t1: float, gap: tuple | None) -> list[tuple[float, float, bool]]:
    """[t0, t1] in pieces around ``gap`` (its first two items: start and end), as
    ``(start, end, inside the gap)``: the gap cut to [t0, t1], ignored where they do not
    overlap; pieces of no length left out."""
    g0, g1 = (max(gap[0], t0), min(gap[1], t1)) if gap is not None else (t0, t0)
    if g0 >= g1:
        return [(t0, t1, False)]
    return [piece for piece in ((t0, g0, False), (g0, g1, True), (g1, t1, False)) if piece[1] > piece[0]]


class SpanLog:
    """The driver labels each span with the actor's dashboard name when it drains them.

    A span still open when drained (a generate call of long traces spans several learner
    steps) comes as well, as far as it has run: ``open: True``, ``t1`` the time of the drain.
    Each step's busy time then counts the work in progress in it, not only the calls that
    ended in it; the span itself comes once more, whole, when it ends."""

    def __init__(self):
        self._spans: list[dict] = []
        self._open: dict[int, dict] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()

    @contextmanager
    def span(self, kind: str, **args):
        key = self.begin(kind, **args)
        try:
            yield
        finally:
            self.end(key)

    def begin(self, kind: str, **args) -> int:
        """Open a span that a later call ends (``end``): the key to end it with."""
        with self._lock:
            key = next(self._ids)
            self._open[key] = {"kind": kind, "t0": time.time(), "args": args}
        return key

    def end(self, key: int, gap: tuple[float, float] | None = None, gap_kind: str = "", **args) -> float:
        """Close the span ``key`` (``args`` added to its own); returns its seconds. ``gap``: a
        stretch of it spent waiting on others (``time.time()`` values), logged as a span of
        ``gap_kind`` between the span's parts, so that it counts as no busy time. A gap that
        began before the span (another process's clock: this rank joined a wait already under
        way) is cut to the span; one that does not overlap it is ignored."""
        t1 = time.time()
        with self._lock:
            sp = self._open.pop(key)
            sp["args"].update(args)
            for a, b, waiting in around_gap(sp["t0"], t1, gap):
                self._spans.append({"kind": gap_kind, "t0": a, "t1": b, "args": {}} if waiting
                                   else {**sp, "t0": a, "t1": b, "args": dict(sp["args"])})
        return t1 - sp["t0"]

    def add(self, kind: str, t0: float, t1: float, **args) -> None:
        """A span whose start and end happened in different calls (``time.time()`` values)."""
        with self._lock:
            self._spans.append({"kind": kind, "t0": t0, "t1": t1, "args": args})

    def drain(self) -> list[dict]:
        """The spans that ended since the last drain, then those still open as far as they have
        run (``open: True``)."""
        now = time.time()
        with self._lock:
            out, self._spans = self._spans, []
            out += [{"kind": sp["kind"], "t0": sp["t0"], "t1": now, "args": dict(sp["args"]), "open": True}
                    for sp in self._open.values()]
        return out
