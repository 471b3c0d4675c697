"""Progress as its destination wants it. On a terminal, a tqdm bar; anywhere else (a file, a
Ray job's log, CI) a bar redraws with carriage returns that land as fragments, so there it is
one plain line every ``every`` units or ``every_s`` seconds, with the same figures:

    12:01:07 GRPO (max_staleness=1): 40/100 steps (40%), reward=0.512, loss=0.0123 | 81 s, 2.0 s/step, ~122 s left

``quiet_library_bars`` switches off the bars of Hugging Face's libraries (loading weights,
writing shards, mapping datasets) for a process whose output is not a terminal; actors always
run so (cluster/runtime.actor_env), their output relayed line by line by Ray.
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import TextIO

from ...cluster.runtime import LIBRARY_BAR_SWITCHES


def on_terminal(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a file
        return False


def quiet_library_bars() -> None:
    """No progress bars from huggingface_hub, transformers and datasets in this process (and
    the processes it starts): by environment for those not imported yet, by their switches for
    those already imported."""
    os.environ.update(LIBRARY_BAR_SWITCHES)
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()


class Lines:
    """tqdm's ``update`` / ``set_postfix`` / context manager, printed as one plain line at every
    ``every``-th unit (default: every 5% of ``total``) or after ``every_s`` seconds, whichever
    comes first, and once at the end."""

    def __init__(self, total: int, desc: str, unit: str = "it", initial: int = 0, every: int | None = None,
                 every_s: float = 60.0, stream: TextIO | None = None, clock=time.monotonic):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.every = every or max(1, math.ceil(total / 20))
        self.every_s, self.stream, self.clock = every_s, stream or sys.stderr, clock
        self.postfix: dict[str, object] = {}
        self.start = self.clock()
        self.start_n, self.printed_n, self.printed_at, self.closed = initial, initial, self.start, False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if self.n // self.every > self.printed_n // self.every or now - self.printed_at >= self.every_s:
            self._print(now)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def _print(self, now: float) -> None:
        elapsed, done = now - self.start, self.n - self.start_n
        parts = [f"{self.desc}: {self.n}/{self.total} {self.unit}s"
                 + (f" ({100 * self.n / self.total:.0f}%)" if self.total else "")]
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        timing = f"{elapsed:.0f} s"
        if done > 0:
            timing += f", {elapsed / done:.3g} s/{self.unit}"
            if self.total and self.n < self.total:
                timing += f", ~{elapsed / done * (self.total - self.n):.0f} s left"
        print(f"{time.strftime('%H:%M:%S')} {', '.join(parts)} | {timing}", file=self.stream, flush=True)
        self.printed_n, self.printed_at = self.n, now

    def close(self) -> None:
        if not self.closed and self.n != self.printed_n:
            self._print(self.clock())
        self.closed = True

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int, desc: str, unit: str = "it", initial: int = 0, stream: TextIO | None = None):
    """A tqdm bar on a terminal, plain ``Lines`` elsewhere (both context managers with
    ``update`` and ``set_postfix``)."""
    if on_terminal(stream):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True, file=stream)
    return Lines(total, desc, unit, initial, stream=stream)
