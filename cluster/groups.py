"""Actor groups: N named Ray actors of one plain class, called together, every call bounded in time."""
from __future__ import annotations

import functools
import inspect
import time
from collections import OrderedDict
from typing import Any, Callable, Generic, TypeVar

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from ..actors.server import free_port


@functools.lru_cache(maxsize=None)
def _signature(method: Callable) -> inspect.Signature:
    return inspect.signature(method)


@functools.lru_cache(maxsize=4096)
def _method_of(cls: type, name: str, method: Callable) -> bool:
    """Whether ``method`` is ``cls``'s own ``name`` (or inherited): once per method, not per call."""
    return inspect.getattr_static(cls, name, None) is method


@functools.lru_cache(maxsize=4096)
def _fits(method: Callable, positional: int, keywords: tuple[str, ...], group: str, cls: str) -> None:
    """Raise TypeError unless ``positional`` arguments and ``keywords`` fit ``method`` (self
    bound). Whether they fit depends on nothing else, so each shape is checked once (the driver
    calls a few shapes thousands of times a step: binding each call cost 3.5 µs here)."""
    try:
        _signature(method).bind(None, *[None] * positional, **dict.fromkeys(keywords))
    except TypeError as e:
        raise TypeError(f"{group} group: {cls}.{method.__name__}{_signature(method)}: {e}") from None


class RemoteCallError(RuntimeError):
    """A remote call that failed or did not answer in time; names the actor and the method."""


def get(refs, timeout_s: float, what: str, watchdog: "Watchdog | None" = None):
    """``ray.get`` with a deadline and an error that says who did not answer.

    With a ``watchdog``, the wait is cut into slices: between them every actor is pinged
    (a dead or hung one ends the wait at once, by name), and the first ref that fails ends it
    too, naming the actor that computes it, or the dead actor that made it fail."""
    if watchdog is None:
        try:
            return ray.get(refs, timeout=timeout_s)
        except GetTimeoutError:
            raise RemoteCallError(f"{what} did not answer within {timeout_s:.0f} s") from None
        except RayActorError as e:
            raise RemoteCallError(f"{what}: the actor died ({describe(e)})") from e
    many = isinstance(refs, list)
    pending, deadline = list(refs) if many else [refs], time.monotonic() + timeout_s
    values = {}
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            late = sorted({watchdog.owner(r) or "?" for r in pending})
            raise RemoteCallError(f"{what}: {', '.join(late)} did not answer within {timeout_s:.0f} s")
        done, pending = ray.wait(pending, num_returns=1, timeout=min(watchdog.every_s, left), fetch_local=True)
        for ref in done:
            values[ref] = watchdog.fetch(what, ref)
        watchdog.check(what)
    return [values[r] for r in refs] if many else values[refs]


def describe(e: BaseException) -> str:
    """The exception an actor raised (not Ray's wrapper), on one line."""
    cause = getattr(e, "cause", None)
    if isinstance(e, RayTaskError) and isinstance(cause, BaseException):
        e = cause
    return f"{type(e).__name__}: {first_line(e)}"


def first_line(e: BaseException, limit: int = 2000) -> str:
    """The message's first line, whole; past ``limit`` characters cut at a word and said so."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    line = text.splitlines()[0]
    if len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0]
    return f"{cut} ... ({len(line) - len(cut)} more characters)"


def split(items: list, parts: int) -> list[list]:
    """Contiguous, near-equal chunks (keeps a prompt's group together when len is a multiple)."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        out.append(items[start:end])
        start = end
    return out


CONTROL = "control"  # concurrency group for calls that must not wait behind long work (weights, spans, ping)


A = TypeVar("A")  # the plain class a group's actors run


class ActorGroup(Generic[A]):
    """``name-0 … name-(n-1)``: the names the dashboard shows and ``ray.get_actor`` finds.

    Calls name the method by the class's own function, never by a string:
    ``generators.call(i, Generator.generate, prompts, ...)``. A renamed or removed method fails
    where the driver is imported, arguments that do not fit its signature fail at the call (not
    inside the actor), and a reader or a tool can follow every call to its method.

    Work methods run one at a time, in submission order (``max_concurrency`` > 1: that many
    at once); ``control=True`` calls run in a separate concurrency group, beside whatever work
    is in progress.

    Slots: actor ``i`` is ``ready`` (takes work, is watched), ``starting`` (a replacement or an
    added actor, not yet usable), or ``gone`` (dead or retired). Group-wide calls (``call_all``,
    ``shard``, ``probe``, ``names``) reach the ready ones only; ``elastic`` groups are resized
    and repaired by the driver (``restart``, ``add``, ``retire``), the others never change.
    """

    def __init__(self, name: str, cls: type, count: int, make_args: Callable[[int], tuple[tuple, dict]], *,
                 num_cpus: float, num_gpus: float = 0.0, timeout_s: float = 600.0, namespace: str | None = None,
                 max_concurrency: int = 1, scheduling: Callable[[str], Any] | None = None):
        self.name, self.timeout_s, self.cls = name, timeout_s, cls
        self._owners: OrderedDict = OrderedDict()  # recent object refs -> index of the actor that computes them
        self.watchdog: Watchdog | None = None  # set by the System: liveness checks while waiting
        self.elastic = False  # set by the driver (controllers/common/elastic.py): it replaces dead actors instead of stopping
        self._remote_cls = ray.remote(concurrency_groups={CONTROL: 3})(cls)
        self._make_args, self._scheduling = make_args, scheduling
        self._opts: dict[str, Any] = dict(num_cpus=num_cpus, num_gpus=num_gpus, lifetime=None,
                                          max_concurrency=max_concurrency)
        if namespace:
            self._opts["namespace"] = namespace
        self.actors: list = []
        self.state: list[str] = []
        self.incarnation: list[int] = []
        for i in range(count):
            self.actors.append(self._create(i, 0))
            self.state.append("ready")
            self.incarnation.append(0)

    def _create(self, i: int, incarnation: int):
        args, kwargs = self._make_args(i)
        opts = {**self._opts, "name": f"{self.name}-{i}" + (f".{incarnation}" if incarnation else "")}
        if self._scheduling is not None:  # e.g. its bundle of a placement group
            opts["scheduling_strategy"] = self._scheduling(f"{self.name}-{i}")
        return self._remote_cls.options(**opts).remote(*args, **kwargs)

    def __len__(self) -> int:
        """Slots, whatever their state (actor indices run over them)."""
        return len(self.actors)

    def ready(self) -> list[int]:
        """The ready slots (a fresh list; cached until a slot's state changes)."""
        if getattr(self, "_ready", None) is None:
            self._ready = [i for i, st in enumerate(self.state) if st == "ready"]
        return list(self._ready)

    def _set(self, i: int, state: str) -> None:
        self.state[i] = state
        self._ready = None

    def name_of(self, i: int) -> str:
        return f"{self.name}-{i}"

    def names(self) -> list[str]:
        return [self.name_of(i) for i in self.ready()]

    # -- resizing and repair (elastic groups) ------------------------------------------------
    def restart(self, i: int):
        """A new actor in slot ``i`` (the old one is dead: killed here to be sure), in the same
        bundle; ``starting`` until ``mark_ready``. Returns its first ping's object ref."""
        kill_quietly(self.actors[i])
        self.incarnation[i] += 1
        self.actors[i] = self._create(i, self.incarnation[i])
        self._set(i, "starting")
        return self.call(i, self.cls.ping, control=True)

    def add(self) -> tuple[int, Any]:
        """A new slot (its bundle must be planned first); returns its index and first ping."""
        i = len(self.actors)
        self.actors.append(None)
        self.state.append("gone")
        self._ready = None
        self.incarnation.append(-1)
        return i, self.restart(i)

    def mark_ready(self, i: int) -> None:
        self._set(i, "ready")

    def retire(self, i: int) -> None:
        """Stop slot ``i``'s actor (dead, or no longer wanted)."""
        self._set(i, "gone")
        kill_quietly(self.actors[i])

    def _method(self, method: Callable, args: tuple, kwargs: dict) -> str:
        """The name of ``method``, a function of this group's class (or of a class it derives
        from), after checking that ``args`` and ``kwargs`` fit its signature."""
        name = getattr(method, "__name__", None)
        if not callable(method) or name is None or not _method_of(self.cls, name, method):
            raise TypeError(f"{self.name} group: {method!r} is not a method of {self.cls.__name__}; "
                            f"call methods as {self.cls.__name__}.<method>")
        _fits(method, len(args), tuple(kwargs), self.name, self.cls.__name__)
        return name

    def call(self, i: int, method: Callable[..., Any], *args, control: bool = False, **kwargs):
        """``method(*args, **kwargs)`` on actor ``i``; returns its object ref. ``control``: in
        the control concurrency group, beside the work in progress."""
        m = getattr(self.actors[i], self._method(method, args, kwargs))
        ref = (m.options(concurrency_group=CONTROL) if control else m).remote(*args, **kwargs)
        self._owners[ref] = (i, self.incarnation[i])
        if len(self._owners) > 4096:  # only in-flight work needs an owner
            self._owners.popitem(last=False)
        return ref

    def owner(self, ref) -> str | None:
        """The name of the actor that computes ``ref`` (a recent call of this group)."""
        slot = self._owners.get(ref)
        return None if slot is None else self.name_of(slot[0])

    def slot_of(self, ref) -> tuple[int, int] | None:
        """(slot, incarnation) of the actor that computes ``ref``: a replaced actor's refs
        carry its old incarnation."""
        return self._owners.get(ref)

    def probe(self, timeout_s: float) -> dict[str, str]:
        """Ping every actor (control group, beside its work): the unhealthy ones, by name, with
        what is wrong ("died: ..." or "no answer to a ping within N s")."""
        pings = {self.call(i, self.cls.ping, control=True): self.name_of(i) for i in self.ready()}
        done, _ = ray.wait(list(pings), num_returns=len(pings), timeout=timeout_s, fetch_local=True)
        bad = {name: f"no answer to a ping within {timeout_s:.0f} s (hung or stopped)"
               for ref, name in pings.items() if ref not in done}
        for ref in done:
            try:
                ray.get(ref, timeout=0)
            except RayActorError as e:
                bad[pings[ref]] = f"died ({describe(e)})"
            except Exception as e:  # noqa: BLE001 - anything but "ok" is unhealthy
                bad[pings[ref]] = f"ping failed ({describe(e)})"
        return bad

    def silent(self, slots: list[int], timeout_s: float) -> list[int]:
        """Those of ``slots`` whose actor does not answer a ping with "ok" within ``timeout_s``
        (dead, hung, or a vLLM engine that died inside a live actor)."""
        return unanswered({self.call(i, self.cls.ping, control=True): i for i in slots}, timeout_s)

    def call_all(self, method: Callable[..., Any], *args, control: bool = False, **kwargs) -> list:
        return [self.call(i, method, *args, control=control, **kwargs) for i in self.ready()]

    def shard(self, method: Callable[..., Any], items: list, *args) -> list:
        """Split ``items`` into contiguous chunks, one per ready actor, and call ``method(chunk, *args)``
        on each (actors whose chunk is empty are skipped). Returns the object refs, in order."""
        return self.scatter(method, split(items, len(self.ready())), *args)

    def scatter(self, method: Callable[..., Any], parts: list[list], *args) -> list:
        """``method(part, *args)`` on each ready actor in order, ``parts[i]`` to the i-th (actors
        whose part is empty are skipped). Returns the object refs, in order."""
        return [self.call(i, method, part, *args) for i, part in zip(self.ready(), parts) if part]

    def done(self, refs: list) -> bool:
        """Whether every one of ``refs`` has finished, without waiting."""
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        return len(ready) == len(refs)

    def get(self, refs, what: str, timeout_s: float | None = None):
        return get(refs, timeout_s or self.timeout_s, f"{self.name} group: {what}", self.watchdog)

    def run_all(self, method: Callable[..., Any], *args, timeout_s: float | None = None, control: bool = False,
                **kwargs) -> list:
        """``call_all`` and wait (``timeout_s``, default the group's): the results, in actor order."""
        return self.get(self.call_all(method, *args, control=control, **kwargs), method.__name__, timeout_s)

    def wait_ready(self, timeout_s: float | None = None) -> float:
        """Block until every actor answers ``ping`` (constructors done). Returns seconds."""
        t0 = time.perf_counter()
        self.run_all(self.cls.ping, timeout_s=timeout_s, control=True)
        return time.perf_counter() - t0

    def kill(self) -> None:
        for a in self.actors:
            kill_quietly(a)


class HostedGroup(ActorGroup):
    """A group whose members live in another group's actors (``placement.mode: colocate``: the
    generator inside learner rank 0). Calls name this group's class (``Generator.generate``)
    and go to the host actor's method of the same name, or of the name ``rename`` gives
    (``drain_spans`` -> ``drain_generator_spans``, so the host's own spans stay its own). The
    host group owns the actors: ``kill`` leaves them, and a member cannot be replaced alone."""

    def __init__(self, name: str, cls: type, host: ActorGroup, indices: list[int], rename: dict[str, str],
                 timeout_s: float = 600.0):
        self.name, self.timeout_s, self.cls = name, timeout_s, cls
        self._owners: OrderedDict = OrderedDict()
        self.watchdog: Watchdog | None = None
        self.elastic = False
        self._rename = dict(rename)
        self.actors = [host.actors[i] for i in indices]
        self.state = ["ready"] * len(self.actors)
        self.incarnation = [0] * len(self.actors)

    def _method(self, method: Callable, args: tuple, kwargs: dict) -> str:
        name = super()._method(method, args, kwargs)
        return self._rename.get(name, name)

    def restart(self, i: int):
        raise RuntimeError(f"{self.name}-{i} lives in another group's actor: it is restarted with it, not alone")

    def add(self):
        raise RuntimeError(f"the {self.name} group lives in another group's actors: it cannot grow")

    def kill(self) -> None:
        pass  # the host group's actors


class GroupSnapshot(ActorGroup):
    """A group's actors as they are now, for another actor to call (a rollout manager calls the
    generators and scorers the driver started): the same typed calls, slots and states; it
    starts, replaces and stops nothing (the driver does, and sends a new snapshot)."""

    def __init__(self, group: ActorGroup):
        self.name, self.timeout_s, self.cls = group.name, group.timeout_s, group.cls
        self._owners: OrderedDict = OrderedDict()
        self.watchdog: Watchdog | None = None
        self.elastic = False
        self.actors, self.state, self.incarnation = list(group.actors), list(group.state), list(group.incarnation)

    def follow(self, older: "GroupSnapshot") -> None:
        """Replace ``older``: take over its record of the calls it made (``slot_of``)."""
        self._owners.update(older._owners)

    def restart(self, i: int):
        raise RuntimeError(f"{self.name}-{i}: a snapshot of the group cannot replace its actors")

    def add(self):
        raise RuntimeError(f"the {self.name} group's snapshot cannot grow")

    def kill(self) -> None:
        pass  # the group's actors are the driver's


class Watchdog:
    """Liveness of a run's actor groups while the driver waits on them.

    ``check`` pings every actor at most every ``every_s`` seconds; one that is dead or does not
    answer within ``timeout_s`` (a stopped or hung process) raises ``RemoteCallError`` naming
    it and, through ``doing(name)``, what it was doing. ``failure`` turns a failed call into
    the same kind of error, naming a dead peer first (a learner rank whose peer died reports
    only the broken collective)."""

    def __init__(self, groups: list[ActorGroup], every_s: float = 10.0, timeout_s: float = 45.0):
        self.groups, self.every_s, self.timeout_s = groups, every_s, timeout_s
        self.last = time.monotonic()
        self.doing: Callable[[str], str] = lambda name: ""
        # (group, index, why) for a dead or hung actor of an elastic group: the driver replaces
        # it (see ActorGroup); without a handler such actors stop the run like any other
        self.on_lost: Callable[[ActorGroup, int, str], None] | None = None

    def owner(self, ref) -> str | None:
        return next((name for g in self.groups if (name := g.owner(ref)) is not None), None)

    def probe(self) -> dict[str, str]:
        bad: dict[str, str] = {}
        for g in self.groups:
            found = g.probe(self.timeout_s)
            if g.elastic and self.on_lost is not None:
                for name, why in found.items():
                    self.on_lost(g, int(name.rsplit("-", 1)[1]), why)
                found = {}
            bad.update(found)
        self.last = time.monotonic()
        return bad

    def explain(self, bad: dict[str, str]) -> str:
        return "; ".join(f"{name} {why}{self.doing(name)}" for name, why in bad.items())

    def check(self, what: str) -> None:
        if time.monotonic() - self.last < self.every_s:
            return
        bad = self.probe()
        if bad:
            raise RemoteCallError(f"{what}: {self.explain(bad)}")

    def fetch(self, what: str, ref):
        """The value of ``ref``, which is done; a failure becomes ``failure``'s named error."""
        try:
            return ray.get(ref, timeout=0)
        except Exception as e:  # noqa: BLE001 - every failure becomes one named error
            raise self.failure(what, ref, e) from e

    def failure(self, what: str, ref, error: BaseException) -> RemoteCallError:
        owner = self.owner(ref) or "an actor"
        bad = self.probe()
        if isinstance(error, RayActorError):
            bad.setdefault(owner, f"died ({describe(error)})")
        if owner in bad:
            return RemoteCallError(f"{what}: {self.explain(bad)}")
        if bad:
            return RemoteCallError(f"{what}: {self.explain(bad)}; {owner} then failed: {describe(error)}")
        return RemoteCallError(f"{what}: {owner} raised {describe(error)}{self.doing(owner)}")


def unanswered(pings: dict, timeout_s: float) -> list:
    """The values of ``pings`` (ping object ref -> who) whose ping did not answer "ok" within
    ``timeout_s``: dead, hung, or failing (e.g. a vLLM engine dead inside a live actor)."""
    if not pings:
        return []
    done, _ = ray.wait(list(pings), num_returns=len(pings), timeout=timeout_s)
    out = []
    for ref, who in pings.items():
        try:
            if ref not in done or ray.get(ref, timeout=0) != "ok":
                out.append(who)
        except Exception:  # noqa: BLE001 - dead or failing: either way not answering
            out.append(who)
    return out


def kill_quietly(actor) -> None:
    """``ray.kill`` an actor that may already be gone (or never was: None)."""
    if actor is None:
        return
    try:
        ray.kill(actor)
    except Exception:  # noqa: BLE001 - already gone is fine
        pass


def rendezvous_on(actor, timeout_s: float = 120.0) -> tuple[str, int]:
    """The node address of ``actor`` and a free port there: DeepSpeed's MASTER_ADDR / MASTER_PORT."""
    ref = actor.__ray_call__.remote(lambda self: (ray.util.get_node_ip_address(), free_port()))
    return get(ref, timeout_s, "rendezvous address of learner-rank-0")
