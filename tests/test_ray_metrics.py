"""The run's metrics reach Ray's metrics agent, where the dashboard and Prometheus read them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import json, time, urllib.request
import ray
from r1ray.cluster.groups import free_port
from r1ray.cluster.ray_metrics import RunMetrics

port = free_port()
ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR", _metrics_export_port=port,
         _system_config={"metrics_report_interval_ms": 500})
record = {"reward/mean": 0.75, "reward/accuracy/mean": 0.5, "reward/accuracy/timeouts": 3,
          "throughput/tokens_per_s": 1234.5, "throughput/samples_per_s": 99.0, "staleness/mean": 0.9,
          "time/weight_sync_s": 0.125, "policy_version": 7, "util/generator/idle_ratio": 0.25,
          "util/learner/idle_ratio": 0.5, "queue/generate_groups": 4}
for run in ("run-a", "run-a"):  # a second driver in one process registers the same metrics again
    RunMetrics(run).record(record)
found, text = {}, ""
for _ in range(60):
    time.sleep(0.5)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    lines = [l for l in text.splitlines() if "r1ray_" in l and not l.startswith("#")]
    if any("r1ray_verifier_timeouts_total" in l for l in lines) and any("r1ray_queue_depth" in l for l in lines):
        break
print("RESULT " + json.dumps(lines))
"""


@pytest.mark.timeout(180)
def test_step_metrics_are_exported_through_ray():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=170, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = json.loads(line[7:])

    def value(name, **tags):
        for l in lines:
            metric, _, number = l.rpartition(" ")
            if metric.startswith(name + "{") and all(f'{k}="{v}"' in metric for k, v in tags.items()):
                return float(number)
        raise AssertionError(f"{name} {tags} not exported: {lines}")

    assert value("ray_r1ray_reward", run="run-a") == 0.75
    assert value("ray_r1ray_reward_component", run="run-a", reward="accuracy") == 0.5
    assert value("ray_r1ray_tokens_per_second") == 1234.5
    assert value("ray_r1ray_staleness") == 0.9
    assert value("ray_r1ray_weight_sync_seconds") == 0.125
    assert value("ray_r1ray_idle_ratio", group="learner") == 0.5
    assert value("ray_r1ray_queue_depth", stage="generate_groups") == 4
    assert value("ray_r1ray_verifier_timeouts_total", reward="accuracy") == 6  # counted by both records
