"""Ray placement groups: where each actor group runs.

Groups of bundles, each reserved atomically before any actor starts (``System`` makes the plan):

- ``train``: one bundle per learner rank, then the reference's, strategy PACK: on one node
  whenever they fit there (DeepSpeed's collectives and the reference's batches stay on the
  node's fast links), spread over the fewest nodes otherwise.
- ``generator-<i>``: one bundle of ``tensor_parallel_size`` GPUs on one node (vLLM's tensor
  parallelism runs inside the actor); a group per generator, so generators can be added and
  removed one at a time (placement groups cannot be resized).
- ``reward-scorer-<i>``: one CPU bundle per scorer, a group each for the same reason.
- ``placement.mode: colocate`` with vLLM: no generator group; generator ``i`` shares learner rank
  ``i``'s bundle (its CPUs added to the bundle; on GPUs the two actors take half of its GPU
  each, so Ray gives both the same device), and lives and dies with the ``train`` group.

A group whose node died is not left for Ray to re-place: Ray 2.60's GCS retries such a group
(state RESCHEDULING) on every pass of its scheduler while the cluster has no room for it, a busy
loop of its single thread that starves node health checks and every other RPC (a run's pings
time out; ray-project/ray#65007), whereas a new group waits for room with backoff. The driver
``renew``s the group of a lost elastic actor and any of a starting one that turns ``rescheduling``.

Every actor is scheduled into its own bundle (or one the plan has it share), so a rank can never
land on a node the plan did not reserve for it, and ``unplaceable`` says up front whether a plan
fits the nodes there.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


class PlacementError(RuntimeError):
    """The cluster cannot hold a placement plan (raised before any actor starts)."""


@dataclass
class Bundles:
    """One placement group: named bundles (``learner-rank-0``...) in order."""

    name: str
    bundles: list[tuple[str, dict[str, float]]] = field(default_factory=list)
    strategy: str = "PACK"
    shared: dict[str, str] = field(default_factory=dict)  # owner -> the owner of the bundle it shares

    def add(self, owner: str, cpus: float, gpus: float = 0.0) -> None:
        self.bundles.append((owner, {k: v for k, v in (("CPU", cpus), ("GPU", gpus)) if v > 0}))

    def share(self, owner: str, host: str, cpus: float) -> None:
        """``owner`` is scheduled into ``host``'s bundle, which grows by its ``cpus`` (its GPUs
        are the host's: the two actors ask for fractions of them)."""
        i = self.index(host)
        grown = dict(self.bundles[i][1])
        if cpus > 0:
            grown["CPU"] = grown.get("CPU", 0.0) + cpus
        self.bundles[i] = (host, grown)
        self.shared[owner] = host

    def index(self, owner: str) -> int:
        """The bundle ``owner`` is scheduled into (ValueError: none in this group)."""
        return [o for o, _ in self.bundles].index(self.shared.get(owner, owner))

    def total(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for _, b in self.bundles:
            for k, v in b.items():
                out[k] = out.get(k, 0.0) + v
        return out


def alive_nodes() -> list[dict[str, float]]:
    """The total resources of each alive node of the connected cluster."""
    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def unplaceable(plans: list[Bundles], nodes: list[dict[str, float]]) -> str | None:
    """Why ``plans`` cannot all be placed on ``nodes`` (first-fit over the bundles, largest GPU
    bundle first, as Ray's PACK would try), or None when they can."""
    free = [dict(n) for n in nodes]
    wanted = [(plan.name, owner, b) for plan in plans for owner, b in plan.bundles]
    for name, owner, bundle in sorted(wanted, key=lambda w: (-w[2].get("GPU", 0), -w[2].get("CPU", 0))):
        if not any(all(node.get(k, 0.0) >= v for k, v in bundle.items()) for node in nodes):
            largest = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
            return (f"{owner} needs {_fmt(bundle)} on one node, and no node has that "
                    f"(the most GPUs on one node: {largest:g})")
        for node in free:
            if all(node.get(k, 0.0) >= v - 1e-9 for k, v in bundle.items()):
                for k, v in bundle.items():
                    node[k] -= v
                break
        else:
            return f"{owner} ({_fmt(bundle)}) does not fit beside the other actors: the plan needs {_fmt(_sum(plans))}, " \
                   f"the cluster has {_fmt(_sum_nodes(nodes))}"
    return None


def _sum(plans: list[Bundles]) -> dict[str, float]:
    out: dict[str, float] = {}
    for plan in plans:
        for k, v in plan.total().items():
            out[k] = out.get(k, 0.0) + v
    return out


def _sum_nodes(nodes: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in resources.items()) or "nothing"


class Placement:
    """The placement groups of one run: reserved together, released together."""

    def __init__(self, plans: list[Bundles], namespace: str, timeout_s: float = 120.0):
        self.plans = {p.name: p for p in plans if p.bundles}
        self.namespace = namespace
        self.groups: dict[str, object] = {}
        t0 = time.monotonic()
        try:
            for plan in self.plans.values():
                self.groups[plan.name] = placement_group([b for _, b in plan.bundles], strategy=plan.strategy,
                                                         name=f"{namespace}-{plan.name}")
            for name, pg in self.groups.items():
                left = max(1.0, timeout_s - (time.monotonic() - t0))
                try:
                    ray.get(pg.ready(), timeout=left)
                except ray.exceptions.GetTimeoutError:
                    plan = self.plans[name]
                    raise PlacementError(
                        f"placement group '{namespace}-{name}' ({len(plan.bundles)} bundles, {_fmt(plan.total())}, "
                        f"strategy {plan.strategy}) was not placed within {timeout_s:g}s; the cluster's alive nodes "
                        f"have {_fmt(_sum_nodes(alive_nodes()))} in all (an autoscaling cluster may need a longer "
                        "ray.placement_timeout_s)") from None
        except BaseException:
            self.remove()
            raise

    def strategy(self, owner: str) -> PlacementGroupSchedulingStrategy:
        """The scheduling strategy that puts ``owner`` (e.g. ``generator-1``) into its bundle."""
        for name, plan in self.plans.items():
            try:
                index = plan.index(owner)
            except ValueError:
                continue
            return PlacementGroupSchedulingStrategy(placement_group=self.groups[name],
                                                    placement_group_bundle_index=index)
        raise KeyError(f"no bundle was planned for {owner!r}")

    def add(self, plan: Bundles) -> None:
        """Reserve one more group without waiting (an elastic generator's): an actor scheduled
        into it starts once it is placed; until then an autoscaler sees the demand and may add a node."""
        self.plans[plan.name] = plan
        self.groups[plan.name] = placement_group([b for _, b in plan.bundles], strategy=plan.strategy,
                                                 name=f"{self.namespace}-{plan.name}")

    def renew(self, name: str) -> None:
        """Release group ``name`` and reserve it again, without waiting (see the module's note):
        an actor scheduled into it afterwards starts wherever the new reservation is placed.
        An actor in a bundle it shares (a colocated generator) keeps it: that group is the
        learners', which a lost node ends the run for anyway."""
        if name not in self.plans:
            return
        plan = self.plans[name]
        self.release(name)
        self.add(plan)

    def rescheduling(self, names: list[str]) -> list[str]:
        """Those of ``names`` whose group lost its node and waits to be placed again."""
        ids = {self.groups[n].id.hex(): n for n in names if n in self.groups}
        if not ids:
            return []
        table = ray.util.placement_group_table()  # one call for all groups
        return [n for pg_id, n in ids.items() if table.get(pg_id, {}).get("state") == "RESCHEDULING"]

    def release(self, name: str) -> None:
        pg = self.groups.pop(name, None)
        self.plans.pop(name, None)
        if pg is not None:
            try:
                remove_placement_group(pg)
            except Exception:  # noqa: BLE001 - the cluster may already be gone
                pass

    def remove(self) -> None:
        for pg in self.groups.values():
            try:
                remove_placement_group(pg)
            except Exception:  # noqa: BLE001 - the cluster may already be gone
                pass
        self.groups = {}
