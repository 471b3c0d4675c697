"""Moving the learner's weights to generators and the reference.

CPU transport: rank 0 serialises the state dict once into Ray's object store and every
receiver resolves the same object reference, so the bytes never pass through the driver.
All ranks take part in the export because ZeRO-3 has to gather the shards.
"""
from __future__ import annotations

import time

from .groups import ActorGroup


def broadcast_weights(learners: ActorGroup, receivers: list[tuple[ActorGroup, str, tuple]],
                      dtype: str = "float32") -> float:
    """Export from the learner group, then call ``method(blob, *extra)`` on every receiver.

    Returns the wall seconds from the start of the export until the last receiver loaded.
    """
    t0 = time.perf_counter()
    exports = learners.call_all("export_weights", dtype)
    blob = exports[0]  # rank 0 holds the full state dict; other ranks return None
    loads = []
    for group, method, extra in receivers:
        loads.append((group, group.call_all(method, blob, *extra)))
    learners.get(exports[1:], "export_weights") if len(exports) > 1 else None
    for group, refs in loads:
        group.get(refs, "load_weights")
    return time.perf_counter() - t0
