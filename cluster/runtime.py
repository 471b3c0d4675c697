"""Starting or joining Ray, with the environment every actor needs."""
from __future__ import annotations

import logging
import os

log = logging.getLogger("r1ray.cluster")


def actor_env(on_gpu: bool) -> dict[str, str]:
    env = {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore::FutureWarning"}
    if not on_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed on CPU: gloo collectives, torch AdamW
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "VLLM_CPU_KVCACHE_SPACE", "PYTHONPATH", "R1RAY_HOME"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def start(address: str | None, namespace: str, num_cpus: int | None, num_gpus: int | None,
          dashboard: bool, object_store_mb: int, on_gpu: bool) -> dict:
    """Join ``address`` (or RAY_ADDRESS / a `ray start` cluster) or start a local cluster.

    Resources are only passed when starting one: Ray rejects them when connecting.
    Returns the cluster's total resources.
    """
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    runtime_env = {"env_vars": actor_env(on_gpu)}
    joining = address is not None or "RAY_ADDRESS" in os.environ
    if joining:
        ray.init(address=address, namespace=namespace, runtime_env=runtime_env, log_to_driver=True)
    else:
        kwargs = dict(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=dashboard,
                      object_store_memory=max(80, object_store_mb) * 2**20)
        try:
            ray.init(address=None, namespace=namespace, runtime_env=runtime_env, **kwargs)
        except ConnectionError:
            ray.init(address="local", namespace=namespace, runtime_env=runtime_env, **kwargs)
    ctx = ray.get_runtime_context()
    url = getattr(ray, "_private", None) and ray.get_runtime_context().gcs_address
    dash = getattr(ctx, "dashboard_url", None) or _dashboard_url()
    if dash:
        log.info("Ray dashboard: http://%s", dash)
    log.info("Ray cluster %s: %s", url, ray.cluster_resources())
    return ray.cluster_resources()


def _dashboard_url() -> str | None:
    try:
        import ray

        return ray.worker.get_dashboard_url()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - the dashboard is optional
        return None


def stop() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
