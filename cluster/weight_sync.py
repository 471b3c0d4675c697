"""Moving the learner's weights to generators and the reference.

Two transports:

- ``vllm`` generators: vLLM's weight-transfer API over a collective (NCCL on GPUs, gloo on
  CPUs; ``actors/weight_transfer.py``), or over CUDA IPC handles to generators colocated on
  the learner ranks' GPUs (vLLM's ``ipc`` engine). Learner rank 0 is the sender;
  ``GeneratorsClient`` is its handle on the generators' side of the handshake, carried to it as
  an argument, so the learner never imports this layer. Tensors never pass through the object store.
- ``hf`` generators and the reference: rank 0 serialises the state dict once into Ray's object
  store and every receiver resolves the same object reference, so the bytes never pass through
  the driver. All ranks take part in the export because ZeRO-3 has to gather the shards.
"""
from __future__ import annotations

import time

import ray

from ..actors.generator import Generator
from ..actors.learner import LearnerRank
from .groups import CONTROL, ActorGroup, unanswered


class GeneratorsClient:
    """vLLM's ``VLLMWeightSyncClient`` over generator actors: every call fans out to all of
    them (their control concurrency group, beside generation) and waits, bounded by
    ``timeout_s``. Generator ``i`` (``tp`` workers each) holds transfer ranks
    ``1 + i*tp .. (i+1)*tp``; ``version`` is what the next ``finish_weight_update`` labels."""

    def __init__(self, generators: list, workers_per_generator: int = 1, timeout_s: float = 600.0,
                 names: list[str] | None = None, ping_timeout_s: float = 30.0):
        self.generators, self.tp, self.timeout_s = list(generators), workers_per_generator, timeout_s
        self.names = names or [f"generator {i}" for i in range(len(self.generators))]
        self.ping_timeout_s = ping_timeout_s
        self.version = 0
        # (time.time() values) when the last start_weight_update began and returned: with
        # generator.pause_mode wait, the engines finishing their running sequences
        self.paused: tuple[float, float] | None = None

    def unreachable(self) -> list[str]:
        """The generators that do not answer a ping (dead, or hung past ``ping_timeout_s``):
        learner rank 0 asks before it pauses any generator or opens a rendezvous, so that a
        generator lost between two transfers costs the others nothing."""
        pings = {g.ping.options(concurrency_group=CONTROL).remote(): name
                 for g, name in zip(self.generators, self.names)}
        return unanswered(pings, self.ping_timeout_s)

    def _all(self, method, *args, per_actor: list[tuple] | None = None) -> list:
        """``method(*args)`` (a ``Generator`` method) on every generator (or ``method(*per_actor[i])``
        on generator i)."""
        arg_lists = per_actor or [args] * len(self.generators)
        refs = [getattr(g, method.__name__).options(concurrency_group=CONTROL).remote(*a)
                for g, a in zip(self.generators, arg_lists)]
        return ray.get(refs, timeout=self.timeout_s)

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        if "rank_offset" not in init_info:  # no collective ("ipc": each worker maps its GPU's tensors)
            self._all(Generator.init_weight_transfer, init_info)
            return
        offset = init_info["rank_offset"]
        self._all(Generator.init_weight_transfer, per_actor=[({**init_info, "rank_offset": offset + i * self.tp},)
                                                     for i in range(len(self.generators))])

    def start_weight_update(self) -> None:
        t0 = time.time()
        self._all(Generator.start_weight_update)
        self.paused = (t0, time.time())

    def update_weights(self, update_info: dict) -> None:
        self._all(Generator.update_weights, update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all(Generator.finish_weight_update, int(weight_version) if weight_version is not None else self.version)


def start_transfer(learners: ActorGroup, generators: list, names: list[str], backend: str, address: str, port: int,
                   bucket_bytes: int, dtype: str, timeout_s: float, tensor_parallel_size: int = 1) -> list:
    """Queue the weight-transfer handshake on every learner rank (rank 0 drives the generators):
    one group of learner rank 0 and every vLLM worker (``tensor_parallel_size`` per generator)
    of ``generators`` (actor handles, called ``names``), at ``address:port`` ("" and 0: rank 0's
    node and a port free there when the handshake runs)."""
    client = GeneratorsClient(generators, tensor_parallel_size, timeout_s, names)
    return learners.call_all(LearnerRank.init_weight_transfer, client, backend, address, port,
                             1 + len(generators) * tensor_parallel_size, bucket_bytes, dtype, timeout_s)


def start_broadcast(learners: ActorGroup, receivers: list[tuple[ActorGroup, str, tuple]],
                    dtype: str = "float32") -> tuple[list, list]:
    """Queue the export on every rank and the loads on every receiver; returns (exports, loads).

    Nothing waits here: a learner runs the export after the step queued before it, and the
    receivers' ``load_weights`` (control concurrency group) starts once rank 0's bytes exist.
    """
    exports = learners.call_all(LearnerRank.export_weights, dtype)
    blob = exports[0]  # rank 0 holds the full state dict; other ranks return None
    loads = [ref for group, method, extra in receivers for ref in group.call_all(method, blob, *extra, control=True)]
    return exports, loads
