"""The records of an offline W&B run, read back with W&B's own record schema
(``wandb.proto.wandb_internal_pb2.Record``) from its ``run-<id>.wandb`` file: a LevelDB-style
log (a 7-byte header ``:W&B`` + magic 0xBEE1 + version, then 32 KiB blocks of records, each
with a 4-byte checksum, a 2-byte length and a 1-byte type: full, first, middle, last)."""
from __future__ import annotations

import json
from pathlib import Path

BLOCK, HEADER = 32 * 1024, 7


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B" and int.from_bytes(data[4:6], "little") == 0xBEE1, path
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + HEADER:pos + HEADER + length], pos + HEADER + length
        if kind in (1, 4):  # full, last
            record = pb.Record()
            record.ParseFromString(pending + chunk)
            pending = b""
            yield record
        elif kind in (2, 3):  # first, middle
            pending += chunk


def run_files(run_dir: Path) -> list[Path]:
    """The offline runs' record files under ``run_dir/wandb``, oldest first."""
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def _items(items) -> dict:
    return {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in items}


def history(run_dir: Path) -> list[dict]:
    """Every logged row of every offline run of ``run_dir``, in order."""
    return [_items(r.history.item) for f in run_files(run_dir) for r in records(f)
            if r.WhichOneof("record_type") == "history"]


def config(run_dir: Path) -> dict:
    out: dict = {}
    for f in run_files(run_dir):
        for r in records(f):
            kind = r.WhichOneof("record_type")
            if kind == "config":
                out.update(_items(r.config.update))
            elif kind == "run":
                out.update(_items(r.run.config.update))
    return out


def run_ids(run_dir: Path) -> list[str]:
    return [r.run.run_id for f in run_files(run_dir) for r in records(f) if r.WhichOneof("record_type") == "run"]


def run_records(run_dir: Path) -> list:
    """The ``run`` record of each offline run (its id, name, job_type, run_group, tags)."""
    return [r.run for f in run_files(run_dir) for r in records(f) if r.WhichOneof("record_type") == "run"]


def summary(run_dir: Path) -> dict:
    """The summary the runs of ``run_dir`` ended with (later updates over earlier ones)."""
    out: dict = {}
    for f in run_files(run_dir):
        for r in records(f):
            if r.WhichOneof("record_type") == "summary":
                out.update(_items(r.summary.update))
    return out
