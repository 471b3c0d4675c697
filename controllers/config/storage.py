"""Where run directories live (``storage.path``), and never where Ray deletes them.

A relative ``output_dir`` (``--output-dir``, ``--resume``, ``r1ray eval``'s reports, the
stages of ``r1ray run``) is resolved against the storage root:

- ``storage.path`` when set: a local folder or a volume every node mounts at the same path
  (KubeRay's shared volume);
- else, from a shell, the current directory (``runs/tiny-cpu`` as always);
- else, inside a Ray job (``ray job submit``), ``~/r1ray_runs``: the job's current directory is
  Ray's temporary copy of ``--working-dir``, deleted with Ray's session.

``storage.path`` (or an output directory) may also be an object-storage URI (``s3://``,
``gs://``, ``abfs://``, ``hdfs://``, ``file://``): the run then works in a local staging copy
at the same path on every node and is uploaded (``actors/storage.py``); the path returned here
is that staging copy, with the run's small files (logs, summaries, configs, driver states)
already downloaded when the run exists. A storage that cannot be written is refused up front.

A run directory inside a runtime-env folder or Ray's temporary folder (``/tmp/ray``,
``RAY_TMPDIR``) is refused before anything starts, naming the path and the fix.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ...actors import storage as store
from .schema import ConfigError

JOB_STORAGE = "~/r1ray_runs"  # the storage root of a run started from a Ray job without storage.path


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


def check_bare(uri: str, key: str) -> None:
    """Settings after '?' in a URI are refused: the ranks on other nodes upload through the bare URI."""
    if "?" in uri:
        raise ConfigError(f"config key '{key}': got {uri!r}; accepted: a URI without settings after '?' (the "
                          "learner ranks on other nodes upload through the bare URI): give them as each node's "
                          "environment, e.g. AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID")


def check_reachable(uri: str, key: str) -> None:
    """A URI that cannot be written (unknown scheme, no credentials, server down) is refused."""
    check_bare(uri, key)
    try:
        store.check_reachable(uri)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ConfigError(f"config key '{key}': cannot write to {uri!r} ({type(e).__name__}: {str(e)[:300]}); "
                          "accepted: a folder, or an object-storage URI (s3://, gs://, abfs://, hdfs://, file://) "
                          "this machine can write: check the bucket, the endpoint and the credentials") from None


def check_storage_path(path: str | None) -> None:
    """``storage.path``: a folder Ray does not delete, or a URI that can be written."""
    if path is None:
        return
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(f"config key 'storage.path': got {path!r}; accepted: a folder path or a URI, or null")
    if store.is_uri(path):
        check_reachable(path, "storage.path")
        return
    root = storage_root(path)
    why = deleted_by_ray(root)
    if why:
        raise ConfigError(f"config key 'storage.path': {str(root)!r} {why}; accepted: a persistent folder, e.g. "
                          f"{JOB_STORAGE} or a shared volume")


def resolve_run_path(path: str, storage: str | None, key: str = "output_dir", write: bool = True) -> str:
    """``path`` (``~`` expanded) as an absolute path: a relative one under the storage root; a
    URI (or a relative path under a URI storage) as its staging copy, the run's small files
    downloaded. Refused when Ray would delete it."""
    p = Path(path).expanduser()
    uri = path if store.is_uri(path) else (f"{storage.rstrip('/')}/{p.as_posix()}"
                                           if storage and store.is_uri(storage) and not p.is_absolute() else None)
    if uri is not None:
        check_bare(uri, key)
        if store.is_uri(path) and write:
            check_reachable(uri.rsplit("/", 1)[0], key)
        staged = store.local_path(uri)
        why = deleted_by_ray(staged)
        if why:
            raise ConfigError(f"config key '{key}': its staging copy {str(staged)!r} {why}; accepted: "
                              f"{store.STAGING_ENV} set to a persistent folder")
        try:
            store.pull(staged, small_only=True)
        except OSError as e:
            raise ConfigError(f"config key '{key}': cannot read {uri!r} ({e}); accepted: a URI this machine can "
                              "read") from None
        return str(staged)
    if not p.is_absolute():
        p = storage_root(storage) / p
    p = Path(os.path.abspath(p))
    why = deleted_by_ray(p)
    if why:
        raise ConfigError(f"config key '{key}': {str(p)!r} {why}; accepted: a persistent folder: an absolute {key}, "
                          f"or storage.path=/path/to/runs for relative ones (inside a Ray job they go under "
                          f"{JOB_STORAGE} when storage.path is not set)")
    return str(p)
