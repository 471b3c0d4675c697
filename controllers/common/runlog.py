"""metrics.jsonl (one object per learner step) and TensorBoard, written as the run goes."""
from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path


class MetricsWriter:
    """A jsonl file (and TensorBoard) written line by line as the run goes.

    Each line goes to the file in one ``os.write``; if that fails part-way (a full disk), the
    file is cut back to its last whole line before the error is raised, so a reader never
    meets half a record. ``count`` is the number of records written."""

    def __init__(self, run_dir: Path, filename: str = "metrics.jsonl", tensorboard: bool = True,
                 purge_step: int | None = None):
        self.path = run_dir / filename
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.count = 0
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: a resumed run drops the events it is about to write again
                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)
            except ImportError:
                self.tb = None

    def write(self, record: dict, prefix: str = "") -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        data = (json.dumps(clean) + "\n").encode()
        size = os.fstat(self.fd).st_size
        try:
            written = os.write(self.fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, f"short write to {self.path} ({written} of {len(data)} bytes)")
        except OSError:
            os.ftruncate(self.fd, size)
            raise
        self.count += 1
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(prefix + k, v, step)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


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
