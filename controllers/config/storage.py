"""Where run directories live (``storage.path``), and never where Ray deletes them.

A relative ``output_dir`` (``--output-dir``, ``--resume``, ``r1ray eval``'s reports, the
stages of ``r1ray run``) is resolved against the storage root:

- ``storage.path`` when set: a local folder or a volume every node mounts at the same path
  (KubeRay's shared volume);
- else, from a shell, the current directory (``runs/tiny-cpu`` as always);
- else, inside a Ray job (``ray job submit``), ``~/r1ray_runs``: the job's current directory is
  Ray's temporary copy of ``--working-dir``, deleted with Ray's session.

A run directory inside a runtime-env folder or Ray's temporary folder (``/tmp/ray``,
``RAY_TMPDIR``) is refused before anything starts, naming the path and the fix.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .schema import ConfigError

JOB_STORAGE = "~/r1ray_runs"  # the storage root of a run started from a Ray job without storage.path
URI_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "abfss://", "az://", "hdfs://", "file://")


def ray_job_id() -> str | None:
    """The submission id of the Ray job this process runs as (``ray job submit``), "" for a job
    without one; None outside a job. Ray's job supervisor sets the job's config in the
    entrypoint's environment."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if raw is None:
        return None
    try:
        return str((json.loads(raw).get("metadata") or {}).get("job_submission_id") or "")
    except (ValueError, AttributeError):
        return ""


def storage_root(path: str | None) -> Path:
    """The folder relative run directories go under (see the module's docstring)."""
    if path:
        return Path(os.path.abspath(Path(path).expanduser()))
    if ray_job_id() is not None:
        return Path(JOB_STORAGE).expanduser()
    return Path.cwd()


def ray_temp_roots() -> list[Path]:
    """Folders Ray keeps its sessions in (and deletes with them)."""
    roots = {Path(tempfile.gettempdir()) / "ray", Path("/tmp/ray")}
    if os.environ.get("RAY_TMPDIR"):
        roots.add(Path(os.environ["RAY_TMPDIR"]) / "ray")
    return [Path(os.path.realpath(r)) for r in roots]


def deleted_by_ray(path: Path) -> str | None:
    """Why Ray would delete ``path`` (an absolute path), or None."""
    real = Path(os.path.realpath(path))
    if "runtime_resources" in real.parts or any(p.startswith("_ray_pkg_") for p in real.parts):
        return ("is inside a Ray runtime-env folder (a job's copy of its --working-dir), which Ray deletes with "
                "its session")
    for root in ray_temp_roots():
        if real == root or root in real.parents:
            return f"is inside Ray's temporary folder {str(root)!r}, which Ray deletes with its sessions"
    return None


def check_storage_path(path: str | None) -> None:
    """``storage.path``: a folder Ray does not delete (object-storage URIs are not read yet)."""
    if path is None:
        return
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(f"config key 'storage.path': got {path!r}; accepted: a folder path, or null")
    if path.startswith(URI_SCHEMES) or "://" in path:
        raise ConfigError(f"config key 'storage.path': got {path!r}; accepted: a local folder or a volume every "
                          "node mounts at the same path (object-storage URIs such as s3:// are not supported yet: "
                          "mount the bucket, e.g. with mountpoint-s3 or gcsfuse, and give its mount point)")
    root = storage_root(path)
    why = deleted_by_ray(root)
    if why:
        raise ConfigError(f"config key 'storage.path': {str(root)!r} {why}; accepted: a persistent folder, e.g. "
                          f"{JOB_STORAGE} or a shared volume")


def resolve_run_path(path: str, storage: str | None, key: str = "output_dir") -> str:
    """``path`` (``~`` expanded) as an absolute path: a relative one under the storage root.
    Refused when Ray would delete it."""
    p = Path(path).expanduser()
    if "://" in str(path):
        raise ConfigError(f"config key '{key}': got {path!r}; accepted: a folder path (relative ones go under "
                          "storage.path)")
    if not p.is_absolute():
        p = storage_root(storage) / p
    p = Path(os.path.abspath(p))
    why = deleted_by_ray(p)
    if why:
        raise ConfigError(f"config key '{key}': {str(p)!r} {why}; accepted: a persistent folder: an absolute {key}, "
                          f"or storage.path=/path/to/runs for relative ones (inside a Ray job they go under "
                          f"{JOB_STORAGE} when storage.path is not set)")
    return str(p)
