"""Ray Serve across nodes: Serve's controller, the HTTP proxy and the Dispatcher on the head, the two ExpertModel
replicas on the two worker nodes (each replica needs the `replica` resource, one per worker node). The node of one
replica is killed under load (200 requests at concurrency 16, each with its own mixture) and a node added back:
at most 1 % of the requests fail, each failure an OpenAI-shaped error, and the app returns to two replicas."""

from __future__ import annotations

import asyncio
import time

import pytest
from serve.conftest import make_experts, run_load, tiny_args  # tests/serve/conftest.py

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
APP = "t2ray-nodes"
HEAD = {"node:__internal_head__": 0.001}  # Ray's resource of the head node


@pytest.fixture(scope="module")
def endpoint(three_nodes, tmp_path_factory, free_port):
    from t2ray.serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")  # one port, one host
    args = tiny_args(
        make_experts(tmp_path_factory.mktemp("experts")),
        expert_model={
            "num_replicas": 2,
            "max_ongoing_requests": 64,
            "health_check_period_s": 1,
            "health_check_timeout_s": 10,
            "ray_actor_options": {"num_cpus": 0.5, "resources": {"replica": 1}},
        },
        dispatcher={
            "num_replicas": 1,
            "max_ongoing_requests": 256,
            "ray_actor_options": {"num_cpus": 0, "resources": HEAD},
        },
    )
    try:
        serve.run(build_app(args), name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def replica_nodes(expected: int = 2, timeout: float = 60) -> dict[int, str]:
    """pid → node id of each ExpertModel replica, from pings (they land on random replicas)."""
    handle = serve.get_deployment_handle("ExpertModel", app_name=APP)
    seen, deadline = {}, time.monotonic() + timeout
    while len(seen) < expected and time.monotonic() < deadline:
        info = handle.ping.remote().result()
        seen[info["pid"]] = info["node_id"]
    return seen


def running_replicas() -> int:
    app = serve.status().applications.get(APP)
    return app.deployments["ExpertModel"].replica_states.get("RUNNING", 0) if app else 0


def test_replicas_on_the_two_worker_nodes(endpoint, three_nodes):
    nodes = replica_nodes()
    assert len(nodes) == 2 and len(set(nodes.values())) == 2, nodes
    assert set(nodes.values()) <= {n.node_id for n in three_nodes.workers}


def test_a_replica_node_killed_under_load(endpoint, three_nodes):
    victim = next(iter(replica_nodes().values()))
    events: dict[str, float] = {}

    async def kill_once(done: int):
        if done == 30 and not events:  # on the main thread (Ray starts a node there only): the client pauses briefly
            events["killed"] = three_nodes.kill(three_nodes.node_of(victim))
            three_nodes.add()  # a replacement node, as an autoscaler would bring up

    results = asyncio.run(run_load(endpoint, "none", 200, 16, on_done=kill_once))
    assert events, "the node was never killed"
    failed = [(status, body) for _, status, body in results if status != 200]
    assert len(failed) <= 2, failed  # ≤ 1 % of 200
    for status, body in failed:  # an HTTP answer in OpenAI's error shape, never a dropped connection
        assert status >= 400 and {"message", "type"} <= set(body["error"]), (status, body)
    deadline = time.monotonic() + 180
    while running_replicas() < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    back = time.time() - events["killed"]
    assert running_replicas() == 2, serve.status()
    nodes = replica_nodes()
    assert victim not in nodes.values() and len(set(nodes.values())) == 2, nodes
    print(
        f"\nnode of a replica killed after 30 of 200 requests: {len(failed)} failed; two replicas again "
        f"{back:.1f} s after the kill"
    )
