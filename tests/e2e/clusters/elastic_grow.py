"""A node joins and the generator group grows into it; ``r1ray scale 1`` shrinks it again.
Usage: elastic_grow.py OUT TINY_DIR STEPS"""
import sys

from simcluster import Run, control_status, start_cluster


def main(out: str, tiny: str, steps: int) -> None:
    cluster = start_cluster(num_cpus=2)  # room for one generator only
    run = Run(cluster, out, tiny, steps, "--set", "generator.num_actors=1", "--set", "generator.max_actors=2",
              "--set", "sampling.max_new_tokens=32")
    run.wait_for("step 2", lambda: run.steps_done() >= 2)
    run.wait_for("the driver's first report", lambda: control_status().get("slots") == 2)
    before = control_status()
    cluster.add_node(num_cpus=1)  # a node joins: generator-1's placement group is placed, it starts
    run.wait_for("generator-1 to join", lambda: control_status().get("ready") == 2)
    joined_at = run.steps_done()
    run.scale(1)  # by hand, back to one: generator-1 drains and leaves
    run.wait_for("the group to shrink", lambda: control_status().get("generators/removed") == 1)
    run.finish(before=before, joined_at=joined_at, shrunk_at=run.steps_done())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
