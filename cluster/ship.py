"""Shipping a clone's code to the nodes of a Ray cluster that do not have r1ray installed.

The repository root is the package (pyproject's ``package-dir`` maps it onto ``r1ray``), so
``--working-dir .`` would reach the workers under the clone's directory name. A wheel carries
it under the right name, with the distribution metadata through which vLLM's own processes
find our weight-transfer engines (entry-point group ``vllm.general_plugins``).

Two facts of Ray 2.60's ``py_modules`` shape the wheel (``ray/_private/runtime_env``):
- each node installs it with ``pip install WHEEL --target=DIR``, which would also install every
  dependency it declares (torch, vLLM, Ray itself, ...) into DIR, ahead of the node's own: the
  shipped wheel declares none; the nodes' environment provides them, as it provides Ray;
- an uploaded wheel is known by its file name alone, so a changed clone under the same name
  would silently run the old upload: the version carries the sources' hash
  (``0.1.0+src.<hash>``), which is also the cache key here, so an unchanged clone is not rebuilt.
"""
from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import io
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

log = logging.getLogger("r1ray.cluster")

PACKAGE_DIR = Path(__file__).resolve().parent.parent
DEFAULT_WHEEL_DIR = "~/.cache/r1ray/wheels"  # R1RAY_WHEEL_DIR overrides it
FORMAT = "r1ray-ship-1"  # part of the hash: bump when the wheel's rewriting below changes
HASH_CHARS = 12
KEEP_WHEELS = 8  # older wheels in the cache are removed
# A clone that is not a git checkout: what is not code (git's .gitignore does this otherwise).
SKIP_DIRS = {".git", ".venv", "venv", "build", "dist", "runs", "__pycache__", ".pytest_cache", ".r1ray"}


class ShipError(RuntimeError):
    """The clone's code cannot be shipped; the message says why and what to do."""


def wheel_dir() -> Path:
    return Path(os.environ.get("R1RAY_WHEEL_DIR") or DEFAULT_WHEEL_DIR).expanduser()


def clone_root(package_dir: Path = PACKAGE_DIR) -> Path | None:
    """The source tree r1ray was imported from, when it is a clone (its pyproject.toml names
    the project r1ray); None for an installed package (a wheel, or code shipped by Ray)."""
    pyproject = package_dir / "pyproject.toml"
    try:
        text = pyproject.read_text()
    except OSError:
        return None
    return package_dir if re.search(r'^name\s*=\s*"r1ray"\s*$', text, re.M) else None


def source_files(root: Path) -> list[str]:
    """The clone's files, relative: what git tracks plus untracked files it does not ignore
    (uncommitted edits ship too); outside git, every file but SKIP_DIRS and venvs. Hidden files
    and folders (.git*, .ci, ...) are never code."""
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, timeout=30)
        if out.returncode == 0:
            files = {f for f in out.stdout.decode().split("\0") if f and not _hidden(f)}
            return sorted(f for f in files if (root / f).is_file())  # a deleted tracked file is gone
    except (OSError, subprocess.TimeoutExpired):
        pass  # no git here: walk the tree
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")
                       and not d.endswith(".egg-info") and not (here / d / "pyvenv.cfg").exists()]
        files += [(here / f).relative_to(root).as_posix() for f in filenames
                  if not f.startswith(".") and not f.endswith((".pyc", ".whl"))]
    return sorted(files)


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def source_hash(root: Path, files: list[str]) -> str:
    h = hashlib.sha256(FORMAT.encode())
    for rel in files:
        h.update(b"\0" + rel.encode() + b"\0")
        h.update((root / rel).read_bytes())
    return h.hexdigest()


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def build_wheel(root: Path | None = None, out_dir: Path | None = None, timeout_s: float = 300.0) -> Path:
    """A code-only wheel of the clone at ``root`` (default: the one this r1ray was imported
    from) in ``out_dir`` (default ``wheel_dir()``), built offline with the setuptools already
    installed; reused as it is while the sources are unchanged. Raises ShipError saying why."""
    root = Path(root).resolve() if root is not None else clone_root()
    if root is None:
        raise ShipError(f"r1ray here ({PACKAGE_DIR}) is an installed package, not a clone: there are no sources to "
                        "build a wheel from; accepted: run from a clone (`pip install -e .` in it), or nodes that have "
                        "r1ray installed (ray.ship_code: false)")
    if clone_root(root) is None:
        raise ShipError(f"{root} is not an r1ray clone: it has no pyproject.toml naming the project r1ray")
    out_dir = Path(out_dir).expanduser() if out_dir is not None else wheel_dir()
    files = source_files(root)
    label = source_hash(root, files)[:HASH_CHARS]
    cached = sorted(out_dir.glob(f"r1ray-*+src.{label}-*.whl"))
    if cached:
        os.utime(cached[0])  # most recently used: kept by the pruning below
        log.info("wheel of %s: %s (sources unchanged, not rebuilt)", root, cached[0])
        return cached[0]
    for module in ("pip", "setuptools"):
        # not importlib.util.find_spec: for "pip", setuptools' distutils shim then switches itself
        # off in this process, and a later setuptools import (DeepSpeed's op builder) fails
        if not _installed(module):
            raise ShipError(f"cannot build a wheel of {root}: {module} is not installed in {sys.executable}; "
                            f"accepted: `{sys.executable} -m pip install 'setuptools>=68'` (or `-m ensurepip` for pip)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ShipError(f"cannot build a wheel of {root}: the wheel directory {out_dir} cannot be created ({e}); "
                        "accepted: a writable directory in R1RAY_WHEEL_DIR") from None
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="r1ray-ship-") as tmp:
        src, built = Path(tmp) / "src", Path(tmp) / "wheel"
        for rel in files:  # a copy: nothing is written into the clone, no stale build/ leaks in
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, src / rel)
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
               "--disable-pip-version-check", "-q", "-w", str(built), str(src)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise ShipError(f"cannot build a wheel of {root}: `pip wheel` did not finish within {timeout_s:g} s") from None
        wheels = sorted(built.glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            why = _last_lines(proc.stderr or proc.stdout).replace(str(src), str(root))  # name the clone, not the copy
            raise ShipError(f"cannot build a wheel of {root}: `pip wheel` exited with {proc.returncode}:\n{why}")
        wheel = code_only(wheels[0], out_dir, label)
    _prune(out_dir)
    log.info("built %s from %s in %.1f s", wheel.name, root, time.perf_counter() - t0)
    return wheel


def _last_lines(text: str, n: int = 8) -> str:
    """The end of a tool's output, without traceback frames (a frame line and its source line)."""
    lines, frame = [], False
    for line in text.strip().splitlines():
        stripped = line.strip()
        if stripped.startswith('File "'):
            frame = True
        elif frame or not stripped or set(stripped) <= set("^~"):
            frame = False
        else:
            lines.append(line)
    return "\n".join("  " + x.strip() for x in lines[-n:]) or "  (no output)"


def code_only(wheel: Path, out_dir: Path, label: str) -> Path:
    """Rewrite ``wheel`` into ``out_dir``: version ``+src.<label>``, no declared requirements
    or extras, dist-info and RECORD renamed and rehashed to match."""
    with zipfile.ZipFile(wheel) as zin:
        info_dir = next(n.split("/")[0] for n in zin.namelist()
                        if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        head, sep, body = zin.read(f"{info_dir}/METADATA").decode().partition("\n\n")
        name = re.search(r"^Name: *(.+)$", head, re.M).group(1).strip()
        version = re.search(r"^Version: *(.+)$", head, re.M).group(1).strip()
        version += f"{'.' if '+' in version else '+'}src.{label}"
        head = "\n".join(f"Version: {version}" if line.startswith("Version:") else line for line in head.splitlines()
                         if not line.startswith(("Requires-Dist:", "Provides-Extra:")))
        dist = re.sub(r"[-_.]+", "_", name).lower()
        new_info = f"{dist}-{version}.dist-info"
        tags = "-".join(wheel.stem.split("-")[-3:])
        target = out_dir / f"{dist}-{version}-{tags}.whl"
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        record = io.StringIO()
        rows = csv.writer(record, lineterminator="\n")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
            for item in zin.infolist():
                if item.filename == f"{info_dir}/RECORD":
                    continue
                data, path = zin.read(item), item.filename
                if path.startswith(info_dir + "/"):
                    path = new_info + path[len(info_dir):]
                    if path == f"{new_info}/METADATA":
                        data = (head + sep + body).encode()
                out = zipfile.ZipInfo(path, date_time=item.date_time)
                out.external_attr, out.compress_type = item.external_attr, zipfile.ZIP_DEFLATED
                zout.writestr(out, data)
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                rows.writerow([path, f"sha256={digest}", len(data)])
            rows.writerow([f"{new_info}/RECORD", "", ""])
            zout.writestr(zipfile.ZipInfo(f"{new_info}/RECORD", date_time=(1980, 1, 1, 0, 0, 0)), record.getvalue())
    os.replace(tmp, target)  # atomic: a concurrent build of the same sources writes the same wheel
    return target


def _prune(out_dir: Path) -> None:
    wheels = sorted(out_dir.glob("r1ray-*+src.*.whl"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in wheels[KEEP_WHEELS:]:
        old.unlink(missing_ok=True)


def runtime_env(wheel: Path) -> dict:
    """The runtime env that installs ``wheel`` on every node its job's workers start on."""
    return {"py_modules": [str(Path(wheel).resolve())]}


def write_runtime_env(env: dict, path: Path, note: str = "") -> None:
    import yaml

    text = "".join(f"# {line}\n" for line in note.splitlines()) + yaml.safe_dump(env, sort_keys=False)
    Path(path).write_text(text)
