"""Where the driver waits: object refs and the clocks, behind one seam.

The driver's loop (``controllers/common/inflight.py``, the GRPO driver, its telemetry and
the elastic groups) waits on object refs and reads the time only through this module. In a
run that is Ray and the machine's clocks (``RayTransport``); ``benchmarks/simulate.py``
installs a simulated fleet instead (``use``), whose refs finish on a simulated clock, so
that the same driver code can be measured against fleets this machine cannot hold.
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterator, Protocol


class Transport(Protocol):
    def wait(self, refs: list, timeout: float) -> list:
        """At most ``timeout`` seconds for one of ``refs`` to finish: the finished ones (maybe none)."""

    def get(self, ref):
        """The value of ``ref``, which is finished (its error raised)."""

    def now(self) -> float:
        """Seconds on a monotonic clock (deadlines, durations)."""

    def wall(self) -> float:
        """Seconds since the epoch (the actors' spans are stamped with it)."""


class RayTransport:
    def wait(self, refs: list, timeout: float) -> list:
        import ray

        return ray.wait(refs, num_returns=1, timeout=timeout, fetch_local=True)[0]

    def get(self, ref):
        import ray

        return ray.get(ref, timeout=0)

    now = staticmethod(time.perf_counter)
    wall = staticmethod(time.time)


_current: Transport = RayTransport()


def wait(refs: list, timeout: float) -> list:
    return _current.wait(refs, timeout)


def get(ref):
    return _current.get(ref)


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
