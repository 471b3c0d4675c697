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
        ctx = ray.init(address=address, namespace=namespace, runtime_env=runtime_env)
    else:
        kwargs = dict(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=dashboard,
                      object_store_memory=max(80, object_store_mb) * 2**20)
        try:  # starts a local cluster, unless one was started here with `ray start` ...
            ctx = ray.init(namespace=namespace, runtime_env=runtime_env, **kwargs)
        except ValueError:  # ... which refuses resource arguments: join it as it is
            ctx = ray.init(address="auto", namespace=namespace, runtime_env=runtime_env)
    if getattr(ctx, "dashboard_url", None):
        log.info("Ray dashboard: http://%s", ctx.dashboard_url)
    resources = ray.cluster_resources()
    log.info("Ray cluster: %s", {k: v for k, v in resources.items() if not k.startswith("node:")})
    return resources


def stop() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
