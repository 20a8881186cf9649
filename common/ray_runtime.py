"""Starting or joining Ray for a lensforge job, without anything phoning home.

Local runtime (no address): Ray would otherwise pick this machine's network address by asking the routing table
about a public resolver and bind to it, and its dashboard process (started even with include_dashboard=False,
for the UsageStatsHead module) probes cloud metadata services at 169.254.169.254 whether or not usage stats are
enabled. So a local runtime starts with Ray's single-node mode (127.0.0.1 everywhere) and with HTTP proxies
pointed at a closed loopback port, so those probes end at 127.0.0.1:9 (loopback stays direct via NO_PROXY).
A cluster (`--ray-address`) is the operator's network: lensforge changes nothing there, except that
LENSFORGE_RAY_NODE_IP, when set, names this machine's address in the cluster (for hosts with several).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

# Imported by every module that starts Ray or imports img2dataset (albumentations checks PyPI for updates).
QUIET_ENV = {
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "WANDB_MODE": "disabled",
    "WANDB_SILENT": "true",
    "RAY_USAGE_STATS_ENABLED": "0",  # Ray reports usage to its makers unless told not to
}
NODE_IP_ENV = "LENSFORGE_RAY_NODE_IP"
CLOSED_LOOPBACK_PROXY = "http://127.0.0.1:9"  # the discard port: nothing listens, a probe fails at once
LOOPBACK_ONLY_ENV = {
    **{name: CLOSED_LOOPBACK_PROXY for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")},
    **{name: "localhost,127.0.0.1,::1" for name in ("NO_PROXY", "no_proxy")},
}
LOCAL_RAY_ENV = {**LOOPBACK_ONLY_ENV, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # single-node mode: 127.0.0.1

os.environ.update(QUIET_ENV)


@contextmanager
def temporary_env(values: dict[str, str]):
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def init_ray(address: str | None = None, runtime_env: dict | None = None) -> None:
    """Join `address`, or start a local runtime on loopback only. No-op when Ray is already up."""
    if address is None:
        with temporary_env(LOCAL_RAY_ENV):
            import ray
            from ray._private import ray_constants

            ray_constants.ENABLE_RAY_CLUSTER = False  # read at import; ray may have been imported before
            if not ray.is_initialized():  # "local": a new runtime, even where another Ray runs on the machine
                ray.init(address="local", runtime_env=runtime_env, log_to_driver=False, include_dashboard=False,
                         configure_logging=False)
        return
    import ray

    if not ray.is_initialized():
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, configure_logging=False,
                 _node_ip_address=os.environ.get(NODE_IP_ENV) or None)


def node_strategies(n: int, resource: str = "CPU", per_actor: float = 0.0) -> list:
    """Where each of `n` actors runs: actor i pinned to the next alive node, in turn, among those with room for
    `per_actor` of `resource` (a node with 8 CPUs takes 8 one-CPU actors, one with 2 takes 2; the head of a
    cluster often has no CPU for tasks, GPU actors need a GPU node); when every node is full, in turn over all of
    them (the rest wait for room). Not Ray's "SPREAD": it is best effort, each raylet round-robins on its own and a
    fresh node is not in every view yet, so on a new two-node cluster it put both actors on one node in about a
    third of tries. Hard affinity: an actor whose node died in between fails the job, and the rerun does what is
    left."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return [NodeAffinitySchedulingStrategy(node, soft=False)
            for node in node_order(ray.nodes(), n, resource, per_actor)]


def node_order(nodes: list[dict], n: int, resource: str = "CPU", per_actor: float = 0.0) -> list[str]:
    """The node id of each of `n` actors (`node_strategies`), from `ray.nodes()`' records."""
    alive = sorted((node for node in nodes if node["Alive"]), key=lambda node: node["NodeID"])
    room = {node["NodeID"]: (node["Resources"].get(resource, 0) // per_actor if per_actor else n)
            for node in alive if node["Resources"].get(resource, 0) > 0}
    room = room or {node["NodeID"]: n for node in alive}
    order = []
    while len(order) < n and any(room.values()):
        for node in room:
            if room[node] > 0 and len(order) < n:
                order.append(node)
                room[node] -= 1
    nodes = list(room)
    order += [nodes[i % len(nodes)] for i in range(n - len(order))]
    return order
