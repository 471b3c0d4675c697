"""Stopping on Ctrl-C / SIGTERM even when the first KeyboardInterrupt is lost.

Python raises a signal's KeyboardInterrupt wherever the main thread happens to be; when that
is a finalizer (an object's ``__del__``, a weakref callback), the exception is printed as
"Exception ignored" and the run goes on. So the handler also records the signal, and the
drivers' loops call ``check()`` on every turn: a stop that was swallowed is raised again
there, within one turn of the loop (at most ``ray.heartbeat_s``).
"""
from __future__ import annotations

import signal
import threading

requested: str | None = None  # the name of the signal that asked the run to stop


def _handler(signum, frame):
    global requested
    requested = signal.Signals(signum).name
    raise KeyboardInterrupt(requested)


def install() -> None:
    """SIGINT and SIGTERM (``ray job stop``, Kubernetes) stop the run: a KeyboardInterrupt
    whose text names the signal. Installed after Ray starts, which sets its own handlers."""
    global requested
    if threading.current_thread() is not threading.main_thread():
        return
    requested = None
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _handler)


def check() -> None:
    """Raise the stop again if a signal arrived and its KeyboardInterrupt was swallowed."""
    if requested is not None:
        raise KeyboardInterrupt(requested)
