"""A generator and the scorer are killed and replaced; then a node goes away with the other
generator and there is no room to replace it. Usage: elastic_faults.py OUT TINY_DIR STEPS [--set K=V ...]"""
import sys

import ray
from simcluster import Run, control_status, start_cluster


def main(out: str, tiny: str, steps: int, *extra: str) -> None:
    cluster = start_cluster(num_cpus=2)
    # the learners, the scorers and generator-0 fill the head; generator-1 waits for room, and the
    # node that joins then holds it and nothing else (placed on two nodes from the start, the
    # learner ranks' group could be split onto the node that is removed below)
    run = Run(cluster, out, tiny, steps, "--set", "generator.num_actors=1", "--set", "generator.max_actors=2", *extra)
    run.wait_for("the driver's first report", lambda: control_status().get("slots") == 2)
    node = cluster.add_node(num_cpus=1)
    run.wait_for("generator-1 to join", lambda: control_status().get("ready") == 2)
    run.wait_for("step 2", lambda: run.steps_done() >= 2)
    where = {}
    for name in ("generator-0", "generator-1"):
        a = ray.get_actor(name, namespace="r1ray")
        where[name] = ray.get(a.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()), timeout=30)
    on_head = next(n for n, node_id in where.items() if node_id != node.node_id)
    ray.kill(ray.get_actor(on_head, namespace="r1ray"))  # a generator dies: replaced
    ray.kill(ray.get_actor("reward-scorer-0", namespace="r1ray"))  # the scorer too
    killed_at = run.steps_done()
    run.wait_for("the replacement to join", lambda: (st := control_status()).get("generator/restarted", 0) >= 1
                 and st.get("ready") == 2)
    cluster.remove_node(node)  # the other generator's node goes away: no room left to replace it
    run.finish(killed=on_head, killed_at=killed_at, removed_at=run.steps_done())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:])
