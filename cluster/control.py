"""The run's control actor: ``r1ray scale`` talks to a running driver through it.

A plain class; ``start`` makes it the named actor ``control`` in the run's namespace (the
driver polls it every ``ray.heartbeat_s``; it holds no GPU and almost no CPU)."""
from __future__ import annotations

NAME = "control"


class RunControl:
    def __init__(self):
        self.wanted: int | None = None
        self.state: dict = {}

    def set_generators(self, n: int) -> dict:
        """Ask for ``n`` generators (clamped by the driver to generator.min_actors/max_actors)."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"generators: got {n!r}; accepted: an integer >= 1")
        self.wanted = n
        return self.state

    def generators(self) -> int | None:
        return self.wanted

    def report(self, state: dict) -> None:
        """The driver's view of the group (target, ready, slots, counts), for ``r1ray scale``."""
        self.state = dict(state)

    def status(self) -> dict:
        return {"wanted": self.wanted, **self.state}


def start(namespace: str):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)  # the driver's node
    return ray.remote(RunControl).options(name=NAME, namespace=namespace, num_cpus=0, lifetime=None,
                                          scheduling_strategy=here).remote()
