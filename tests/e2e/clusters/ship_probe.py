"""A driver that starts Ray as ``r1ray train`` does (joining ADDRESS, or, inside a submitted
job, the job's cluster) and asks node 2 where its r1ray comes from. Prints one RESULT line.
Usage: ship_probe.py [ADDRESS]"""
import importlib.metadata
import json
import os
import sys

import ray

import r1ray
from r1ray.cluster import runtime


@ray.remote(num_cpus=0, resources={"node2": 1})
def probe() -> dict:
    import r1ray
    from r1ray.controllers.config import resolve_recipe_path

    dist = importlib.metadata.distribution("r1ray")
    [ep] = [e for e in dist.entry_points if e.group == "vllm.general_plugins"]
    return {"node": ray.get_runtime_context().get_node_id(), "file": r1ray.__file__, "version": dist.version,
            "requires": dist.requires, "entry_point": f"{ep.name}={ep.value}",
            "plugin_from": ep.load().__code__.co_filename, "recipe": str(resolve_recipe_path("tiny-cpu")),
            "env": {k: os.environ.get(k) for k in ("DS_ACCELERATOR", "TOKENIZERS_PARALLELISM")}}


def main(address: str | None) -> None:
    runtime.start(address, "ship-test", None, None, False, 100, False, connect_timeout_s=30, ship_code=True)
    print("RESULT " + json.dumps({"driver_file": r1ray.__file__, "remote": ray.get(probe.remote(), timeout=150)}),
          flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
