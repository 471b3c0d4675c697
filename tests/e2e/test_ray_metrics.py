"""The run's metrics reach Ray's metrics agent, where the dashboard and Prometheus read them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CLUSTERS = Path(__file__).parent / "clusters"


@pytest.mark.timeout(180)
def test_step_metrics_are_exported_through_ray():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(CLUSTERS / "ray_metrics_export.py")], capture_output=True, text=True, timeout=170, env=env)
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
