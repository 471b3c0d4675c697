"""Actor groups: N named Ray actors of one plain class, called together, every call bounded in time."""
from __future__ import annotations

import socket
import time
from typing import Any, Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError


class RemoteCallError(RuntimeError):
    """A remote call that failed or did not answer in time; names the actor and the method."""


def get(refs, timeout_s: float, what: str):
    """``ray.get`` with a deadline and an error that says who did not answer."""
    try:
        return ray.get(refs, timeout=timeout_s)
    except GetTimeoutError:
        raise RemoteCallError(f"{what} did not answer within {timeout_s:.0f} s") from None
    except RayActorError as e:
        raise RemoteCallError(f"{what}: the actor died ({type(e).__name__}: {str(e).splitlines()[0]})") from e


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


class ActorGroup:
    """``name-0 … name-(n-1)``: the names the dashboard shows and ``ray.get_actor`` finds.

    Work methods run one at a time, in submission order; ``control=True`` calls run in a
    separate concurrency group, beside whatever work is in progress.
    """

    def __init__(self, name: str, cls: type, count: int, make_args: Callable[[int], tuple[tuple, dict]], *,
                 num_cpus: float, num_gpus: float = 0.0, timeout_s: float = 600.0, namespace: str | None = None):
        self.name, self.timeout_s = name, timeout_s
        remote_cls = ray.remote(concurrency_groups={CONTROL: 2})(cls)
        self.actors = []
        for i in range(count):
            args, kwargs = make_args(i)
            opts: dict[str, Any] = dict(name=f"{name}-{i}", num_cpus=num_cpus, num_gpus=num_gpus,
                                        lifetime=None)
            if namespace:
                opts["namespace"] = namespace
            self.actors.append(remote_cls.options(**opts).remote(*args, **kwargs))

    def __len__(self) -> int:
        return len(self.actors)

    def call(self, i: int, method: str, *args, control: bool = False, **kwargs):
        m = getattr(self.actors[i], method)
        return (m.options(concurrency_group=CONTROL) if control else m).remote(*args, **kwargs)

    def call_all(self, method: str, *args, control: bool = False, **kwargs) -> list:
        return [self.call(i, method, *args, control=control, **kwargs) for i in range(len(self.actors))]

    def shard(self, method: str, items: list, *args) -> list:
        """Split ``items`` into contiguous chunks, one per actor, and call ``method(chunk, *args)``
        on each (actors whose chunk is empty are skipped). Returns the object refs, in order."""
        return [self.call(i, method, chunk, *args) for i, chunk in enumerate(split(items, len(self))) if chunk]

    def map(self, method: str, items: list, *args) -> list:
        """``shard`` and wait: the actors' results (lists) concatenated in the order of ``items``."""
        return [x for part in self.get(self.shard(method, items, *args), method) for x in part]

    def get(self, refs, what: str, timeout_s: float | None = None):
        return get(refs, timeout_s or self.timeout_s, f"{self.name} group: {what}")

    def run_all(self, method: str, *args, timeout_s: float | None = None, control: bool = False, **kwargs) -> list:
        return self.get(self.call_all(method, *args, control=control, **kwargs), method, timeout_s)

    def wait_ready(self, timeout_s: float | None = None) -> float:
        """Block until every actor answers ``ping`` (constructors done). Returns seconds."""
        t0 = time.perf_counter()
        self.run_all("ping", timeout_s=timeout_s, control=True)
        return time.perf_counter() - t0

    def kill(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone is fine
                pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def rendezvous_on(actor, timeout_s: float = 120.0) -> tuple[str, int]:
    """The node address of ``actor`` and a free port there: DeepSpeed's MASTER_ADDR / MASTER_PORT."""
    ref = actor.__ray_call__.remote(lambda self: (ray.util.get_node_ip_address(), free_port()))
    return get(ref, timeout_s, "rendezvous address of learner-rank-0")
