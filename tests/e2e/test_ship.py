"""Code on every node: a clone's r1ray reaches cluster nodes that do not have it installed, as a
code-only wheel in the runtime env (cluster/ship.py), both when `r1ray train --address` joins a
cluster from the clone and in a job submitted with the runtime env `r1ray ship` writes.

The cluster runs in a Python that cannot import r1ray at all: a venv holding everything of this
one's site-packages except r1ray's editable install and metadata.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import venv
import zipfile
from pathlib import Path

import pytest
import yaml

from r1ray.cluster import ship

CLONE = ship.clone_root()
pytestmark = pytest.mark.skipif(CLONE is None, reason="r1ray is not imported from a clone here")


def _copy_clone(dest: Path) -> Path:
    for rel in ship.source_files(CLONE):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes((CLONE / rel).read_bytes())
    return dest


def test_the_wheel_is_code_only_named_by_its_sources_and_rebuilt_only_when_they_change(tmp_path):
    out = tmp_path / "wheels"
    wheel = ship.build_wheel(CLONE, out)
    assert wheel.parent == out and wheel.name.startswith("r1ray-0.1.0+src.") and wheel.name.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = wheel.name.split("-py3")[0] + ".dist-info"
        meta = z.read(f"{info}/METADATA").decode().partition("\n\n")[0]
        entry_points = z.read(f"{info}/entry_points.txt").decode()
    assert {"r1ray/__init__.py", "r1ray/__main__.py", "r1ray/cluster/ship.py", "r1ray/configs/tiny-cpu.yaml",
            f"{info}/RECORD"} <= names
    assert "Requires-Dist" not in meta and "Provides-Extra" not in meta  # pip --target would install torch & co
    assert "r1ray_weight_transfer = r1ray.actors.weight_transfer:register" in entry_points

    # installable exactly as Ray installs it (pip install WHEEL --target=DIR), with no index to fetch from
    target = tmp_path / "target"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--disable-pip-version-check", str(wheel),
                          f"--target={target}"], capture_output=True, text=True, timeout=120)
    assert pip.returncode == 0, pip.stderr[-2000:]
    assert (target / "r1ray" / "controllers" / "cli.py").is_file()

    t0 = time.perf_counter()
    assert ship.build_wheel(CLONE, out) == wheel and time.perf_counter() - t0 < 1.0  # unchanged: not rebuilt
    copy = _copy_clone(tmp_path / "copy")  # no git here: the tree is walked, to the same files
    assert ship.build_wheel(copy, out) == wheel
    (copy / "cluster" / "ship.py").write_text((copy / "cluster" / "ship.py").read_text() + "\n# changed\n")
    changed = ship.build_wheel(copy, out)
    assert changed != wheel and changed.exists() and wheel.exists()


def test_what_cannot_be_shipped_says_why(tmp_path):
    with pytest.raises(ship.ShipError, match="is not an r1ray clone"):
        ship.build_wheel(tmp_path, tmp_path / "wheels")
    copy = _copy_clone(tmp_path / "copy")
    (copy / "pyproject.toml").write_text((copy / "pyproject.toml").read_text().replace("[project]", "[project", 1))
    with pytest.raises(ship.ShipError) as e:
        ship.build_wheel(copy, tmp_path / "wheels")
    assert f"cannot build a wheel of {copy}: `pip wheel` exited with" in str(e.value)
    assert "TOMLDecodeError" in str(e.value) and "/r1ray-ship-" not in str(e.value)  # pip's reason, about the clone
    assert not list((tmp_path / "wheels").glob("*.whl"))


def test_a_clone_that_cannot_be_built_stops_the_run_before_ray_starts(tmp_path, tiny_world):
    copy = _copy_clone(tmp_path / "copy")
    (copy / "pyproject.toml").write_text((copy / "pyproject.toml").read_text().replace("[project]", "[project", 1))
    (tmp_path / "imp").mkdir()
    (tmp_path / "imp" / "r1ray").symlink_to(copy)  # the broken clone is the r1ray that runs
    with socket.socket() as head:  # something answers at the address: the run gets as far as shipping
        head.bind(("127.0.0.1", 0))
        head.listen()
        proc = subprocess.run([sys.executable, "-m", "r1ray", "train", "tiny-cpu", "--output-dir", str(tmp_path / "run"),
                               "--address", f"127.0.0.1:{head.getsockname()[1]}", "--set", f"model.tiny_dir={tiny_world}"],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(tmp_path / "imp"), "R1RAY_WHEEL_DIR": str(tmp_path / "w")})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"r1ray: cannot build a wheel of {copy}: `pip wheel` exited with" in proc.stderr
    assert "TOMLDecodeError" in proc.stderr and "set ray.ship_code: false" in proc.stderr
    assert "Connecting to existing Ray cluster" not in proc.stderr and not (tmp_path / "run").exists()


def test_r1ray_ship_writes_a_runtime_env_file(tmp_path):
    out = tmp_path / "runtime_env.yaml"
    proc = subprocess.run([sys.executable, "-m", "r1ray", "ship", "--out", str(out), "--wheel-dir", str(tmp_path / "w")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    env = yaml.safe_load(out.read_text())
    assert list(env) == ["py_modules"] and len(env["py_modules"]) == 1
    wheel = Path(env["py_modules"][0])
    assert wheel.is_absolute() and wheel.parent == tmp_path / "w" and wheel.exists()
    assert f"ray job submit --runtime-env {out}" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "r1ray", "ship", "--out", str(tmp_path / "no" / "such" / "dir.yaml"),
                          "--wheel-dir", str(tmp_path / "w")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "cannot write the runtime env" in bad.stderr


# ---------------------------------------------------------------- a cluster without r1ray

CLUSTERS = Path(__file__).parent / "clusters"  # ship_cluster.py, ship_probe.py


@pytest.fixture(scope="module")
def python_without_r1ray(tmp_path_factory) -> Path:
    """A venv with this one's packages (symlinked) but no r1ray: the nodes of a cluster where r1ray
    is not installed. Its bin/ has the `python` and `pip` that Ray's jobs and py_modules run."""
    import ray

    env = tmp_path_factory.mktemp("no-r1ray") / "env"
    venv.create(env, with_pip=False, symlinks=True)
    site = next(env.glob("lib/python*/site-packages"))
    for entry in Path(ray.__file__).parent.parent.iterdir():
        if not (entry.name.startswith("__editable__") or entry.name.lower().startswith("r1ray")):
            (site / entry.name).symlink_to(entry)
    pip = env / "bin" / "pip"
    pip.write_text(f'#!/bin/sh\nexec "{env}/bin/python" -m pip "$@"\n')
    pip.chmod(0o755)
    return env / "bin"


def _env(ray_tmpdir: str, **extra) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu", "RAY_TMPDIR": ray_tmpdir, **extra}
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def cluster(python_without_r1ray, tmp_path_factory):
    """A head (with the dashboard, for jobs) and a second node with resource "node2", run by the
    Python without r1ray, with nothing on PYTHONPATH. Ray's temp dir is its own: a Cluster records
    its address there for address-less ray.init and deletes it on shutdown, which must not touch
    another Ray on this machine (and Ray's socket paths live in it: keep it short)."""
    ray_tmpdir = tempfile.mkdtemp(prefix="r1s-", dir="/tmp")
    env = _env(ray_tmpdir, PATH=f"{python_without_r1ray}{os.pathsep}{os.environ['PATH']}", PYTHONPATH="")
    where = tmp_path_factory.mktemp("cluster")
    log = open(where / "cluster.log", "w")  # not a pipe: nobody reads it while the cluster runs
    proc = subprocess.Popen([str(python_without_r1ray / "python"), str(CLUSTERS / "ship_cluster.py")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=where)
    watchdog = threading.Timer(120, proc.kill)  # a cluster that never comes up fails the test, not hangs it
    watchdog.start()
    line = proc.stdout.readline()
    watchdog.cancel()
    try:
        if not line.startswith("CLUSTER "):
            raise AssertionError(f"the cluster did not start: {line}{(where / 'cluster.log').read_text()[-3000:]}")
        yield {**json.loads(line[8:]), "ray_tmpdir": ray_tmpdir}
    finally:
        proc.stdin.close()  # the script shuts its cluster down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(ray_tmpdir, ignore_errors=True)


def _assert_shipped(remote: dict, node2: str, wheel_name: str) -> None:
    assert remote["node"] == node2
    shipped = Path(remote["file"]).parent
    assert "runtime_resources_node2" in shipped.parts and shipped.parent.name == wheel_name.removesuffix(".whl")
    assert remote["version"] == wheel_name.split("-")[1] and not remote["requires"]
    assert remote["entry_point"] == "r1ray_weight_transfer=r1ray.actors.weight_transfer:register"
    assert Path(remote["plugin_from"]) == shipped / "actors" / "weight_transfer.py"
    assert Path(remote["recipe"]) == shipped / "configs" / "tiny-cpu.yaml"  # recipes travel in the wheel


@pytest.mark.timeout(180)
def test_a_driver_joining_from_the_clone_ships_r1ray_to_a_node_without_it(cluster, tmp_path):
    wheels = tmp_path / "wheels"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(CLUSTERS / "ship_probe.py"), cluster["address"]], capture_output=True, text=True,
                          timeout=170, env=_env(cluster["ray_tmpdir"], R1RAY_WHEEL_DIR=str(wheels)), cwd=tmp_path)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = json.loads(line[7:])
    [wheel] = wheels.glob("*.whl")
    assert Path(out["driver_file"]).resolve().parent == CLONE  # the driver runs the clone ...
    _assert_shipped(out["remote"], cluster["node2"], wheel.name)  # ... the node its wheel
    assert out["remote"]["env"]["DS_ACCELERATOR"] == "cpu"
    print(f"driver joined, shipped and probed node 2 in {time.perf_counter() - t0:.1f} s")


@pytest.mark.timeout(240)
def test_a_job_submitted_with_the_shipped_runtime_env_runs_r1ray_on_a_node_without_it(cluster, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    wheel = ship.build_wheel(CLONE, tmp_path / "wheels")
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(CLUSTERS / "ship_probe.py", work / "probe_job.py")  # without an address: the job's cluster
    # the job's own env var, also one r1ray sets for its actors: Ray refuses a ray.init that sets it again
    runtime_env = {**ship.runtime_env(wheel), "working_dir": str(work), "env_vars": {"TOKENIZERS_PARALLELISM": "true"}}
    client = JobSubmissionClient(f"http://{cluster['dashboard']}")
    t0 = time.perf_counter()
    entrypoint = "python -m r1ray check tiny-cpu --skip-data --set grpo.steps=3 && python probe_job.py"
    while True:
        try:
            job = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
            break
        except RuntimeError as e:  # the head's job agent comes up a few seconds after the dashboard
            if "No available agent" not in str(e) or time.perf_counter() - t0 > 60:
                raise
            time.sleep(1)
    status = None
    while time.perf_counter() - t0 < 200:
        status = client.get_job_status(job)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, f"{status}: {logs[-4000:]}"
    assert "ship_code: true" in logs and "steps: 3" in logs  # `python -m r1ray` ran the shipped CLI
    out = json.loads(next(x for x in logs.splitlines() if x.startswith("RESULT "))[7:])
    assert "runtime_resources" in Path(out["driver_file"]).parts  # the job's driver imports the shipped r1ray ...
    _assert_shipped(out["remote"], cluster["node2"], wheel.name)  # ... so do its tasks on node 2
    assert out["remote"]["env"] == {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "true"}  # both envs merged
    print(f"job submitted and succeeded in {time.perf_counter() - t0:.1f} s")
