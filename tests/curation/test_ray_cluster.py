"""Scale-out: `lensforge curate`, `caption --workers 2` and `precompute` on a two-node Ray cluster started with
`ray start`: work lands on both nodes, and the manifest, captions and shard index equal a one-node run's.

Both nodes live on this machine, on 127.0.0.2 (head) and 127.0.0.3: Ray rewrites 127.0.0.1 and `localhost` to the
machine's network address in cluster mode, and this test must not leave loopback. The proxies point Ray's cloud
metadata probe (run by its dashboard process) at a closed loopback port. DATA is a local path, which every node of
this one-machine cluster sees (a real cluster's shared storage).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from captioning.endpoint import start_endpoint
from captioning.schema import read_captions
from common.ray_runtime import LOOPBACK_ONLY_ENV, QUIET_ENV
from curation.manifest import read_manifest
from curation.shard_filter import read_markers
from scenes import render_dataset, start_server
from scenes.config import ScenesConfig

BIN = Path(sys.executable).parent
HEAD, WORKER, PORT = "127.0.0.2", "127.0.0.3", 6391


def ray_cli(*args, env):
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=180)


def stages(urls: Path, data: Path, endpoint: str, env: dict, address: str | None) -> None:
    """curate → caption (2 workers) → precompute into `data`, on the cluster at `address` (None: one local node)."""
    on = ["--ray-address", address] if address else []
    curate = [str(BIN / "lensforge"), "curate", "--urls", str(urls), "--out", str(data), "--allow-hosts", "127.0.0.1",
              *on, "--set", "curate.download.shard_size=10", "--set", "curate.min_area=0", "--set",
              "curate.min_blur=0", "--set", "curate.min_entropy=0"]
    caption = [str(BIN / "lensforge"), "caption", "--data", str(data), "--base-url", endpoint, "--model",
               "gpt-4.1-mini", "--variants", "short", "--workers", "2", *on]
    precompute = [str(BIN / "lensforge"), "precompute", "--data", str(data), "--variants", "short", *on,
                  "--set", "precompute.shard_size=16", "--set", "precompute.encoder_actors=2", "--set",
                  "precompute.cpus_per_actor=0.5"]
    for cmd in (curate, caption, precompute):
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, " ".join(cmd[:2]) + "\n" + run.stdout[-2000:] + run.stderr[-2000:]


def outputs(data: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    captions = read_captions(data).to_pandas()[["key", "variant", "status", "text"]]
    [index] = list((data / "shards").glob("*/index.parquet"))
    return (read_manifest(data).to_pandas(), captions.sort_values(["key", "variant"]).reset_index(drop=True),
            pd.read_parquet(index).sort_values("shard").reset_index(drop=True))


@pytest.mark.slow
def test_curate_caption_and_precompute_run_on_both_nodes_and_equal_a_one_node_run(tmp_path):
    env = {**os.environ, **QUIET_ENV, **LOOPBACK_ONLY_ENV, "RAY_AUTH_MODE": "disabled", "OPENAI_API_KEY": "sk-test"}
    scenes_dir = tmp_path / "scenes"
    server, base_url = start_server(scenes_dir.mkdir() or scenes_dir, host="127.0.0.1", port=0)
    urls = render_dataset(ScenesConfig(n=80, faults=0.0, seed=5, base_url=base_url), scenes_dir)
    endpoint, endpoint_url = start_endpoint(host="127.0.0.1", port=0)
    common = ["--num-cpus=2", "--disable-usage-stats"]  # 2 logical CPUs a node: an encoder actor and a decoder
    try:
        stages(urls, tmp_path / "one", endpoint_url, env, None)
        started = ray_cli("start", "--head", f"--node-ip-address={HEAD}", f"--port={PORT}",
                          "--include-dashboard=false", *common, env=env)
        assert started.returncode == 0, started.stderr[-2000:]
        joined = ray_cli("start", f"--address={HEAD}:{PORT}", f"--node-ip-address={WORKER}", *common, env=env)
        assert joined.returncode == 0, joined.stderr[-2000:]
        data = tmp_path / "two"
        stages(urls, data, endpoint_url, {**env, "LENSFORGE_RAY_NODE_IP": HEAD}, f"{HEAD}:{PORT}")
    finally:
        ray_cli("stop", "--force", env=env)
        endpoint.stop()
        server.shutdown()

    filtered_on = {m["node_id"] for m in read_markers(data / "filtered")}
    assert len(filtered_on) == 2, f"filter shards ran on {len(filtered_on)} node(s)"
    captioned_on = json.loads((data / "reports" / "caption.json").read_text())["nodes"]
    assert len(captioned_on) == 2 and all(captioned_on.values()), captioned_on
    encoded_on = json.loads((data / "reports" / "precompute.json").read_text())["encoded_by_node"]
    assert len(encoded_on) == 2 and all(encoded_on.values()), encoded_on
    for two, one in zip(outputs(data), outputs(tmp_path / "one")):
        pd.testing.assert_frame_equal(two, one)
    assert len(read_manifest(data)) == 80
