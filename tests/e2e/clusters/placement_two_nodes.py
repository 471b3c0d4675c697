"""Placement groups on a simulated cluster of a head and two GPU nodes (fake GPUs): where the
bundles land, a plan too big for any node, and a group whose node dies, renewed and placed
when room appears. Prints one RESULT line."""
import json
import time

import ray
from ray.cluster_utils import Cluster

from r1ray.cluster.placement import Bundles, Placement, PlacementError, alive_nodes, unplaceable


def main() -> None:
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


if __name__ == "__main__":
    main()
