"""vLLM generators: one joins when a node does (the weight-transfer group is formed again with
it), the other's engine dies inside its live actor and it is replaced, then ``r1ray scale``
drains one. Usage: elastic_vllm.py OUT TINY_DIR STEPS"""
import os
import sys

import psutil
import ray
from simcluster import Run, control_status, start_cluster


def main(out: str, tiny: str, steps: int) -> None:
    cluster = start_cluster(num_cpus=2)
    run = Run(cluster, out, tiny, steps, "--set", "generator.backend=vllm", "--set", "generator.max_model_len=96",
              "--set", "generator.num_actors=1", "--set", "generator.max_actors=2")
    run.wait_for("step 2", lambda: run.steps_done() >= 2, timeout=600)
    run.wait_for("the driver's first report", lambda: control_status().get("slots") == 2)
    cluster.add_node(num_cpus=1)  # generator-1 starts there
    # generator-0's vLLM engine dies inside its live actor: the actor answers calls, its engine does not
    actor = ray.get_actor("generator-0", namespace="r1ray")
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
    cores = [p for p in psutil.Process(pid).children(recursive=True) if "EngineCor" in p.name() + " ".join(p.cmdline())]
    for p in cores:
        p.kill()
    killed_at = run.steps_done()
    # both engines start at once; the first up joins through a sync of the current weights (no
    # generator is left to make a batch), the second through the next sync, whichever comes first
    run.wait_for("generator-0's replacement and generator-1 to join", lambda: (st := control_status()).get(
        "generator/restarted", 0) >= 1 and st.get("ready") == 2, timeout=600)
    joined_at = run.steps_done()
    run.scale(1)  # by hand: generator-1 drains and leaves; the next sync forms the group without it
    run.wait_for("the group to shrink", lambda: control_status().get("generators/removed") == 1)
    run.finish(killed_at=killed_at, cores=len(cores), joined_at=joined_at, shrunk_at=run.steps_done())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
