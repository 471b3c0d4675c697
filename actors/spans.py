"""Busy intervals of an actor (what it was doing, from when to when), drained by the driver.

Wall-clock ``time.time()`` so intervals from different processes line up on one timeline.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager


class SpanLog:
    """The driver labels each span with the actor's dashboard name when it drains them."""

    def __init__(self):
        self._spans: list[dict] = []
        self._lock = threading.Lock()

    @contextmanager
    def span(self, kind: str, **args):
        t0 = time.time()
        try:
            yield
        finally:
            with self._lock:
                self._spans.append({"kind": kind, "t0": t0, "t1": time.time(), "args": args})

    def add(self, kind: str, t0: float, t1: float, **args) -> None:
        """A span whose start and end happened in different calls (``time.time()`` values)."""
        with self._lock:
            self._spans.append({"kind": kind, "t0": t0, "t1": t1, "args": args})

    def drain(self) -> list[dict]:
        with self._lock:
            out, self._spans = self._spans, []
        return out
