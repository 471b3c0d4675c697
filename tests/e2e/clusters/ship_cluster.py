"""A head (with the dashboard, for jobs) and a second node with resource "node2", run by a
Python that cannot import r1ray. Prints ``CLUSTER {address, node2, dashboard}``, then holds the
cluster until its stdin closes."""
import importlib.util
import json
import socket
import sys

if importlib.util.find_spec("r1ray") is not None:
    sys.exit("r1ray is importable on the cluster: the test would prove nothing")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    from ray.cluster_utils import Cluster

    # Ports of their own: another Ray on this machine may hold the defaults. Node 2 sets up runtime
    # envs in a folder of its own, as a node on another machine would: nodes sharing one, the second
    # to install a wheel finds the first's install folder, hands it to pip as the wheel, and deletes it.
    mem = 80 * 2**20
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": mem, "include_dashboard": True, "dashboard_port": free_port(),
        "dashboard_agent_listen_port": free_port()})
    node2 = cluster.add_node(num_cpus=1, resources={"node2": 1}, object_store_memory=mem,
                             dashboard_agent_listen_port=free_port(), runtime_env_dir_name="runtime_resources_node2")
    cluster.wait_for_nodes()
    print("CLUSTER " + json.dumps({"address": cluster.address, "node2": node2.node_id,
                                   "dashboard": cluster.head_node.address_info["webui_url"]}), flush=True)
    sys.stdin.read()  # until the test is done
    cluster.shutdown()


if __name__ == "__main__":
    main()
