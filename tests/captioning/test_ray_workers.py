"""`lensforge caption --workers 2` on a two-node Ray cluster (ray.cluster_utils, both nodes on this machine): the
summaries in Ray tasks, the parts dealt part i → actor i % 2, the actors on both nodes and saying so; and how the
driver merges the actors' per-node counts."""

from __future__ import annotations

import pandas as pd
import pytest

from captioning.config import CaptionConfig
from captioning.pipeline import caption
from captioning.schema import captions_dir
from captioning.worker import Stats
from curation.manifest import manifest_parts
from tests.captioning.caption_runs import assert_each_ok_once


@pytest.fixture
def two_nodes():
    """A head and a second node, one CPU each, on loopback only (as common/ray_runtime.init_ray starts one)."""
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    from common.ray_runtime import LOCAL_RAY_ENV, temporary_env

    ray.shutdown()  # another test's local runtime
    with temporary_env(LOCAL_RAY_ENV):
        ray_constants.ENABLE_RAY_CLUSTER = False  # 127.0.0.1 for every node
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        cluster.wait_for_nodes()
    try:
        yield [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_stats_merge_counts_per_node():
    stats = Stats()
    one = Stats(requests=3).as_dict() | {"nodes": {"node-a": 3}}
    stats.merge(one)
    stats.merge(Stats(requests=2).as_dict() | {"nodes": {"node-b": 2}})
    stats.merge(one)
    old = Stats(requests=1).as_dict()
    del old["nodes"]  # a result without per-node counts (an in-process worker's, before them)
    stats.merge(old)
    assert stats.as_dict()["nodes"] == {"node-a": 6, "node-b": 2} and stats.requests == 9


@pytest.mark.slow  # starts a two-node Ray cluster and its workers (~25 s on two busy cores)
def test_two_workers_spread_parts_and_nodes(two_nodes, cap_endpoint, cap_data, kept_keys, capsys):
    _, base_url = cap_endpoint
    cfg = CaptionConfig(base_url=base_url, model="gpt-4.1-mini", variants=["short"], workers=2, concurrency=4)
    stats = caption(cap_data, cfg)
    assert f"{len(kept_keys)} caption(s) of {len(kept_keys)} image(s) to request" in capsys.readouterr().out
    assert_each_ok_once(cap_data, kept_keys, ["short"])

    assert set(stats["nodes"]) == set(two_nodes)  # one actor on each node (node_strategies)
    assert all(n > 0 for n in stats["nodes"].values()) and sum(stats["nodes"].values()) == len(kept_keys)

    parts = manifest_parts(cap_data)  # 3 parts, all with work: worker 0 gets parts 0 and 2, worker 1 part 1
    part_of = {k: i for i, p in enumerate(parts) for k in pd.read_parquet(p, columns=["key"])["key"]}
    dealt = {}
    for path in captions_dir(cap_data).glob("part-*.parquet"):
        worker = int(path.name.split("-")[3])
        dealt.setdefault(worker, set()).update(part_of[k] for k in pd.read_parquet(path, columns=["key"])["key"])
    assert dealt == {0: {0, 2}, 1: {1}}
