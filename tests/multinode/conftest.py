"""A 3-node Ray cluster on one machine (Ray's own way of testing multi-node: one raylet per node, each with its
own processes, object store and resources): a head with 1 CPU and two worker nodes with 2 logical CPUs and the
custom resources `trainer: 2` and `replica: 1` each, so that placement is controllable (the head has Ray's own
`node:__internal_head__`). A node is killed as clusters lose them: its
raylet and every process on it at once (`Cluster.remove_node`), never one worker process."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest
from ray_env import cluster_env  # tests/ray_env.py (tests/ is on the path: tests/conftest.py)

WORKER_NODE = {"num_cpus": 2, "resources": {"trainer": 2, "replica": 1}}  # Train workers; one Serve replica


@dataclass
class Nodes:
    """The running cluster and its worker nodes (ray._private.node.Node), in the order they were added."""

    cluster: object
    workers: list = field(default_factory=list)

    def node_of(self, node_id: str):
        return next(n for n in self.workers if n.node_id == node_id)

    def kill(self, node) -> float:
        """Kill a worker node (raylet and all its processes, no graceful shutdown); returns when it died (time.time(),
        comparable with the times in a run's workers.jsonl)."""
        self.cluster.remove_node(node, allow_graceful=False)
        self.workers.remove(node)
        return time.time()

    def add(self, **node_args):
        node = self.cluster.add_node(**{**WORKER_NODE, **node_args})
        self.workers.append(node)
        return node


@pytest.fixture(scope="module")
def three_nodes(t2ray_cache):
    """Head (1 CPU) + 2 worker nodes (2 CPUs, trainer: 2 each), the driver connected; torn down after the module."""
    import ray
    from ray.cluster_utils import Cluster

    with cluster_env():
        cluster = Cluster(
            initialize_head=True, shutdown_at_exit=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
        )
        nodes = Nodes(cluster)
        try:
            for _ in range(2):
                nodes.add()
            cluster.wait_for_nodes()
            ray.init(address=cluster.address)
            yield nodes
        finally:
            ray.shutdown()
            cluster.shutdown()
