"""Where the driver waits: object refs and the clocks, behind one seam.

The driver's loop (``controllers/common/inflight.py``, the GRPO driver, its telemetry and
the elastic groups) waits on object refs and reads the time only through this module. In a
run that is Ray and the machine's clocks (``RayTransport``); ``benchmarks/simulate.py``
installs a simulated fleet instead (``use``), whose refs finish on a simulated clock, so
that the same driver code can be measured against fleets this machine cannot hold.

Each table of work in flight has its own ``watcher()``: it ``watch``es each ref once, when
the work is submitted, and ``wait`` hands back the watched refs as they finish, so a
completion costs the same however many refs are still pending (``ray.wait`` scans every ref
it is given, each time: 0.36 us a ref on this machine, which at thousands of refs in flight
was most of the driver's time; measured in ``benchmarks/simulate.py ray-costs``).
"""
from __future__ import annotations

import contextlib
import queue
import time
from typing import Iterator, Protocol


class Watcher(Protocol):
    def watch(self, refs: list) -> None:
        """Start waiting for ``refs``: each is handed back by ``wait`` once it finishes."""

    def forget(self, refs: list) -> None:
        """Stop waiting for ``refs`` (work given up): ``wait`` will not hand them back."""

    def wait(self, timeout: float) -> list:
        """At most ``timeout`` seconds for a watched ref to finish: the refs finished since the
        last call, in the order they finished (maybe none)."""

    def get(self, ref):
        """The value of ``ref``, which ``wait`` handed back (its error raised); forgets it."""


class Transport(Protocol):
    def watcher(self) -> Watcher:
        """A new set of refs to wait on (one per table of work in flight)."""

    def now(self) -> float:
        """Seconds on a monotonic clock (deadlines, durations)."""

    def wall(self) -> float:
        """Seconds since the epoch (the actors' spans are stamped with it)."""


class RayWatcher:
    """Completion callbacks (``ObjectRef.future()``) into one queue: Ray fetches each result
    when it is ready (the value, or the error ``ray.get`` would raise), and the driver blocks on
    the queue."""

    def __init__(self):
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._futures: dict = {}

    def watch(self, refs: list) -> None:
        for ref in refs:
            if ref in self._futures:
                continue
            future = self._futures[ref] = ref.future()
            future.add_done_callback(lambda _, ref=ref: self._done.put(ref))

    def forget(self, refs: list) -> None:
        for ref in refs:
            self._futures.pop(ref, None)

    def wait(self, timeout: float) -> list:
        try:
            first = self._done.get(timeout=timeout) if timeout > 0 else self._done.get_nowait()
        except queue.Empty:
            return []
        done = [first]
        while True:
            try:
                done.append(self._done.get_nowait())
            except queue.Empty:
                break
        return [ref for ref in done if ref in self._futures]

    def get(self, ref):
        return self._futures.pop(ref).result(timeout=0)


class RayTransport:
    watcher = RayWatcher
    now = staticmethod(time.perf_counter)
    wall = staticmethod(time.time)


_current: Transport = RayTransport()


def watcher() -> Watcher:
    return _current.watcher()


def now() -> float:
    return _current.now()


def wall() -> float:
    return _current.wall()


@contextlib.contextmanager
def use(transport: Transport) -> Iterator[Transport]:
    """Route the driver's waits and clocks through ``transport`` inside the block."""
    global _current
    previous, _current = _current, transport
    try:
        yield transport
    finally:
        _current = previous
