"""Placement groups: the plan a recipe makes, the up-front checks, and real placement on a
simulated multi-node cluster (ray.cluster_utils.Cluster, fake GPUs)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from r1ray.cluster.placement import Bundles, unplaceable
from r1ray.controllers.config import load_recipe
from r1ray.controllers.config.schema import ConfigError
from r1ray.controllers.common.system import placement_plan

GPU_RECIPE = "configs/qwen2.5-1.5b-h100.yaml"


def _gpu_recipe(*overrides, gpus=8):
    return load_recipe(GPU_RECIPE, list(overrides), cpus=128, gpus=gpus)


def test_the_h100_recipe_plans_one_node():
    plans = placement_plan(_gpu_recipe())
    assert [p.name for p in plans] == ["train", "generator-0", "generator-1", "generator-2", "reward-scorer-0", "reward-scorer-1"]
    train = plans[0]
    assert [o for o, _ in train.bundles] == [f"learner-rank-{i}" for i in range(4)] + ["reference-0"]
    assert train.strategy == "PACK" and train.total() == {"CPU": 18, "GPU": 5}
    assert unplaceable(plans, [{"CPU": 128, "GPU": 8}]) is None
    # one GPU short
    assert "does not fit" in unplaceable(plans, [{"CPU": 128, "GPU": 7}])


def test_tensor_parallel_generators_need_their_gpus_on_one_node():
    r = _gpu_recipe("generator.num_actors=1", "generator.tensor_parallel_size=4", "generator.gpus_per_actor=4", gpus=16)
    plans = placement_plan(r)
    assert plans[1].bundles == [("generator-0", {"CPU": 4, "GPU": 4})]
    assert unplaceable(plans, [{"CPU": 64, "GPU": 8}, {"CPU": 64, "GPU": 8}]) is None
    why = unplaceable(plans, [{"CPU": 64, "GPU": 2}] * 8)  # 16 GPUs, but never 4 on one node
    assert why.startswith("generator-0 needs 4 CPU, 4 GPU on one node") and "2" in why


@pytest.mark.parametrize("overrides,message", [
    (["generator.gpus_per_actor=0.5"], "'generator.gpus_per_actor': got 0.5; accepted: 0 or a whole number"),
    (["learner.gpus_per_rank=1.5"], "'learner.gpus_per_rank': got 1.5"),
    (["generator.gpus_per_actor=2"], "vLLM would leave 1 of them idle"),
    (["generator.tensor_parallel_size=2"], "'generator.gpus_per_actor': got 1 with tensor_parallel_size 2; accepted: 2"),
    (["generator.tensor_parallel_size=0"], "'generator.tensor_parallel_size': got 0"),
])
def test_placements_that_cannot_work_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError) as e:
        _gpu_recipe(*overrides)
    assert message in str(e.value)


def test_tensor_parallelism_is_vllms():
    with pytest.raises(ConfigError) as e:
        load_recipe("configs/tiny-cpu.yaml", ["generator.tensor_parallel_size=2", "generator.gpus_per_actor=2"],
                    cpus=8, gpus=2)
    assert "accepted: 1, or backend 'vllm'" in str(e.value)


def test_bundles_drop_zero_resources():
    b = Bundles("x")
    b.add("a", 0.5, 0)
    assert b.bundles == [("a", {"CPU": 0.5})]


SCRIPT = r"""
import json, sys, time
import ray
from ray.cluster_utils import Cluster
from r1ray.cluster.placement import Bundles, Placement, PlacementError, alive_nodes, unplaceable

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
node_a = cluster.add_node(num_cpus=2, num_gpus=2)
node_b = cluster.add_node(num_cpus=2, num_gpus=3)
ray.init(address=cluster.address, logging_level="ERROR")
cluster.wait_for_nodes()

train = Bundles("train")
for i in range(2):
    train.add(f"learner-rank-{i}", 0.5, 1)
train.add("reference-0", 0.5, 1)
gen = Bundles("generator-0", strategy="STRICT_PACK")
gen.add("generator-0", 0.5, 2)
plans = [train, gen]
out = {"fits": unplaceable(plans, alive_nodes())}

@ray.remote
class Probe:
    def where(self):
        return ray.get_runtime_context().get_node_id(), len(ray.get_gpu_ids())

placement = Placement(plans, "test", timeout_s=60)
actors = {}
for plan in plans:
    for owner, b in plan.bundles:
        actors[owner] = Probe.options(num_cpus=b.get("CPU", 0), num_gpus=b.get("GPU", 0),
                                      scheduling_strategy=placement.strategy(owner)).remote()
out["where"] = {owner: ray.get(a.where.remote(), timeout=60) for owner, a in actors.items()}
placement.remove()

big = Bundles("too-big", strategy="STRICT_PACK")
big.add("generator-9", 0.5, 4)
out["too_big"] = unplaceable([big], alive_nodes())
try:
    Placement([big], "test", timeout_s=3)
    out["timeout"] = None
except PlacementError as e:
    out["timeout"] = str(e)

# a group whose node dies while the others are full: renewed instead of left RESCHEDULING
filler = Bundles("filler", strategy="STRICT_PACK")
filler.add("filler", 0.1, 2)
gen = Bundles("generator-1", strategy="STRICT_PACK")
gen.add("generator-1", 0.1, 2)
placement = Placement([filler, gen], "test", timeout_s=60)  # one on each node: no node has 4 GPUs
on = ray.util.placement_group_table(placement.groups["generator-1"])["bundles_to_node_id"][0]
cluster.remove_node(node_a if on == node_a.node_id else node_b)
for _ in range(300):
    if placement.rescheduling(["generator-1", "filler"]):
        break
    time.sleep(0.1)
out["rescheduling"] = placement.rescheduling(["generator-1", "filler"])
placement.renew("generator-1")
out["renewed"] = [placement.rescheduling(["generator-1"]),
                  ray.util.placement_group_table(placement.groups["generator-1"])["state"]]
cluster.add_node(num_cpus=1, num_gpus=2)  # room appears: the new reservation is placed
ray.get(placement.groups["generator-1"].ready(), timeout=60)
out["placed"] = ray.util.placement_group_table(placement.groups["generator-1"])["state"]
placement.remove()
print("RESULT " + json.dumps(out))
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.timeout(300)
def test_placement_on_a_simulated_two_node_cluster():
    """Learner ranks and the reference on one node (3 GPUs: only node B has them); the
    tensor-parallel generator's 2 GPUs together on node A; an impossible bundle is refused
    up front and times out with a message when asked for anyway; a group that lost its node
    is seen rescheduling, renewed, and placed when a node with room joins."""
    env = {"PYTHONPATH": str(Path(__file__).parent), "RAY_AUTH_MODE": "disabled"}
    import os

    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=280,
                          env={**os.environ, **env})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = json.loads(line[7:])
    assert out["fits"] is None
    where = out["where"]
    train_nodes = {where[o][0] for o in ("learner-rank-0", "learner-rank-1", "reference-0")}
    assert len(train_nodes) == 1 and where["generator-0"][0] not in train_nodes
    assert [where[o][1] for o in ("learner-rank-0", "learner-rank-1", "reference-0", "generator-0")] == [1, 1, 1, 2]
    assert out["too_big"].startswith("generator-9 needs 0.5 CPU, 4 GPU on one node")
    assert "placement group 'test-too-big'" in out["timeout"] and "was not placed within 3s" in out["timeout"]
    # Ray would retry the group of a dead node in a busy loop (cluster/placement.py): it is renewed
    assert out["rescheduling"] == ["generator-1"]
    assert out["renewed"] == [[], "PENDING"] and out["placed"] == "CREATED"
