"""Starting or joining Ray, with the environment every actor needs."""
from __future__ import annotations

import json
import logging
import os
import socket
import time

from . import ship

log = logging.getLogger("r1ray.cluster")


# Hugging Face's libraries (hub, transformers, datasets) draw no progress bars
LIBRARY_BAR_SWITCHES = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


def actor_env(on_gpu: bool) -> dict[str, str]:
    # No library bars: an actor's output is never a terminal; Ray relays it line by line.
    env = {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore::FutureWarning", **LIBRARY_BAR_SWITCHES}
    if not on_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed on CPU: gloo collectives, torch AdamW
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "VLLM_CPU_KVCACHE_SPACE", "PYTHONPATH", "R1RAY_HOME",
                "R1RAY_STAGING", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


class ClusterUnreachable(ConnectionError):
    """The Ray address given does not answer; the message names it."""


def _host_port(address: str) -> tuple[str, int] | None:
    """``host:port`` of a GCS (``ray://`` client) address; None for ``auto``/``local``."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def unreachable(host: str, port: int, timeout_s: float, retry: bool = False) -> str | None:
    """None when something listens at ``host:port`` within ``timeout_s``; else why not (the
    socket's error). ``retry``: try again every 0.5 s until the deadline (a server starting)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.5, min(5.0, deadline - time.monotonic()))):
                return None
        except OSError as e:
            why = e.strerror or str(e)
        if not retry or time.monotonic() >= deadline:
            return why
        time.sleep(0.5)


def ray_address_file() -> str:
    """Where ``ray start`` records its head's address on this machine (RAY_TMPDIR, TMPDIR or
    /tmp, then ``ray/ray_current_cluster``): what ``ray.init()`` without an address joins."""
    from ray._common.utils import get_ray_address_file

    return get_ray_address_file(None)


def started_here() -> str | None:
    """The address ``ray start`` recorded on this machine (``ray_address_file``), or None."""
    try:
        with open(ray_address_file()) as f:
            return f.read().strip() or None
    except OSError:
        return None


def check_reachable(address: str, timeout_s: float) -> None:
    """Fail within ``timeout_s`` when nothing listens at ``address`` (Ray itself retries for
    minutes, printing only reconnect warnings)."""
    target = _host_port(address)
    why = target and unreachable(*target, timeout_s, retry=True)
    if why:
        raise ClusterUnreachable(
            f"cannot reach the Ray cluster at {address!r} within {timeout_s:g} s ({why}); "
            "accepted: the address of a running head node (`ray start --head` prints it; set by "
            "RAY_ADDRESS, ray.address or --address), or none to start a local Ray")


def job_runtime_env() -> dict:
    """The runtime env of the Ray job this driver was submitted as (``ray job submit``); {}
    outside a job. Ray puts it in the driver's environment."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    try:
        return (json.loads(raw).get("runtime_env") or {}) if raw else {}
    except (ValueError, AttributeError):
        return {}


def joining_runtime_env(on_gpu: bool, ship_code: bool) -> dict:
    """What ``ray.init`` gets when joining a cluster: the actors' env vars and, when this r1ray
    is a clone, its code as a wheel (cluster/ship.py) that every node installs.

    Inside a job, Ray 2.60 merges this into the job's runtime env key by key (env vars var by
    var) and raises ValueError when both set one: keys the job sets are left to it (the job's
    runtime env already reaches every actor), and code the job ships in ``py_modules`` is
    used as it is. Raises ShipError when the wheel cannot be built.
    """
    job = job_runtime_env()
    job_vars = job.get("env_vars") or {}
    env_vars = {k: v for k, v in actor_env(on_gpu).items() if k not in job_vars}
    env = {"env_vars": env_vars} if env_vars else {}
    if not ship_code:
        return env
    if job.get("py_modules"):
        log.info("r1ray code on the nodes: the job's py_modules %s", job["py_modules"])
        return env
    root = ship.clone_root()
    if root is None:
        log.info("r1ray code on the nodes: their own installed r1ray (this one, %s, is not a clone)", ship.PACKAGE_DIR)
        return env
    try:
        wheel = ship.build_wheel(root)
    except ship.ShipError as e:
        raise ship.ShipError(f"{e}\n(where every node has r1ray installed, set ray.ship_code: false)") from None
    log.info("r1ray code on the nodes: %s, built from %s (ray.ship_code)", wheel.name, root)
    return {**env, **ship.runtime_env(wheel)}


def start(address: str | None, namespace: str, num_cpus: int | None, num_gpus: int | None,
          dashboard: bool, object_store_mb: int, on_gpu: bool, connect_timeout_s: float = 10.0,
          ship_code: bool = True) -> dict:
    """Join ``address`` (or RAY_ADDRESS / a `ray start` cluster) or start a local cluster.

    Resources are only passed when starting one: Ray rejects them when connecting. Joining,
    the clone's code is shipped to every node when ``ship_code`` (a local Ray's workers import
    it where the driver does). Raises ClusterUnreachable, or ShipError before Ray is joined.
    Returns the cluster's total resources.
    """
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    joining = address is not None or "RAY_ADDRESS" in os.environ
    if joining:
        target = address or os.environ["RAY_ADDRESS"]
        check_reachable(target, connect_timeout_s)
        runtime_env = joining_runtime_env(on_gpu, ship_code)
        try:
            ctx = ray.init(address=address, namespace=namespace, runtime_env=runtime_env)
        except ConnectionError as e:
            hint = ("; the cluster uses token authentication (Ray 2.60's default for `ray start`): set "
                    "RAY_AUTH_MODE=token on this machine (the token is read from ~/.ray/auth_token, "
                    "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)") if os.environ.get("RAY_AUTH_MODE") != "token" else ""
            raise ClusterUnreachable(f"cannot connect to the Ray cluster at {target!r}: "
                                     f"{str(e).strip().splitlines()[0][:300]}{hint}") from None
    else:
        local = dict(namespace=namespace, runtime_env={"env_vars": actor_env(on_gpu)}, num_cpus=num_cpus,
                     num_gpus=num_gpus, include_dashboard=dashboard, object_store_memory=max(80, object_store_mb) * 2**20)
        try:  # starts a local cluster, unless one was started here with `ray start` ...
            ctx = ray.init(**local)
        except ValueError:  # ... which refuses resource arguments: join it as it is (it may have other nodes)
            recorded = started_here()
            target = recorded and _host_port(recorded)
            if target and unreachable(*target, min(connect_timeout_s, 5.0)):
                # its head is gone (stopped without `ray stop`, killed, OOM): Ray would retry it
                # for minutes; a cluster of this run's own starts instead
                log.warning("the Ray cluster `ray start` recorded on this machine (%s, in %s) does not answer: "
                            "starting a local one for this run (`ray stop --force` forgets it)", recorded,
                            ray_address_file())
                ctx = ray.init(address="local", **local)
            else:
                ctx = ray.init(address="auto", namespace=namespace, runtime_env=joining_runtime_env(on_gpu, ship_code))
    if getattr(ctx, "dashboard_url", None):
        log.info("Ray dashboard: http://%s", ctx.dashboard_url)
    resources = ray.cluster_resources()
    log.info("Ray cluster: %s", {k: v for k, v in resources.items() if not k.startswith("node:")})
    return resources


def free_namespace(base: str) -> str:
    """``base``, or ``base-2``, ``base-3``, ... when another run's named actors live there (a
    second run on a shared cluster must not collide with the first one's actor names)."""
    import ray

    taken = {a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True)}
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}-{i}"
    return name


def stop() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
