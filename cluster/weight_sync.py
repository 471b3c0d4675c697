"""Moving the learner's weights to generators and the reference.

CPU transport: rank 0 serialises the state dict once into Ray's object store and every
receiver resolves the same object reference, so the bytes never pass through the driver.
All ranks take part in the export because ZeRO-3 has to gather the shards.
"""
from __future__ import annotations

from .groups import ActorGroup


def start_broadcast(learners: ActorGroup, receivers: list[tuple[ActorGroup, str, tuple]],
                    dtype: str = "float32") -> tuple[list, list]:
    """Queue the export on every rank and the loads on every receiver; returns (exports, loads).

    Nothing waits here: a learner runs the export after the step queued before it, and the
    receivers' ``load_weights`` (control concurrency group) starts once rank 0's bytes exist.
    """
    exports = learners.call_all("export_weights", dtype)
    blob = exports[0]  # rank 0 holds the full state dict; other ranks return None
    loads = [ref for group, method, extra in receivers for ref in group.call_all(method, blob, *extra, control=True)]
    return exports, loads

