"""Where runs live, through Ray as users run it (controllers/config/storage.py,
actors/storage.py): the README's ``ray job submit`` flow leaves the run in persistent storage,
not in the job's temporary copy of its working directory; a retried job resumes it there; a run
directory that a learner's node does not see is refused; a run on object storage checkpoints
from a node with a disk of its own and resumes on another."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import r1ray_cli
import yaml

from r1ray.cluster import ship
from r1ray.cluster.groups import free_port

CLONE = ship.clone_root()
RAY = str(Path(sys.executable).with_name("ray"))
SHORT = ["--set", "ray.dashboard=false", "--set", "sft.steps=0", "--set", "sft.stop_at_pass_rate=null",
         "--set", "eval.num_prompts=8", "--set", "grpo.prompts_per_step=4", "--set", "grpo.num_generations=4",
         "--set", "sampling.max_new_tokens=16", "--set", "learner.micro_batch_size=4", "--set", "eval.tasks=[]",
         "--set", "checkpoint.every_steps=1"]


def _env(**extra):
    """`ray start` clusters use token auth; a job's `python` is this venv's."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return r1ray_cli.env(RAY_AUTH_MODE="token", PATH=path, **extra)


@pytest.fixture(scope="module")
def ray_head_with_jobs():
    """A `ray start` head with its dashboard (the job server): (GCS address, dashboard URL)."""
    port, dash = free_port(), free_port()
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
                    f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"], check=True, capture_output=True,
                   env=_env(), timeout=180)
    try:
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


def _submit(dashboard: str, runtime_env: Path, submission_id: str, *args: str) -> tuple[str, str]:
    """``ray job submit`` from the clone, as the README writes it; (`ray job status`, lowercase; logs)."""
    cmd = [RAY, "job", "submit", "--address", dashboard, "--runtime-env", str(runtime_env), "--working-dir", ".",
           "--submission-id", submission_id, "--", "python", "-m", "r1ray", *args]
    for _ in range(30):  # a fresh head's job agent may not have registered yet: Ray asks to try again
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=CLONE, timeout=600)
        if "No available agent to submit job" not in proc.stderr:
            break
        time.sleep(2)
    status = subprocess.run([RAY, "job", "status", "--address", dashboard, submission_id], capture_output=True,
                            text=True, env=_env(), timeout=60)
    logs = subprocess.run([RAY, "job", "logs", "--address", dashboard, submission_id], capture_output=True, text=True,
                          env=_env(), timeout=60)
    return (status.stdout + status.stderr).lower(), logs.stdout + proc.stderr[-3000:]


@pytest.mark.skipif(CLONE is None, reason="the README's flow ships r1ray from a clone")
@pytest.mark.timeout(900)
def test_a_submitted_job_leaves_its_run_in_persistent_storage_and_a_retry_resumes_it(tmp_path, tiny_world,
                                                                                     ray_head_with_jobs):
    _, dashboard = ray_head_with_jobs
    home = tmp_path / "home"  # the job's ~ (so that ~/r1ray_runs is this test's)
    home.mkdir()
    shipped = r1ray_cli.run("ship", "--out", str(tmp_path / "runtime_env.yaml"), extra_env={"RAY_AUTH_MODE": "token"})
    assert shipped.returncode == 0, shipped.stderr[-3000:]
    runtime_env = yaml.safe_load((tmp_path / "runtime_env.yaml").read_text())
    token = os.environ.get("RAY_AUTH_TOKEN_PATH", str(Path.home() / ".ray" / "auth_token"))
    runtime_env["env_vars"] = {"HOME": str(home), "RAY_AUTH_TOKEN_PATH": token, "DS_ACCELERATOR": "cpu"}
    (tmp_path / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))
    train = ["train", "configs/tiny-cpu.yaml", "--output-dir", "runs/job-1", "--set", f"model.tiny_dir={tiny_world}",
             *SHORT]

    status, logs = _submit(dashboard, tmp_path / "runtime_env.yaml", "grpo-1", *train, "--set", "grpo.steps=2")
    assert "succeeded" in status, f"{status}\n{logs[-5000:]}"
    run = home / "r1ray_runs" / "runs" / "job-1"
    assert logs.count(f"run directory: {run}") >= 2, logs[-5000:]  # at the start and at the end
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["run_dir"] == str(run)
    assert (run / "checkpoint-final" / "config.json").is_file()
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (run / "checkpoints" / "step-000002" / "driver.json").is_file()
    copies = list(Path("/tmp/ray").glob("session_*/runtime_resources/working_dir_files/*/runs"))
    assert not copies, copies  # nothing in the job's temporary copy of the clone

    # the same command line, retried with --resume auto (a RayJob's backoffLimit): it finds the run
    status, logs = _submit(dashboard, tmp_path / "runtime_env.yaml", "grpo-1-retry", *train, "--resume", "auto",
                           "--set", "grpo.steps=3")
    assert "succeeded" in status, f"{status}\n{logs[-5000:]}"
    assert f"resuming {run} at GRPO step 2" in logs, logs[-5000:]
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert not (home / "r1ray_runs" / "runs" / "job-1-1").exists()

    # a run directory in the job's working-directory copy is refused before anything starts
    status, logs = _submit(dashboard, tmp_path / "runtime_env.yaml", "grpo-2", *train, "--set", "storage.path=.")
    assert "failed" in status, status
    assert "config key 'storage.path'" in logs and "is inside a Ray runtime-env folder" in logs, logs[-3000:]
    assert "Traceback" not in logs.split("config key 'storage.path'")[0][-2000:]


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs `unshare --mount` to give a node a disk of its own")
@pytest.mark.timeout(600)
def test_a_run_directory_that_a_learners_node_does_not_see_is_refused(tmp_path, tiny_world):
    """Two Ray nodes on this machine; the second sees its own empty folder where the driver's
    node has the runs folder (a private tmpfs mounted over it: a disk of its own). Every actor
    goes to the second node; its learner ranks do not see the run directory, so the run is
    refused naming them, before any step, and says how it ended."""
    runs = tmp_path / "runs"
    runs.mkdir()
    port = free_port()
    try:
        subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false",
                        "--disable-usage-stats"], check=True, capture_output=True, env=_env(), timeout=180)
        node2 = (f"mount -t tmpfs r1ray-node2 {runs} && exec {RAY} start --address=127.0.0.1:{port} --num-cpus=2 "
                 "--disable-usage-stats")
        subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", node2], check=True,
                       capture_output=True, env=_env(), timeout=180)
        proc = r1ray_cli.run("train", "configs/tiny-cpu.yaml", "--output-dir", str(runs / "run"), "--set",
                             f"model.tiny_dir={tiny_world}", *SHORT, "--set", "grpo.steps=2",
                             "--set", "ray.ship_code=false",  # this machine's r1ray serves both nodes
                             extra_env={"RAY_AUTH_MODE": "token", "RAY_ADDRESS": f"127.0.0.1:{port}"}, timeout=400)
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "config key 'storage.path'" in proc.stderr and "learner-rank-0 on" in proc.stderr, proc.stderr[-3000:]
    assert "learner-rank-1 on" in proc.stderr and "a volume every node mounts at the same path" in proc.stderr
    summary = json.loads((runs / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "not shared with learner-rank-0" in summary["error"]
    assert (runs / "run" / "metrics.jsonl").read_text() == ""  # refused before the first step


def _two_nodes(port: int, private: Path, env: dict) -> None:
    """A head with no CPUs (every actor goes to the second node) and a second node that sees an
    empty disk of its own at ``private`` (a private tmpfs mounted over it)."""
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, capture_output=True, env=env, timeout=180)
    node2 = (f"mount -t tmpfs r1ray-node2 {private} && exec {RAY} start --address=127.0.0.1:{port} --num-cpus=2 "
             "--disable-usage-stats")
    subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", node2], check=True,
                   capture_output=True, env=env, timeout=180)


@pytest.mark.skipif(not _unshare_works(), reason="needs `unshare --mount` to give a node a disk of its own")
@pytest.mark.timeout(900)
def test_a_run_on_object_storage_checkpoints_from_one_node_and_resumes_on_another(tmp_path, tiny_world):
    """``storage.path: file://...`` (pyarrow.fs, as s3:// would be). Every actor runs on a node
    whose staging folder is a disk of its own, which goes away with the node: what the run
    leaves is what reached the storage. A new cluster (a new second node with an empty disk)
    and a driver with nothing staged resume it from the URI alone."""
    bucket, staging = tmp_path / "bucket", tmp_path / "staging"
    bucket.mkdir()
    staging.mkdir()
    uri = f"file://{bucket}"
    env = _env(R1RAY_STAGING=str(staging))
    run_uri = f"{uri}/runs/job-1"
    common = ["--set", f"model.tiny_dir={tiny_world}", *SHORT, "--set", "ray.ship_code=false"]
    procs = []
    for steps, how in ((2, ["--output-dir", "runs/job-1", "--set", f"storage.path={uri}"]),
                       (3, ["--resume", run_uri])):
        port = free_port()
        try:
            _two_nodes(port, staging, env)
            args = ["train", *(["configs/tiny-cpu.yaml"] if steps == 2 else []), *how, *common,
                    "--set", f"grpo.steps={steps}"]
            procs.append(r1ray_cli.run(*args, extra_env={"RAY_AUTH_MODE": "token", "RAY_ADDRESS": f"127.0.0.1:{port}",
                                                         "R1RAY_STAGING": str(staging)}, timeout=500))
        finally:
            subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)
        assert procs[-1].returncode == 0, procs[-1].stderr[-4000:]
        assert f"run directory: {run_uri} (staged in" in procs[-1].stdout, procs[-1].stdout[-2000:]
        shutil.rmtree(staging)  # the driver's machine forgets it too: the storage is all there is
        staging.mkdir()
        remote = bucket / "runs" / "job-1"
        summary = json.loads((remote / "summary.json").read_text())
        assert summary["status"] == "completed"
        assert [json.loads(x)["step"] for x in (remote / "metrics.jsonl").read_text().splitlines()] == \
            list(range(1, steps + 1))
        ckpt = remote / "checkpoints" / f"step-{steps:06d}"
        state = json.loads((ckpt / "driver.json").read_text())
        assert state["step"] == steps and state["files"]  # complete: the driver state came last
        for name, record in state["files"].items():  # every rank's shard reached the storage whole
            assert (ckpt / name).stat().st_size == record["size"], name
        assert {p.name for p in (remote / "checkpoints").iterdir()} == {f"step-{steps - 1:06d}", f"step-{steps:06d}"}
        assert (remote / "checkpoint-final" / "config.json").is_file()
        assert any((remote / "checkpoint-final").glob("*.safetensors"))
    assert "resuming" in procs[1].stderr and "at GRPO step 2" in procs[1].stderr, procs[1].stderr[-3000:]
