"""What the cluster scripts share: a run of ``r1ray train`` joined to a simulated cluster
(``ray.cluster_utils.Cluster``) as a user's driver would be, waits on it, and the run's control
actor. The scripts own the cluster and the faults; the tests read the one ``RESULT`` line they
print."""
import json
import os
import subprocess
import sys
import time

import ray

R1RAY = [sys.executable, "-m", "r1ray.controllers.cli"]


class Run:
    """``r1ray train`` of the tiny recipe, small, joined to ``cluster``; its log is ``<out>.log``."""

    def __init__(self, cluster, out: str, tiny: str, steps: int, *extra: str):
        self.cluster, self.out = cluster, out
        cmd = [*R1RAY, "train", "configs/tiny-cpu.yaml", "--output-dir", out,
               "--address", cluster.address, "--set", f"model.tiny_dir={tiny}", "--set", f"grpo.steps={steps}",
               "--set", "ray.dashboard=false", "--set", "sft.steps=0", "--set", "sft.stop_at_pass_rate=null",
               "--set", "eval.num_prompts=0", "--set", "grpo.prompts_per_step=4", "--set", "grpo.num_generations=4",
               "--set", "sampling.max_new_tokens=16", "--set", "learner.micro_batch_size=4",
               "--set", "ray.heartbeat_s=1", "--set", "ray.liveness_timeout_s=10",
               # the venv's r1ray is importable on every simulated node (and nodes on one machine share
               # Ray's runtime-env folder, which breaks a shipped wheel: test_ship.py)
               "--set", "ray.ship_code=false", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(out + ".log", "w"), text=True)

    def log(self) -> str:
        return open(self.out + ".log").read()

    def steps_done(self) -> int:
        path = self.out + "/metrics.jsonl"
        return len(open(path).read().splitlines()) if os.path.exists(path) else 0

    def wait_for(self, what: str, check, timeout: float = 300) -> None:
        t0 = time.monotonic()
        while not check():
            if self.proc.poll() is not None:
                raise SystemExit(f"the run ended ({self.proc.returncode}) before {what}: " + self.log()[-3000:])
            if time.monotonic() - t0 > timeout:
                raise SystemExit(f"timed out waiting for {what}: " + self.log()[-3000:])
            time.sleep(0.2)

    def scale(self, n: int) -> None:
        """``r1ray scale --generators n``, as a user resizes a running run."""
        subprocess.run([*R1RAY, "scale", "--generators", str(n), "--address", self.cluster.address], check=True,
                       capture_output=True, timeout=60)

    def finish(self, **result) -> None:
        """Wait for the run, print the RESULT line, stop Ray and the cluster."""
        self.proc.wait(timeout=600)
        print("RESULT " + json.dumps({"rc": self.proc.returncode, **result}))
        ray.shutdown()
        self.cluster.shutdown()


def control_status() -> dict:
    """What the run's control actor reports of the generator group ({} until it does)."""
    try:
        return ray.get(ray.get_actor("control", namespace="r1ray").status.remote(), timeout=10)
    except Exception:  # noqa: BLE001 - not up yet
        return {}


def start_cluster(num_cpus: int):
    """A simulated cluster whose head has ``num_cpus`` CPUs, this process joined to it."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": num_cpus})
    ray.init(address=cluster.address, logging_level="ERROR")
    return cluster
