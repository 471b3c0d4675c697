"""Run directories on object storage (``storage.path: s3://...``, ``gs://``, ``abfs://``,
``hdfs://``, ``file://``), through ``pyarrow.fs``.

Every process works in a local *staging* copy of the run directory, at the same path on every
node: ``$R1RAY_STAGING/<scheme>/<bucket>/<key>`` (default ``~/.cache/r1ray/staging``). So the
code that writes and reads run directories stays path-based, and the URI of any staged path is
known anywhere (``uri_of``):

- the driver mirrors what it writes (logs, summary, config, reports) in the background and at
  the end (``Mirror``), and uploads a checkpoint's ``driver.json`` itself, last;
- each learner rank uploads the checkpoint files it wrote (its shards), and rank 0 the HF
  checkpoints, before its save call returns (``push``);
- whoever reads a staged path that is not on its node (a learner resuming on another node, an
  actor loading ``checkpoint-sft`` of a previous stage) downloads it first (``pull``): files
  missing here or of another size than on the storage.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger("r1ray")

STAGING_ENV = "R1RAY_STAGING"
# Not mirrored by the driver: their writers upload them (learner ranks; the driver's commit
# uploads a checkpoint's driver.json last, which is what makes the checkpoint complete).
WRITTEN_BY_LEARNERS = ("checkpoints", "checkpoint-")
SMALL = 8 << 20  # files pulled with a run's metadata; bigger ones (weights) when something loads them


def is_uri(path) -> bool:
    return "://" in str(path)


def staging_root() -> Path:
    return Path(os.path.abspath(Path(os.environ.get(STAGING_ENV, "~/.cache/r1ray/staging")).expanduser()))


def local_path(uri: str) -> Path:
    """Where this node stages ``uri`` (the same path on every node)."""
    scheme, _, rest = uri.partition("://")
    rest = rest.split("?", 1)[0].strip("/")
    return staging_root() / scheme / rest


def uri_of(path) -> str | None:
    """The URI of a staged path, None for any other path."""
    root, p = staging_root(), Path(os.path.abspath(path))
    if root not in p.parents:
        return None
    scheme, *rest = p.relative_to(root).parts
    return f"{scheme}://{'/' if scheme == 'file' else ''}{'/'.join(rest)}"


def _fs(uri: str):
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri)


def check_reachable(uri: str) -> None:
    """Write, read back and delete a probe file under ``uri``; raises OSError (with the
    storage's own message) when that fails."""
    fs, base = _fs(uri)
    probe = f"{base.rstrip('/')}/.r1ray-probe-{os.getpid()}"
    fs.create_dir(base, recursive=True)
    with fs.open_output_stream(probe) as f:
        f.write(b"ok")
    with fs.open_input_stream(probe) as f:
        if f.read() != b"ok":
            raise OSError(f"{uri}: a probe file read back differently")
    fs.delete_file(probe)


def remote_files(uri: str) -> dict[str, int]:
    """{path relative to ``uri``: size} of every file under it ({} when there is nothing)."""
    import pyarrow.fs as pafs

    fs, base = _fs(uri)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.File:
        return {"": info.size}
    if info.type != pafs.FileType.Directory:
        return {}
    base = base.rstrip("/")
    return {i.path[len(base) + 1:]: i.size for i in fs.get_file_info(pafs.FileSelector(base, recursive=True))
            if i.type == pafs.FileType.File}


def occupied(path) -> bool:
    """Whether the staged ``path`` holds files on its storage (False for a path not staged)."""
    uri = uri_of(path)
    return uri is not None and bool(remote_files(uri))


def push(path, only: list[str] | None = None) -> int:
    """Upload the staged ``path`` (a file, or a folder's files; ``only``: these names in it) to
    its URI; a no-op for a path that is not staged. Returns the bytes sent."""
    uri = uri_of(path)
    if uri is None:
        return 0
    fs, base = _fs(uri)
    path = Path(path)
    files = [path] if path.is_file() else [path / n for n in only] if only is not None else \
        [p for p in sorted(path.rglob("*")) if p.is_file()]
    sent = 0
    for f in files:
        target = base if f == path else f"{base.rstrip('/')}/{f.relative_to(path).as_posix()}"
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with open(f, "rb") as src, fs.open_output_stream(target) as dst:
            while chunk := src.read(8 << 20):
                dst.write(chunk)
                sent += len(chunk)
    return sent


class Upload:
    """``push`` in a background thread (a learner rank's checkpoint files, while it trains on);
    ``wait`` joins it and raises what it raised."""

    def __init__(self, path, only: list[str] | None = None):
        self.path, self.sent, self.error = path, 0, None
        self.thread = threading.Thread(target=self._run, args=(path, only), name="r1ray-storage-upload", daemon=True)
        self.thread.start()

    def _run(self, path, only) -> None:
        try:
            self.sent = push(path, only)
        except BaseException as e:  # noqa: BLE001 - raised again by wait()
            self.error = e

    def wait(self) -> int:
        self.thread.join()
        if self.error is not None:
            raise OSError(f"uploading {self.path} to {uri_of(self.path)} failed: {self.error}") from self.error
        return self.sent


def pull(path, small_only: bool = False, skip=lambda rel: False) -> int:
    """Download the staged ``path`` (a file or a folder) from its URI: files missing here or of
    another size. A no-op for a path that is not staged. Returns the bytes fetched."""
    uri = uri_of(path)
    if uri is None:
        return 0
    fs, base = _fs(uri)
    path, got = Path(path), 0
    for rel, size in remote_files(uri).items():
        if (small_only and size > SMALL) or skip(rel):
            continue
        local = path / rel if rel else path
        if local.is_file() and local.stat().st_size == size:
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.part-{os.getpid()}-{threading.get_ident()}")
        with fs.open_input_stream(f"{base.rstrip('/')}/{rel}" if rel else base) as src, open(tmp, "wb") as dst:
            while chunk := src.read(8 << 20):
                dst.write(chunk)
                got += len(chunk)
        os.replace(tmp, local)
    return got


def remove(path) -> None:
    """Delete the staged ``path`` (a file or a folder) on its storage too."""
    uri = uri_of(path)
    if uri is None:
        return
    import pyarrow.fs as pafs

    fs, base = _fs(uri)
    kind = fs.get_file_info(base).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(base)
    elif kind == pafs.FileType.File:
        fs.delete_file(base)


def learners_write(rel: str) -> bool:
    return rel.split("/", 1)[0].startswith(WRITTEN_BY_LEARNERS)


class Mirror:
    """The driver's side of a staged run directory: its own files uploaded every ``every_s``
    seconds in a background thread (changed ones only) and once more at ``close``. A failed
    upload is logged and tried again; the training loop never waits for one."""

    def __init__(self, run_dir: Path, every_s: float = 30.0):
        self.run_dir, self.every_s = Path(run_dir), every_s
        self.uri = uri_of(run_dir)
        self.sent: dict[str, tuple[int, int]] = {}  # rel -> (size, mtime_ns) uploaded
        self.errors = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = None
        if self.uri is not None:
            self.thread = threading.Thread(target=self._loop, name="r1ray-storage-mirror", daemon=True)
            self.thread.start()

    def sync(self) -> int:
        """Upload what changed since the last sync; returns the files sent."""
        if self.uri is None:
            return 0
        with self.lock:
            changed = []
            for p in sorted(self.run_dir.rglob("*")):
                rel = p.relative_to(self.run_dir).as_posix()
                if not p.is_file() or learners_write(rel) or ".part-" in p.name:
                    continue
                st = p.stat()
                if self.sent.get(rel) != (st.st_size, st.st_mtime_ns):
                    changed.append((rel, (st.st_size, st.st_mtime_ns)))
            if changed:
                push(self.run_dir, only=[rel for rel, _ in changed])
                self.sent.update(changed)
            return len(changed)

    def _loop(self) -> None:
        while not self.stop.wait(self.every_s):
            try:
                self.sync()
            except OSError as e:
                self.errors += 1
                if self.errors == 1:
                    log.warning("storage: uploading %s to %s failed (%s); trying again every %.0f s",
                                self.run_dir, self.uri, e, self.every_s)

    def close(self) -> None:
        """The last upload, waited for (errors raised)."""
        if self.thread is not None:
            self.stop.set()
            self.thread.join()
            t0 = time.perf_counter()
            n = self.sync()
            log.info("storage: %s uploaded to %s (%d files in the last sync, %.1f s)", self.run_dir, self.uri, n,
                     time.perf_counter() - t0)
