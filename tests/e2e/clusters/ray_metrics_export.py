"""Step records through ``RunMetrics`` to a local Ray's metrics agent, read back from its
Prometheus endpoint (twice, as a second driver in one process would register them again).
Prints one RESULT line: the exported r1ray lines."""
import json
import time
import urllib.request

import ray

from r1ray.cluster.groups import free_port
from r1ray.cluster.ray_metrics import RunMetrics

RECORD = {"reward/mean": 0.75, "reward/accuracy/mean": 0.5, "reward/accuracy/timeouts": 3,
          "throughput/tokens_per_s": 1234.5, "throughput/samples_per_s": 99.0, "staleness/mean": 0.9,
          "time/weight_sync_s": 0.125, "policy_version": 7, "util/generator/idle_ratio": 0.25,
          "util/learner/idle_ratio": 0.5, "queue/generate_groups": 4}


def main() -> None:
    port = free_port()
    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR", _metrics_export_port=port,
             _system_config={"metrics_report_interval_ms": 500})
    for run in ("run-a", "run-a"):
        RunMetrics(run).record(RECORD)
    lines = []
    for _ in range(60):
        time.sleep(0.5)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        lines = [line for line in text.splitlines() if "r1ray_" in line and not line.startswith("#")]
        if any("r1ray_verifier_timeouts_total" in x for x in lines) and any("r1ray_queue_depth" in x for x in lines):
            break
    print("RESULT " + json.dumps(lines))


if __name__ == "__main__":
    main()
