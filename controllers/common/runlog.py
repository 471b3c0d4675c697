"""metrics.jsonl (one object per learner step), written as the run goes, and sent on to the
run's trackers (controllers/common/trackers.py)."""
from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path


class MetricsWriter:
    """A jsonl file written line by line as the run goes, each record also sent to
    ``trackers`` (when given): as metrics on ``axis`` ("grpo" or "sft" steps), or with ``table``
    as the rows of a table, one table per step.

    Each ``write`` (or ``write_many``) goes to the file as one ``os.write``; if that fails
    part-way (a full disk), the file is cut back to where it was before the error is raised, so
    a reader never meets half a record. ``count`` is the number of records written."""

    def __init__(self, run_dir: Path, filename: str = "metrics.jsonl", trackers=None, axis: str = "grpo",
                 table: str | None = None):
        self.path = run_dir / filename
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.count = 0
        self.trackers, self.axis, self.table, self.rows = trackers, axis, table, []

    def write(self, record: dict) -> None:
        self.write_many([record])

    def write_many(self, records: list[dict]) -> None:
        """``records`` as lines, in one write where the file system takes it at once (a GRPO step's
        samples.jsonl: 14,336 lines at 256 generators, 3 µs of system calls each one by one)."""
        if not records:
            return
        clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
                 for r in records]
        data = memoryview("".join(json.dumps(c) + "\n" for c in clean).encode())
        size = os.fstat(self.fd).st_size
        try:
            while data:  # (a regular file takes it whole unless the disk fills or a signal cuts in)
                written = os.write(self.fd, data)
                if written == 0:
                    raise OSError(errno.ENOSPC, f"short write to {self.path} ({len(data)} bytes left)")
                data = data[written:]
        except OSError:
            os.ftruncate(self.fd, size)
            raise
        self.count += len(clean)
        if self.trackers is None:
            return
        for c in clean:
            if self.table is None:
                self.trackers.log(c, self.axis)
                continue
            if self.rows and self.rows[-1].get("step") != c.get("step"):
                self._send_table()
            self.rows.append(c)

    def _send_table(self) -> None:
        if self.rows:
            self.trackers.table(self.table, self.rows, int(self.rows[0].get("step", 0)))
            self.rows = []

    def close(self) -> None:
        if self.trackers is not None and self.table is not None:
            self._send_table()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def read_jsonl(path: Path) -> list[dict]:
    """The records of a jsonl file; a last line cut short (a killed writer) is left out."""
    lines = Path(path).read_text().split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:  # only the last line may be partial
                raise
    return out


def read_json(path: Path) -> dict | None:
    """A JSON file's object, or None when it is missing or unreadable (written atomically, so
    unreadable means damaged by hand)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_json_atomic(path: Path, data: dict) -> None:
    """Write to a temporary file beside ``path``, then rename: readers see the old file or the
    new one, never a half-written one (a full disk leaves the old one in place)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(data, indent=2, default=str))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def truncate_jsonl(path: Path, last_step: int) -> int:
    """Keep the records of ``path`` whose ``step`` is at most ``last_step`` (what a resumed run
    redoes is written again). Atomic: a reader sees the old file or the new one. Returns the
    number of records kept."""
    if not path.exists():
        return 0
    kept = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(path)
    return len(kept)
