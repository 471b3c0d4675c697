"""The e2e tier: the CLI, Ray, spawned engines and DeepSpeed worlds on the tiny model. Every
test here is marked ``e2e`` (``pytest -m "not e2e"`` leaves them out)."""
import subprocess
import sys
from pathlib import Path

import pytest
import r1ray_cli


@pytest.fixture(scope="session", autouse=True)
def ray_auth_token():
    """Clusters started with ``ray start`` under ``RAY_AUTH_MODE=token`` need a token on this
    machine (``~/.ray/auth_token``); a fresh machine has none until something makes one, so the
    tier makes it first (``--generate`` keeps an existing one)."""
    ray = Path(sys.executable).with_name("ray")
    subprocess.run([str(ray), "get-auth-token", "--generate"], check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def warmed(tmp_path_factory, tiny_world):
    """The tiny recipe's full-weight warm-up as a stage of its own (``r1ray sft``, 200 steps, as
    tiny-staged's), once per session: its run directory (the model: ``checkpoint-sft``)."""
    sft = tmp_path_factory.mktemp("warmed") / "sft"
    proc = r1ray_cli.run("sft", "configs/tiny-cpu.yaml", "--output-dir", sft, "--set", f"model.tiny_dir={tiny_world}",
                         *r1ray_cli.QUIET, "--set", "sft.steps=200", "--set", "sft.eval_every=0", timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return sft


@pytest.fixture
def r1ray():
    """``r1ray(*args, timeout=600, extra_env=None)``: the CLI in a process of its own, waited
    for; returns the CompletedProcess (see tests/r1ray_cli.py)."""
    return r1ray_cli.run


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head started with ``ray start`` on a free port (token auth on, Ray 2.60's default),
    as on a shared cluster: runs join it with ``RAY_ADDRESS``, and the test reaches their actors
    by name (clusters/on_cluster.py). Its address; stopped after the module."""
    from r1ray.cluster.groups import free_port

    ray = Path(sys.executable).with_name("ray")
    port = free_port()
    env = r1ray_cli.env(RAY_AUTH_MODE="token")
    subprocess.run([str(ray), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, capture_output=True, env=env, timeout=120)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(ray), "stop", "--force"], capture_output=True, timeout=120)
