"""One operation on a running cluster's r1ray actors, from a driver of its own (so the test
process stays out of Ray). Prints the answer.

    on_cluster.py ADDRESS kill NAME          kill actor NAME (namespace r1ray)
    on_cluster.py ADDRESS pid NAME           its process id
    on_cluster.py ADDRESS ping NAME          what its ping() returns
    on_cluster.py ADDRESS left TIMEOUT_S     r1ray actors left once they are gone or TIMEOUT_S passed
    on_cluster.py ADDRESS squat NAME         hold actor NAME (another run's) until killed; prints "up"
"""
import os
import sys
import time

import ray


@ray.remote(num_cpus=0)
class Squatter:
    def ping(self) -> str:
        return "ok"


def actors_left(timeout_s: float) -> int:
    t0 = time.monotonic()
    while True:
        left = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"].startswith("r1ray")]
        if not left or time.monotonic() - t0 >= timeout_s:
            return len(left)
        time.sleep(0.5)


def main(address: str, op: str, arg: str) -> None:
    ray.init(address=address, namespace="r1ray", logging_level="ERROR")
    if op == "kill":
        ray.kill(ray.get_actor(arg))
    elif op == "pid":
        print(ray.get(ray.get_actor(arg).__ray_call__.remote(lambda self: os.getpid()), timeout=30))
    elif op == "ping":
        print(ray.get(ray.get_actor(arg).ping.remote(), timeout=30))
    elif op == "left":
        print(actors_left(float(arg)))
    elif op == "squat":
        a = Squatter.options(name=arg).remote()
        ray.get(a.ping.remote())
        print("up", flush=True)
        time.sleep(600)
    else:
        raise SystemExit(f"unknown operation {op!r}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
