"""VerifierPool: run reward functions in worker processes under a hard
wall-clock limit, so that no completion can hang or crash a run.

A worker is a persistent process (started with "spawn", which is safe in
Ray actors and threaded programs) that resolves the reward with `get()`
and calls it one completion at a time in its main thread, where
math-verify's own signal-based timeouts also work. The parent gives each
call `timeout_s`; a worker that overruns is SIGKILLed and replaced, and
its completion scores 0.0. Completions are spread over the workers.

The clock starts when the worker begins the call, after it has resolved
the function and imported what the function needs (`warm_up`), so the
first call on a fresh worker is not charged for importing sympy.

A function marked `group_relative = True` (its score for one completion
depends on the others, like `length`) gets the whole batch in one call,
with a limit of `timeout_s` per completion.

A score is a finite real number (int, float, numpy scalar; not bool) or
None, "not applicable" as in TRL. Anything else the function returns (NaN,
inf, "0.5", True, a list) is an invalid score; a call that raises, or kills
its worker, is an error. Both score None, so nothing invalid reaches the
advantages, and are listed in the result. The pool logs the first error of
each kind per function once, with one example and no traceback, from the
parent process; later ones are only counted, so a function that fails on
every completion cannot flood the log. Timeouts are logged one line each:
each names an input that is worth a look and costs a worker restart.
"""

from __future__ import annotations

import itertools
import logging
import math
import multiprocessing
import numbers
import os
import signal
import threading
import time
import traceback
import weakref
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait

from .registry import get

logger = logging.getLogger("r1ray.rewards")

_START_TIMEOUT_S = 60.0  # a worker that is not ready by then is replaced
_RESOLVE_TIMEOUT_S = 60.0  # time to import a reward before the call's clock starts
_MAX_START_FAILURES = 3  # workers dying before they are ready: give up
_EXAMPLE_CHARS = 300  # an error example (exception message, bad value) is clipped to this


@dataclass
class ScoreResult:
    scores: list[float | None]
    timeouts: list[int] = field(default_factory=list)  # indices that ran out of time: scored 0.0
    errors: list[int] = field(default_factory=list)  # indices whose call raised or crashed: scored None
    invalid: list[int] = field(default_factory=list)  # indices that returned a non-score: scored None
    first_error: str = ""  # the first failure of this call, any kind, e.g. "sample 'p/0': raised ValueError: ..."
    # A function marked ``with_answers`` (the benchmark judges) returns (score, answer) pairs: the
    # answer it extracted from each completion, a str or None (also None on any failure); [] for
    # any other function.
    answers: list[str | None] = field(default_factory=list)


def auto_memory_mb(workers: int) -> int:
    """The default cap of one verifier worker: half this node's physical memory shared by
    ``workers`` verifier processes, at least 1 GiB and at most 16 GiB each. A reward function
    that allocates past it fails with MemoryError (scored None, counted) instead of taking the
    node from the learners and generators."""
    total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    return int(min(16384, max(1024, total_mb // 2 // max(1, workers))))


class VerifierPool:
    """Persistent verifier workers with a hard per-completion time limit.

    memory_mb, when set, caps each worker's address space (soft
    RLIMIT_AS), so a verifier that blows up symbolically fails with
    MemoryError instead of exhausting the node.

    Workers are started with "spawn": a script that builds a pool at top
    level needs the usual `if __name__ == "__main__":` guard (Ray actors
    and pytest need nothing). Workers are daemonic, so a reward function
    cannot itself start multiprocessing children (subprocess is fine).
    A worker sees the sys.path its parent had when the worker started.
    """

    def __init__(self, num_workers: int = 2, timeout_s: float = 10.0, *, memory_mb: int | None = None,
                 max_timeouts_in_a_row: int = 0):
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"VerifierPool: num_workers must be an integer >= 1, got {num_workers!r}")
        if not timeout_s > 0:
            raise ValueError(f"VerifierPool: timeout_s must be > 0, got {timeout_s!r}")
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self._memory_mb = memory_mb
        # A reward that times out on this many completions in a row in one score() call is not
        # run on the rest of that call (they count as timeouts): a verifier that always hangs
        # costs a few timeouts per call, not one per completion. 0: run every completion.
        self.max_timeouts_in_a_row = max_timeouts_in_a_row
        self._ctx = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()  # one score() at a time owns the workers
        self._closed = False
        self._resolved: dict[tuple, object] = {}
        self._logged: set[tuple[str, str]] = set()  # (reward, kind) already logged once
        self._task_ids = itertools.count()
        self._start_failures = 0
        self._workers = [_Worker(self._ctx, memory_mb) for _ in range(num_workers)]
        # Runs at close(), garbage collection or interpreter exit, once.
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)

    def __enter__(self) -> "VerifierPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._finalizer()

    def score(self, name: str, params: dict, completions: list, columns: dict[str, list],
              sample_ids: list[str] | None = None) -> ScoreResult:
        """Score each completion with reward `name` built with `params`.

        `columns` holds every other keyword the reward receives (prompts,
        completion_ids, dataset columns), each a list aligned with
        `completions`. Bad names or params raise here, in the caller.
        A completion whose call times out scores 0.0 and is listed in
        `timeouts`; one whose call raises or crashes scores None and is
        listed in `errors`; one that gets a value that is not a score
        scores None and is listed in `invalid`. Failures are logged with
        their sample id (default: the index), errors and invalid scores
        only the first of each kind per reward. Thread-safe: concurrent
        calls take turns.
        """
        params, columns = dict(params or {}), dict(columns or {})
        n = len(completions)
        _check_columns(columns, n)
        ids = [str(i) for i in range(n)] if sample_ids is None else list(sample_ids)
        if len(ids) != n:
            raise ValueError(f"VerifierPool.score: {len(ids)} sample_ids for {n} completions")
        fn = self._resolve(name, params)
        if getattr(fn, "group_relative", False):
            tasks = [list(range(n))] if n else []
        else:
            tasks = [[i] for i in range(n)]
        with self._lock:
            if self._closed:
                raise RuntimeError("VerifierPool is closed")
            job = _Job(name, params, completions, columns, ids, self.timeout_s, self._logged,
                       getattr(fn, "with_answers", False))
            try:
                self._run(job, deque(tasks))
            except BaseException:
                # Leave no worker holding a task from this call.
                for slot, worker in enumerate(self._workers):
                    if worker.task is not None:
                        self._replace(slot)
                raise
            for indices in (job.result.timeouts, job.result.errors, job.result.invalid):
                indices.sort()  # in index order, not in the order the workers happened to finish
            return job.result

    def _resolve(self, name: str, params: dict):
        # Validates name and params in the caller, once per combination.
        key = (name, repr(sorted(params.items())))
        if key not in self._resolved:
            self._resolved[key] = get(name, **params)
        return self._resolved[key]

    def _run(self, job: "_Job", pending: deque) -> None:
        while pending or any(w.task is not None for w in self._workers):
            if pending and 0 < self.max_timeouts_in_a_row <= job.timeouts_in_a_row:
                skipped = [i for task in pending for i in task]
                pending.clear()
                job.fail(skipped, "timeout", f"not run: the reward timed out on {job.timeouts_in_a_row} completions "
                         "in a row in this call")
            for worker in self._workers:
                if worker.ready and worker.task is None and pending:
                    self._dispatch(worker, job, pending)
            waiting = {w.conn: slot for slot, w in enumerate(self._workers) if w.task is not None or not w.ready}
            if not waiting:  # cannot happen while work remains; guards the min() below
                break
            deadline = min(self._workers[slot].deadline for slot in waiting.values())
            for conn in wait(list(waiting), timeout=max(0.0, deadline - time.monotonic())):
                self._receive(waiting[conn], job, pending)
            self._expire(job)

    def _dispatch(self, worker: "_Worker", job: "_Job", pending: deque) -> None:
        indices = pending.popleft()
        task_id = next(self._task_ids)
        message = (task_id, job.name, job.params, [job.completions[i] for i in indices],
                   {key: [values[i] for i in indices] for key, values in job.columns.items()})
        try:
            worker.conn.send(message)
        except (BrokenPipeError, ConnectionError, EOFError):
            # It died while idle; try again on its replacement.
            pending.appendleft(indices)
            self._replace(self._workers.index(worker))
            return
        worker.task = (task_id, indices)
        worker.call_started = False
        worker.deadline = time.monotonic() + _RESOLVE_TIMEOUT_S

    def _receive(self, slot: int, job: "_Job", pending: deque) -> None:
        worker = self._workers[slot]
        try:
            kind, task_id, payload = worker.conn.recv()
        except (EOFError, OSError):
            self._crashed(slot, job)
            return
        if kind == "ready":
            worker.ready, self._start_failures = True, 0
            worker.deadline = float("inf")
        elif worker.task is None or task_id != worker.task[0]:
            logger.error("verifier worker sent a message for an unknown task: %r", kind)
        elif kind == "started":
            worker.call_started = True
            worker.deadline = time.monotonic() + job.timeout_s * len(worker.task[1])
        elif kind == "ok":
            scores, invalid, answers = payload
            indices = worker.task[1]
            job.timeouts_in_a_row = 0
            for position, (i, score) in enumerate(zip(indices, scores)):
                job.result.scores[i] = score
                if job.with_answers:
                    job.result.answers[i] = answers[position]
            for position, value in invalid:
                job.fail([indices[position]], "invalid", f"returned {value}, which is not a score "
                         "(accepted: a finite int or float, or None for not applicable)")
            worker.finish()
        else:  # "error": the function raised; the worker itself is fine
            job.timeouts_in_a_row = 0
            job.fail(worker.task[1], "raised", f"raised {payload}")
            worker.finish()

    def _crashed(self, slot: int, job: "_Job") -> None:
        worker = self._workers[slot]
        worker.process.join(timeout=2.0)  # its pipe closed before it was reaped: wait for the status
        code = _exit_status(worker.process.exitcode)
        if worker.task is not None:
            job.fail(worker.task[1], "crashed", f"crashed its worker (exit status: {code})")
        elif not worker.ready:
            self._start_failed(slot, f"died before it was ready (exit status: {code}); see its stderr")
            return
        self._replace(slot)

    def _start_failed(self, slot: int, why: str) -> None:
        # A worker that cannot start (r1ray not importable there, a main
        # module without the `if __name__ == "__main__":` guard that "spawn"
        # needs) will not start next time either: stop instead of looping.
        self._replace(slot)
        self._start_failures += 1
        logger.error("verifier worker %s", why)
        if self._start_failures >= _MAX_START_FAILURES:
            raise RuntimeError(f"verifier workers keep failing to start: the last one {why}")

    def _expire(self, job: "_Job") -> None:
        now = time.monotonic()
        for slot, worker in enumerate(self._workers):
            if worker.deadline > now:
                continue
            if worker.task is None:
                self._start_failed(slot, f"was not ready within {_START_TIMEOUT_S:.0f} s")
                continue
            if worker.call_started:
                limit = job.timeout_s * len(worker.task[1])
                job.fail(worker.task[1], "timeout", f"timed out after {limit:.1f} s; worker killed and replaced")
                job.timeouts_in_a_row += len(worker.task[1])
            else:
                job.fail(worker.task[1], "crashed", f"could not load the reward within {_RESOLVE_TIMEOUT_S:.0f} s")
            self._replace(slot)

    def _replace(self, slot: int) -> None:
        self._workers[slot].kill()
        self._workers[slot] = _Worker(self._ctx, self._memory_mb)


@dataclass
class _Job:
    """One score() call: its inputs and the result being filled in."""

    name: str
    params: dict
    completions: list
    columns: dict
    sample_ids: list
    timeout_s: float
    logged: set  # the pool's (reward, kind) pairs already logged
    with_answers: bool = False
    result: ScoreResult = field(init=False)
    timeouts_in_a_row: int = 0

    def __post_init__(self):
        self.result = ScoreResult(scores=[0.0] * len(self.completions),
                                  answers=[None] * len(self.completions) if self.with_answers else [])

    def fail(self, indices: list[int], kind: str, what: str) -> None:
        """Record a failure of `kind`: "timeout" (scores 0.0), "raised", "crashed" or "invalid" (score None)."""
        bucket = {"timeout": self.result.timeouts, "invalid": self.result.invalid}.get(kind, self.result.errors)
        for i in indices:
            bucket.append(i)
            self.result.scores[i] = 0.0 if kind == "timeout" else None
        shown = ", ".join(repr(self.sample_ids[i]) for i in indices[:3])
        more = f" (+{len(indices) - 3} more)" if len(indices) > 3 else ""
        example = f"sample {shown}{more}: {what}"
        if not self.result.first_error:
            self.result.first_error = example
        if kind == "timeout":
            logger.warning("reward %r on %s, scored 0.0", self.name, example)
        elif (self.name, kind) not in self.logged:
            self.logged.add((self.name, kind))
            logger.warning("reward %r on %s, scored None; logged once per reward and kind of error: "
                           "later ones are only counted", self.name, example)


class _Worker:
    """The parent's handle on one worker process."""

    def __init__(self, ctx, memory_mb: int | None):
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child_conn, memory_mb),
                                   name="r1ray-verifier", daemon=True)
        self.process.start()
        child_conn.close()  # so that the worker's death reads as EOF here
        self.ready = False
        self.task: tuple[int, list[int]] | None = None
        self.call_started = False
        self.deadline = time.monotonic() + _START_TIMEOUT_S

    def finish(self) -> None:
        self.task = None
        self.deadline = float("inf")

    def kill(self) -> None:
        # SIGKILL: a verifier stuck in C code (a huge sympy power) ignores
        # anything gentler. Its sandbox children die with it (PDEATHSIG).
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


def _shutdown(workers: list[_Worker]) -> None:
    for worker in workers:
        try:
            worker.conn.send(None)  # ask politely first: no stray SIGKILL in logs
        except (OSError, ValueError):
            pass
    for worker in workers:
        worker.process.join(timeout=1)
        worker.kill()


def _check_columns(columns: dict, n: int) -> None:
    if "completions" in columns:
        raise ValueError("VerifierPool.score: pass completions as the argument, not in columns")
    for key, values in columns.items():
        if len(values) != n:
            raise ValueError(f"VerifierPool.score: column {key!r} has {len(values)} values for {n} completions")


# ---- inside the worker process ------------------------------------------


def _worker_main(conn, memory_mb: int | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if memory_mb:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb * 1024 * 1024, hard))
    _exit_with_parent()
    # math-verify logs every timed-out input in full; the pool reports its own.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    functions: dict[tuple, object] = {}
    conn.send(("ready", None, None))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        task_id, name, params, completions, columns = message
        try:
            key = (name, repr(sorted(params.items())))
            if key not in functions:
                functions[key] = get(name, **params)
            fn = functions[key]
            warm_up = getattr(fn, "warm_up", None)
            if callable(warm_up):
                warm_up()
            conn.send(("started", task_id, None))
            out = fn(completions=completions, **columns)
            answers = [None] * len(completions)
            if getattr(fn, "with_answers", False):
                out, answers = _split_answers(out, len(completions))
            conn.send(("ok", task_id, (*_as_scores(out, len(completions)), answers)))
        except BaseException as e:  # noqa: BLE001 - user code may raise anything, SystemExit included
            # One line, not a traceback: the parent logs only the first one.
            cap = f" (over the verifier worker's memory cap of {memory_mb} MB)" \
                if isinstance(e, MemoryError) and memory_mb else ""
            conn.send(("error", task_id, _describe_exception(e) + cap))


def _exit_with_parent() -> None:
    # A worker stuck in a long call would outlive a parent that was
    # SIGKILLed; a watcher thread notices the re-parenting and exits.
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="r1ray-parent-watch", daemon=True).start()


def _as_scores(out, n: int) -> tuple[list[float | None], list[tuple[int, str]]]:
    """The scores as floats or None, and (position, description) of each value that is not a score."""
    if isinstance(out, (str, bytes)) or not hasattr(out, "__len__") or len(out) != n:
        raise TypeError(
            f"a reward function must return a list of {n} scores, got {type(out).__name__}: {_clip(_repr(out))}"
        )
    scores: list[float | None] = []
    invalid: list[tuple[int, str]] = []
    for position, x in enumerate(out):
        score = _as_score(x)
        if score is _INVALID:
            invalid.append((position, _clip(f"{type(x).__name__} {_repr(x)}")))
            score = None
        scores.append(score)
    return scores, invalid


def _split_answers(out, n: int) -> tuple[list, list[str | None]]:
    """A ``with_answers`` function's (score, answer) pairs as scores and answers (str or None)."""
    if isinstance(out, (str, bytes)) or not hasattr(out, "__len__") or len(out) != n or \
            not all(isinstance(x, (tuple, list)) and len(x) == 2 for x in out):
        raise TypeError(f"a with_answers function must return a list of {n} (score, answer) pairs, got "
                        f"{type(out).__name__}: {_clip(_repr(out))}")
    return [s for s, _ in out], [None if a is None else _clip(_str(a)) for _, a in out]


_INVALID = object()


def _as_score(x):
    # bool is an int to Python, but True is an answer, not a score; "0.5"
    # would pass float(): only real numbers are accepted, as they are.
    if x is None:
        return None
    if not isinstance(x, numbers.Real) or isinstance(x, bool):
        return _INVALID
    try:
        value = float(x)
    except (TypeError, ValueError, OverflowError):
        return _INVALID
    return value if math.isfinite(value) else _INVALID


def _exit_status(code: int | None) -> str:
    """A worker's exit status as it was: a code, a signal's name, or still running."""
    if code is None:
        return "none yet: still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return str(code)


def _describe_exception(e: BaseException) -> str:
    """The one-line example the parent logs: 'ValueError: bad input (at my_rewards.py:12 in fn)'."""
    text = _clip(f"{type(e).__name__}: {_str(e)}")
    frames = traceback.extract_tb(e.__traceback__)
    if frames:  # where it was raised, kept even when the message is clipped
        last = frames[-1]
        text += _clip(f" (at {os.path.basename(last.filename)}:{last.lineno} in {last.name})")
    return text


def _str(x) -> str:
    try:
        return str(x)
    except Exception:  # noqa: BLE001 - a user's __str__ may fail too
        return f"<unprintable {type(x).__name__}>"


def _repr(x) -> str:
    try:
        return repr(x)
    except Exception:  # noqa: BLE001 - a user's __repr__ may fail too
        return f"<unprintable {type(x).__name__}>"


def _clip(text: str) -> str:
    # backslashreplace: the text may quote a completion with lone surrogates.
    text = text.encode("utf-8", "backslashreplace").decode()
    return text if len(text) <= _EXAMPLE_CHARS else text[: _EXAMPLE_CHARS - 3] + "..."
