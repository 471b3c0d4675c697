"""Learner weights to vLLM generators through a collective, by name, in bounded buckets.

This is vLLM 0.32's weight-transfer API (``weight_transfer_config``, ``init_weight_transfer_engine``,
``start_weight_update`` / ``update_weights`` / ``finish_weight_update``) with one backend per
device:

- on GPUs, vLLM's own ``nccl`` engines (packed buffers of ``bucket_bytes``), or its ``ipc``
  engines when the generators are colocated on the learner ranks' GPUs (NCCL cannot join two
  processes on one device; every learner rank shares its GPU's tensors by CUDA IPC handle, and
  each vLLM worker maps those of its own GPU);
- on CPUs, the ``r1ray_gloo`` engines below: the same interface over a gloo process group, so
  CPU tests run the code path a GPU run takes. vLLM loads the entry point of group
  ``vllm.general_plugins`` (``register`` here) in each of its processes, which registers them
  in the engine core and worker processes too.

The group spans learner rank 0 (rank 0, the sender) and every vLLM worker of every generator
(generator ``i`` with tensor parallelism ``t`` holds ranks ``1 + i*t .. i*t + t``). Nothing is
ever one serialised blob: rank 0 walks the state dict in order, converts each tensor to the
wire dtype and broadcasts buckets of at most ``bucket_bytes`` (a decoder layer kept whole when
it fits, a tensor larger than a bucket alone); workers receive a bucket, load its tensors by
name and drop it. Under ZeRO-3 all learner ranks gather one bucket's parameters at a time,
never the whole model.
"""
from __future__ import annotations

import datetime
import functools
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

BACKEND = "r1ray_gloo"
DEFAULT_BUCKET_BYTES = 512 << 20


def nbytes(dtype: torch.dtype, shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


def _layer(name: str) -> str | None:
    """The decoder layer a checkpoint name belongs to (``model.layers.3``), or None."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return None


def bucket_plan(sizes: list[int], bucket_bytes: int, names: list[str] | None = None) -> list[list[int]]:
    """Consecutive indices grouped so each bucket holds at most ``bucket_bytes`` (a larger
    tensor goes alone). With ``names``, a decoder layer's tensors stay in one bucket whenever
    the layer fits in one: vLLM reloads a layer once all of its tensors have arrived, so a
    bucket that ends mid-layer would stay alive until the next one. Sender and receivers
    compute it from the same metadata."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes={bucket_bytes}: must be > 0")
    units: list[list[int]] = []
    for i in range(len(sizes)):
        layer = _layer(names[i]) if names is not None else None
        if units and layer is not None and _layer(names[units[-1][-1]]) == layer:
            units[-1].append(i)
        else:
            units.append([i])
    buckets, current, total = [], [], 0
    for unit in units:
        size = sum(sizes[i] for i in unit)
        if size > bucket_bytes:  # a layer larger than a bucket: split it tensor by tensor
            pieces = [[i] for i in unit]
        else:
            pieces = [unit]
        for piece in pieces:
            piece_size = sum(sizes[i] for i in piece)
            if current and total + piece_size > bucket_bytes:
                buckets.append(current)
                current, total = [], 0
            current += piece
            total += piece_size
    if current:
        buckets.append(current)
    return buckets


def open_gloo_group(host: str, port: int, rank: int, world_size: int, timeout_s: float = 600.0):
    """A gloo process group of its own (not torch's default group, which DeepSpeed owns):
    rank 0 hosts the TCP store."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
    return dist.ProcessGroupGloo(dist.PrefixStore("r1ray-weights", store), rank, world_size, timeout)


def _broadcast(group, tensor: torch.Tensor) -> None:
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([tensor], opts).wait()


def send_buckets(group, pairs: Iterator[tuple[str, torch.Tensor]], names: list[str], sizes: list[int],
                 bucket_bytes: int) -> int:
    """Rank 0's side: pack consecutive tensors into flat byte buckets and broadcast each."""
    sent = 0
    for bucket in bucket_plan(sizes, bucket_bytes, names):
        parts = []
        for _ in bucket:
            _, tensor = next(pairs)
            parts.append(tensor.detach().contiguous().view(-1).view(torch.uint8))
        flat = torch.cat(parts) if len(parts) > 1 else parts[0]
        _broadcast(group, flat)
        sent += flat.numel()
    return sent


def receive_buckets(group, names: list[str], dtypes: list[torch.dtype], shapes: list[list[int]],
                    bucket_bytes: int, load) -> int:
    """A receiver's side: one bucket at a time, its tensors handed to ``load([(name, tensor)])``."""
    sizes = [nbytes(d, s) for d, s in zip(dtypes, shapes)]
    received = 0
    for bucket in bucket_plan(sizes, bucket_bytes, names):
        flat = torch.empty(sum(sizes[i] for i in bucket), dtype=torch.uint8)
        _broadcast(group, flat)
        out, offset = [], 0
        for i in bucket:
            out.append((names[i], flat[offset : offset + sizes[i]].view(dtypes[i]).view(shapes[i])))
            offset += sizes[i]
        load(out)
        received += flat.numel()
        del flat, out
    return received


# -- vLLM's interface --------------------------------------------------------------------------
# Imported lazily: the learner imports this module only when generators run vLLM.

@functools.cache
def _engine_classes():
    from vllm.distributed.weight_transfer.base import (
        TrainerInitInfo,
        TrainerWeightTransferEngine,
        WeightTransferEngine,
        WeightTransferInitInfo,
        WeightTransferUpdateInfo,
    )

    @dataclass
    class GlooInitInfo(WeightTransferInitInfo):
        master_address: str
        master_port: int
        rank_offset: int
        world_size: int
        bucket_bytes: int = DEFAULT_BUCKET_BYTES
        timeout_s: float = 600.0

    @dataclass
    class GlooUpdateInfo(WeightTransferUpdateInfo):
        names: list[str]
        dtype_names: list[str]
        shapes: list[list[int]]

    class GlooWeightTransferEngine(WeightTransferEngine):
        """Worker side: joins the gloo group, loads each received bucket by name."""

        init_info_cls = GlooInitInfo
        update_info_cls = GlooUpdateInfo

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.group, self.bucket_bytes = None, DEFAULT_BUCKET_BYTES

        def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
            pc = self.parallel_config
            rank = init_info.rank_offset + pc.data_parallel_index * pc.world_size + pc.rank
            self.bucket_bytes = init_info.bucket_bytes
            self.group = open_gloo_group(init_info.master_address, init_info.master_port, rank,
                                         init_info.world_size, init_info.timeout_s)

        def start_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

            initialize_layerwise_reload(self.model)

        def finish_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            finalize_layerwise_reload(self.model, self.model_config)

        def update_weights(self, update_info: dict[str, Any]) -> None:
            # The base class ends with torch.accelerator.synchronize(): nothing to wait for on a CPU.
            self.receive_weights(self.parse_update_info(update_info))

        def receive_weights(self, info: GlooUpdateInfo) -> None:
            if self.group is None:
                raise RuntimeError("r1ray_gloo weight transfer: init_weight_transfer_engine was not called")
            receive_buckets(self.group, info.names, [getattr(torch, d) for d in info.dtype_names], info.shapes,
                            self.bucket_bytes, self.model.load_weights)

        def shutdown(self) -> None:
            self.group = None

    @dataclass
    class GlooTrainerInitInfo(TrainerInitInfo):
        backend: ClassVar[str] = BACKEND
        master_address: str
        master_port: int
        world_size: int
        bucket_bytes: int = DEFAULT_BUCKET_BYTES
        timeout_s: float = 600.0

    class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine):
        """Trainer side, the mirror of vLLM's NCCL trainer engine over gloo."""

        init_info_cls = GlooTrainerInitInfo

        def __init__(self, *, client, source, is_sender: bool = True, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
            super().__init__(client=client, source=source, is_sender=is_sender)
            self.bucket_bytes, self.group = bucket_bytes, None

        @classmethod
        def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client, source=None):
            from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

            engine = cls(client=client, source=source, is_sender=init_info.is_sender,
                         bucket_bytes=init_info.bucket_bytes)
            if not engine.is_sender:
                return engine
            worker = GlooInitInfo(init_info.master_address, init_info.master_port, 1, init_info.world_size,
                                  init_info.bucket_bytes, init_info.timeout_s)
            # Both sides must meet in the rendezvous; a worker that fails to join ends it at once
            # rather than after the store's timeout (the thread left waiting ends with it).
            exe = ThreadPoolExecutor(max_workers=2)
            try:
                workers = exe.submit(client.init_weight_transfer_engine, asdict(worker))
                own = exe.submit(open_gloo_group, init_info.master_address, init_info.master_port, 0,
                                 init_info.world_size, init_info.timeout_s)
                done, _ = wait([workers, own], return_when=FIRST_EXCEPTION)
                for future in done:
                    future.result()
                workers.result()
                engine.group = own.result()
            finally:
                exe.shutdown(wait=False)
            return engine

        def send_weights(self) -> None:
            from concurrent.futures import ThreadPoolExecutor

            meta = self.source.metadata()
            if not self.is_sender:
                for _ in self.source:  # stay in the learner-side gathers
                    pass
                return
            info = GlooUpdateInfo([m.name for m in meta], [str(m.dtype).split(".")[-1] for m in meta],
                                  [list(m.shape) for m in meta])
            self.client.start_weight_update()
            exe = ThreadPoolExecutor(max_workers=1)
            try:
                future = exe.submit(self.client.update_weights, asdict(info))
                send_buckets(self.group, _checked(iter(self.source), meta), [m.name for m in meta],
                             [nbytes(m.dtype, m.shape) for m in meta], self.bucket_bytes)
                future.result()
            finally:
                exe.shutdown(wait=False)  # a failed broadcast leaves the RPC blocked: never join it
            self.client.finish_weight_update()

        def shutdown(self) -> None:
            self.group = None

    return GlooWeightTransferEngine, GlooTrainerWeightTransferEngine, GlooTrainerInitInfo


def _checked(pairs, meta):
    for m in meta:
        name, tensor = next(pairs)
        if name != m.name or tensor.dtype != m.dtype or tuple(tensor.shape) != tuple(m.shape):
            raise ValueError(f"weight source yielded {name!r} {tensor.dtype} {tuple(tensor.shape)} where its "
                             f"metadata declared {m.name!r} {m.dtype} {tuple(m.shape)}")
        yield name, tensor


def register() -> None:
    """vLLM plugin entry point (group ``vllm.general_plugins``); safe to call more than once."""
    try:
        from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory
    except ImportError:  # an older vLLM without the weight-transfer API
        return
    if BACKEND in WeightTransferEngineFactory._registry:
        return
    # Every reload warns that rotary embeddings (which have no weights) loaded none.
    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
        lambda record: not record.getMessage().startswith("RotaryEmbedding: Failed to load weights"))
    engine, trainer, _ = _engine_classes()
    WeightTransferEngineFactory.register_engine(BACKEND, engine)
    WeightTransferTrainerFactory.register_engine(BACKEND, trainer)


def trainer_init_info(backend: str, rank: int, master_address: str, master_port: int, world_size: int,
                      bucket_bytes: int = DEFAULT_BUCKET_BYTES, timeout_s: float = 600.0):
    """The trainer-side init info of ``backend`` ("nccl", "ipc" or "r1ray_gloo")."""
    if backend == "ipc":  # colocated on the learner ranks' GPUs: every rank shares its tensors' handles
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

        return IPCTrainerInitInfo(packed=True, packed_buffer_size_bytes=bucket_bytes, rank=rank)
    if backend == "nccl":
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        return NCCLTrainerInitInfo(master_address, master_port, world_size, packed=True,
                                   packed_buffer_size_bytes=bucket_bytes, rank=rank)
    if backend == BACKEND:
        register()
        return _engine_classes()[2](master_address, master_port, world_size, bucket_bytes, timeout_s, rank=rank)
    raise ValueError(f"weight transfer backend {backend!r}: accepted are 'nccl', 'ipc', {BACKEND!r}")


def state_source(module: torch.nn.Module, dtype: torch.dtype, device: str, bucket_bytes: int, zero3: bool):
    """A vLLM ``WeightSource`` over a (DeepSpeed) module's state dict: every checkpoint name,
    tied ones included (vLLM on a CPU unties the LM head), converted to the wire ``dtype`` on
    ``device`` as it is sent. Under ZeRO-3 every rank must iterate it: the parameters of one
    bucket at a time are gathered, copied out and released, so no rank ever holds the whole
    model."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    entries = list(module.state_dict(keep_vars=True).items())  # ZeRO-3: partitioned, with ds_shape

    def shape(t):
        return tuple(getattr(t, "ds_shape", t.shape))

    meta = [ParamMeta(name, dtype, shape(t)) for name, t in entries]
    sizes = [nbytes(dtype, m.shape) for m in meta]

    class StateSource(WeightSource):
        active = None  # the pass in progress ("done" once one ended)

        def metadata(self):
            return meta

        def __iter__(self):
            self.active = self._walk()
            return self.active

        def drain(self) -> None:
            """End the pass a failed transfer left (or make one it never began): every rank
            takes part in each bucket's gather, so a rank must walk as far as the others."""
            rest, self.active = self.active, None
            for _ in (self._walk() if rest is None else () if rest == "done" else rest):
                pass

        def _walk(self):
            for bucket in bucket_plan(sizes, bucket_bytes, [name for name, _ in entries]):
                tensors = [entries[i][1] for i in bucket]
                if zero3:
                    import deepspeed

                    params = list({id(t): t for t in tensors if hasattr(t, "ds_id")}.values())
                    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                        out = [t.detach().to(device=device, dtype=dtype, copy=True) for t in tensors]
                else:
                    out = [t.detach().to(device=device, dtype=dtype) for t in tensors]
                for i, t in zip(bucket, out):
                    yield entries[i][0], t
                del out
            self.active = "done"

    return StateSource()
