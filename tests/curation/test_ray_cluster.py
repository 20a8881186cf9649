"""Scale-out: the same `lensforge curate` on a two-node Ray cluster started with `ray start`; both nodes work.

Both nodes live on this machine, on 127.0.0.2 (head) and 127.0.0.3: Ray rewrites 127.0.0.1 and `localhost` to the
machine's network address in cluster mode, and this test must not leave loopback. The proxies point Ray's cloud
metadata probe (run by its dashboard process) at a closed loopback port.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.ray_runtime import LOOPBACK_ONLY_ENV, QUIET_ENV
from curation.manifest import read_manifest
from curation.shard_filter import read_markers
from scenes import render_dataset, start_server
from scenes.config import ScenesConfig

BIN = Path(sys.executable).parent
HEAD, WORKER, PORT = "127.0.0.2", "127.0.0.3", 6391


def ray_cli(*args, env):
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_curate_runs_on_both_nodes_of_a_cluster(tmp_path):
    env = {**os.environ, **QUIET_ENV, **LOOPBACK_ONLY_ENV, "RAY_AUTH_MODE": "disabled"}
    common = ["--num-cpus=1", "--disable-usage-stats"]
    started = ray_cli("start", "--head", f"--node-ip-address={HEAD}", f"--port={PORT}", "--include-dashboard=false",
                      *common, env=env)
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        joined = ray_cli("start", f"--address={HEAD}:{PORT}", f"--node-ip-address={WORKER}", *common, env=env)
        assert joined.returncode == 0, joined.stderr[-2000:]

        scenes_dir = tmp_path / "scenes"
        server, base_url = start_server(scenes_dir.mkdir() or scenes_dir, host="127.0.0.1", port=0)
        urls = render_dataset(ScenesConfig(n=80, faults=0.0, seed=5, base_url=base_url), scenes_dir)
        data = tmp_path / "data"
        cmd = [str(BIN / "lensforge"), "curate", "--urls", str(urls), "--out", str(data), "--allow-hosts",
               "127.0.0.1", "--ray-address", f"{HEAD}:{PORT}", "--set", "curate.download.shard_size=10",
               "--set", "curate.min_area=0", "--set", "curate.min_blur=0", "--set", "curate.min_entropy=0"]
        run = subprocess.run(cmd, env={**env, "LENSFORGE_RAY_NODE_IP": HEAD}, capture_output=True, text=True,
                             timeout=600)
        server.shutdown()
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]

        nodes = {m["node_id"] for m in read_markers(data / "filtered")}
        assert len(nodes) == 2, f"filter shards ran on {len(nodes)} node(s)"
        assert len(read_manifest(data)) == 80
    finally:
        ray_cli("stop", "--force", env=env)
