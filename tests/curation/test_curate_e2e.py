"""`lensforge curate` end to end, as a user runs it: the CLI in a subprocess, real Ray, real img2dataset over
loopback HTTP, synthetic scenes with every web fault, and URLs the guard must refuse (directly and behind a
redirect). Also: kill at any moment and rerun → the same manifest, finished shards not downloaded again."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from curation.manifest import MANIFEST_SCHEMA, read_manifest
from scenes import render_dataset, start_server
from scenes.config import ScenesConfig

LENSFORGE = str(Path(sys.executable).parent / "lensforge")
REPO = Path(__file__).resolve().parents[2]

# What each fault kind of the scene renderer must become in the manifest: (status, reject_reason).
EXPECTED = {
    "broken_link": ("failed_download", "failed_download"),
    "truncated": ("failed_decode", "failed_decode"),
    "not_image": ("failed_decode", "failed_decode"),
    "bomb": ("failed_decode", "failed_decode"),
    "optout": ("failed_download", "failed_download"),
    "tiny": ("ok", "min_area"),
    "extreme_aspect": ("ok", "aspect"),
    "blurred": ("ok", "blur"),
    "near_blank": ("ok", "blur"),  # flat: no edges at all, the blur check (before entropy) says so first
    "exact_duplicate": ("ok", "duplicate"),
    "near_duplicate": ("ok", "duplicate"),
}


def write_config(path: Path, **curate) -> Path:
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["curate"]
    demo["download"].update(shard_size=20, threads=8)
    demo.update(curate)
    path.write_text(yaml.safe_dump({"curate": demo}))
    return path


def add_hostile_rows(scenes_dir: Path, base_url: str, refused_url: str) -> Path:
    """URLs the guard must refuse, and one allowed URL that redirects to a refused address."""
    serve = json.loads((scenes_dir / "_serve.json").read_text()) if (scenes_dir / "_serve.json").exists() else {}
    serve["/to_refused"] = {"redirect": refused_url}
    (scenes_dir / "_serve.json").write_text(json.dumps(serve))
    urls = pd.read_parquet(scenes_dir / "urls.parquet")
    hostile = {
        "file": "file:///etc/passwd",
        "ftp": "ftp://127.0.0.1/x.jpg",
        "credentials": "http://user:pw@127.0.0.1/x.jpg",
        "other_loopback": refused_url,
        "redirect": f"{base_url}/to_refused",
    }
    extra = pd.DataFrame({"url": list(hostile.values()), "caption": "hostile",
                          "fault": [f"unsafe_{k}" for k in hostile]})
    out = scenes_dir / "urls_with_hostile.parquet"
    pd.concat([urls, extra], ignore_index=True).to_parquet(out)
    return out


def run_curate_cmd(urls: Path, data: Path, config: Path) -> list[str]:
    return [LENSFORGE, "curate", "--urls", str(urls), "--out", str(data), "--config", str(config)]


def run_curate(urls: Path, data: Path, config: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen(run_curate_cmd(urls, data, config), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("curate")
    scenes_dir = root / "scenes"
    scenes_dir.mkdir()
    refused_dir = root / "refused"
    refused_dir.mkdir()
    (refused_dir / "secret.jpg").write_bytes(b"not for you")
    refused_server, refused_base = start_server(refused_dir, host="127.0.0.2", port=0)
    server, base_url = start_server(scenes_dir, host="127.0.0.1", port=0)
    render_dataset(ScenesConfig(n=60, faults=0.3, seed=3, base_url=base_url), scenes_dir)
    urls = add_hostile_rows(scenes_dir, base_url, f"{refused_base}/secret.jpg")
    config = write_config(root / "curate.yaml")
    data = root / "data"
    output = finish(run_curate(urls, data, config))
    yield {"root": root, "urls": urls, "config": config, "data": data, "output": output}
    server.shutdown()
    refused_server.shutdown()


@pytest.fixture(scope="module")
def manifest(world):
    return read_manifest(world["data"]).to_pandas()


def test_manifest_schema_and_one_row_per_url(world, manifest):
    table = read_manifest(world["data"])
    for field in MANIFEST_SCHEMA:
        assert table.schema.field(field.name).type == field.type, field.name
    urls = pd.read_parquet(world["urls"])
    assert len(manifest) == len(urls)
    assert manifest["key"].is_unique
    assert list(manifest["url"]) == list(urls["url"])  # key order = input order
    assert (manifest["keep"] == manifest["reject_reason"].isna()).all()
    assert {"fault", "scene_id"} <= set(manifest.columns)  # input columns are carried through
    assert set(manifest["status"]) <= {"ok", "failed_download", "failed_decode"}


def test_every_fault_kind_ends_as_expected_row(manifest):
    faults = manifest[manifest["fault"].notna() & ~manifest["fault"].astype(str).str.startswith("unsafe_")]
    assert set(faults["fault"]) == set(EXPECTED), "the renderer makes a fault kind this test does not know"
    for _, row in faults.iterrows():
        assert (row["status"], row["reject_reason"]) == EXPECTED[row["fault"]], row.to_dict()
    clean = manifest[manifest["fault"].isna()]
    assert clean["keep"].mean() > 0.9, clean[~clean["keep"]][["key", "reject_reason", "blur", "entropy"]]


def test_duplicates_point_at_their_kept_source(manifest):
    dups = manifest[manifest["reject_reason"] == "duplicate"]
    keys = manifest.set_index("key")
    assert len(dups) >= 2
    for _, row in dups.iterrows():
        assert keys.loc[row["dup_of"], "keep"], row["dup_of"]
        if pd.notna(row["source"]):  # a fault copy: kept is its source, or whatever its source duplicates
            source = manifest.iloc[int(row["source"])]
            assert row["dup_of"] in (source["key"], source["dup_of"]), (row["key"], row["dup_of"], source["key"])


def test_hostile_urls_are_refused_rows(manifest):
    hostile = manifest[manifest["fault"].astype(str).str.startswith("unsafe_")]
    assert len(hostile) == 5
    assert (hostile["reject_reason"] == "unsafe_url").all(), hostile[["url", "error"]]
    assert (hostile["status"] == "failed_download").all()
    redirect = hostile[hostile["fault"] == "unsafe_redirect"].iloc[0]
    assert "127.0.0.2" in redirect["error"]


def test_scores_recorded_and_reports_written(world, manifest):
    ok = manifest[manifest["status"] == "ok"]
    assert ok[["blur", "entropy", "luminance"]].notna().all().all()
    assert manifest[["clip_score", "aesthetic", "nsfw", "watermark"]].isna().all().all()  # no CLIP configured
    funnel = json.loads((world["data"] / "reports" / "funnel.json").read_text())
    assert funnel["total"] == len(manifest) and funnel["kept"] == int(manifest["keep"].sum())
    assert (world["data"] / "reports" / "curation.html").stat().st_size > 10_000
    assert (world["data"] / "config.curate.yaml").exists()
    assert "kept" in world["output"]


def test_kill_and_resume_gives_the_same_manifest(world, manifest, tmp_path):
    data = tmp_path / "data"
    proc = run_curate(world["urls"], data, world["config"], start_new_session=True)
    deadline = time.time() + 240
    while not list((data / "download").glob("*_stats.json")) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the CLI, Ray and its workers
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in (data / "download").glob("*.tar")
            if (data / "download" / p.name.replace(".tar", "_stats.json")).exists()}
    assert done, "killed before any shard finished: the test proved nothing"
    assert not (data / "manifest").exists() or not list((data / "manifest").glob("part-*.parquet"))

    finish(run_curate(world["urls"], data, world["config"]))
    resumed = read_manifest(data).to_pandas()
    pd.testing.assert_frame_equal(resumed, manifest)
    for name, mtime in done.items():  # finished shards were not downloaded again
        assert (data / "download" / name).stat().st_mtime_ns == mtime, name


@pytest.mark.slow  # ~21 s; tests/pipelines/test_run.py's rerun of every stage covers a rerun changing nothing
def test_rerun_of_a_finished_run_changes_nothing(world, manifest):
    before = {p.name: p.stat().st_mtime_ns for p in (world["data"] / "filtered").glob("*.parquet")}
    finish(run_curate(world["urls"], world["data"], world["config"]))
    after = {p.name: p.stat().st_mtime_ns for p in (world["data"] / "filtered").glob("*.parquet")}
    assert before == after
    pd.testing.assert_frame_equal(read_manifest(world["data"]).to_pandas(), manifest)


@pytest.mark.slow  # ~21 s; the download-tar case below exercises the same markers (curation/markers.py) fast
def test_a_deleted_or_cut_filtered_part_is_filtered_again_not_trusted_to_its_marker(world, manifest, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    parts = sorted((data / "filtered").glob("*.parquet"))
    parts[0].unlink()  # the obvious remedy for a part that reads wrong
    parts[1].write_bytes(parts[1].read_bytes()[:100])  # a truncated one
    out = finish(run_curate(world["urls"], data, world["config"]))
    assert "filtering that shard again" in out
    pd.testing.assert_frame_equal(read_manifest(data).to_pandas(), manifest)


def test_a_deleted_or_cut_download_tar_is_downloaded_again_not_trusted_to_its_stats(world, manifest, tmp_path):
    """img2dataset's `_stats.json` says a shard finished; its tar, gone or cut, says otherwise: the shard is
    downloaded again, filtered again, and the manifest is the first run's (no row silently failed_download)."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    tars = sorted((data / "download").glob("*.tar"))
    whole = tars[1].stat().st_size
    tars[0].unlink()
    tars[1].write_bytes(tars[1].read_bytes()[: whole // 2])
    parts = {p.stem: p.stat().st_mtime_ns for p in (data / "filtered").glob("*.parquet")}
    out = finish(run_curate(world["urls"], data, world["config"]))

    assert f"curate: download shard {tars[0].stem}: {tars[0].name} missing; downloading it again" in out
    assert (f"curate: download shard {tars[1].stem}: {tars[1].name} is {whole // 2} bytes, not the {whole} its "
            "marker records; downloading it again") in out
    assert out.count("made from an earlier download of the shard; filtering that shard again") == 2
    assert tars[0].is_file() and tars[1].stat().st_size == whole
    redone = {p.stem for p in (data / "filtered").glob("*.parquet") if p.stat().st_mtime_ns != parts[p.stem]}
    assert redone == {tars[0].stem, tars[1].stem}  # the other shards were neither downloaded nor filtered again
    resumed = read_manifest(data).to_pandas()
    assert resumed["keep"].sum() == manifest["keep"].sum()
    pd.testing.assert_frame_equal(resumed, manifest)


def test_parquet_folders_read_with_pandas_pyarrow_and_ray_data(world, manifest):
    import pyarrow.dataset as ds
    import ray

    from common.ray_runtime import init_ray

    filtered, folder = world["data"] / "filtered", world["data"] / "manifest"
    assert len(pd.read_parquet(folder)) == len(manifest) == ds.dataset(folder).count_rows()
    rows = len(pd.read_parquet(filtered))
    assert rows == ds.dataset(filtered).count_rows() > 0  # one row per downloaded URL; the markers are skipped
    init_ray()
    try:
        assert ray.data.read_parquet(str(folder)).count() == len(manifest)
        assert ray.data.read_parquet(str(filtered)).count() == rows
    finally:
        ray.shutdown()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--urls", "/nonexistent/urls.parquet"], "URL list not found"),  # argparse: the last --urls wins
        (["--config", "/nonexistent.yaml"], "config file not found"),
        (["--set", "curate.min_area=-1"], "curate.min_area"),
        (["--set", "curate.nope=1"], "curate.nope"),
    ],
)
def test_bad_input_is_one_clear_line(world, tmp_path, extra, message):
    argv = [LENSFORGE, "curate", "--urls", str(world["urls"]), "--out", str(tmp_path / "d"), *extra]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lensforge: error:") and message in lines[0], result.stderr


def test_missing_url_column_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("link,caption\nhttp://127.0.0.1/x.jpg,hi\n")
    result = subprocess.run([LENSFORGE, "curate", "--urls", str(bad), "--out", str(tmp_path / "d")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "no 'url' column" in result.stderr, result.stderr


def test_an_empty_url_list_is_one_clear_line(tmp_path):
    empty = tmp_path / "empty.parquet"
    pd.DataFrame({"url": pd.Series([], dtype=str), "caption": pd.Series([], dtype=str)}).to_parquet(empty)
    result = subprocess.run([LENSFORGE, "curate", "--urls", str(empty), "--out", str(tmp_path / "d")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == f"lensforge: error: URL list {empty} has no URLs (0 rows)", result.stderr


def test_tiny_clip_model_filter_path(world, manifest, tmp_path):
    """The model filters through the same shard step and dedup as a real run, with a tiny random open_clip and
    heads written to disk and loaded by path (never random weights in a real run: that is why it is tiny)."""
    import shutil

    from curation.config import CurateConfig, ModelFiltersConfig
    from curation.shard_filter import ShardFilter
    from curation.tiny_models import write_tiny_clip

    data = tmp_path / "data"
    for folder in ("input", "download"):
        shutil.copytree(world["data"] / folder, data / folder)
    base = yaml.safe_load(world["config"].read_text())["curate"]
    models = ModelFiltersConfig(**write_tiny_clip(tmp_path / "clip"), min_clip_score=-1.0, min_aesthetic=-1e9,
                                max_nsfw=2.0, max_watermark=0.5, batch_size=8)
    cfg = CurateConfig(**{**base, "models": models})
    step = ShardFilter(str(data), cfg)
    for shard in sorted(p.stem for p in (data / "download").glob("*.tar")):
        step(shard)
    rows = pd.read_parquet(data / "filtered")
    scored = rows[rows["embedding"].notna()]
    assert len(scored) > 20
    assert scored[["aesthetic", "nsfw", "watermark"]].notna().all().all()
    no_alt = scored["key"].map(manifest.set_index("key")["alt_text"]).fillna("").eq("")
    assert (scored["clip_score"].isna() == no_alt).all()  # null exactly where there is no alt text to score
    assert scored["clip_score"].dropna().between(-1, 1).all() and scored["nsfw"].between(0, 1).all()
    assert np.allclose(np.linalg.norm(np.stack(scored["embedding"].to_numpy()), axis=1), 1, atol=1e-4)
    # model verdicts follow the thresholds: watermark is a sigmoid around 0.5 for random weights, so some pass
    # and some fail; every failure is reported as the watermark check, and only rows that passed pixels ran CLIP
    assert set(scored["reject_reason"].dropna()) <= {"watermark"}
    assert rows.loc[rows["reject_reason"].isin(["blur", "min_area", "aspect"]), "clip_score"].isna().all()
    # dedup uses the embeddings when they exist (exact copies are cosine 1 apart), in one k-means partition or many
    import ray

    from common.ray_runtime import init_ray
    from curation.dedup_job import read_dups, run_dedup

    shards = sorted(p.stem for p in (data / "filtered").glob("*.parquet"))

    def dups(**update) -> dict:
        shutil.rmtree(data / "dedup", ignore_errors=True)
        [path] = run_dedup(data, cfg.dedup.model_copy(update=update), [shards], embeddings=True)
        return read_dups(path)

    init_ray()
    try:
        every = dups()
        assert len(every) >= 1
        partitioned = dups(cluster_size=16, exact=False, phash=False)  # CLIP alone, in several k-means clusters
        assert partitioned and set(partitioned) <= set(every)  # fewer pairs across partitions, never new ones
    finally:
        ray.shutdown()


@pytest.mark.slow  # ~80 s: four curate runs; tests/curation/test_dedup_job.py checks the incremental dedup fast
def test_an_added_list_dedups_against_the_first_and_a_killed_add_resumes_to_the_same_manifest(world, manifest,
                                                                                              tmp_path):
    import shutil

    rows = pd.read_parquet(world["urls"])
    dup_rows = manifest.index[manifest["dup_of"].notna()]
    split = next(i for i in range(1, len(rows)) if any(d >= i > int(manifest.loc[d, "dup_of"]) for d in dup_rows))
    first, second = tmp_path / "first.parquet", tmp_path / "second.parquet"
    rows.iloc[:split].to_parquet(first)
    rows.iloc[split:].to_parquet(second)
    data, killed = tmp_path / "data", tmp_path / "killed"
    finish(run_curate(first, data, world["config"]))
    alone = read_manifest(data).to_pandas()
    shutil.copytree(data, killed)
    refused = subprocess.run([LENSFORGE, "curate", "--urls", str(second), "--out", str(data), "--config",
                              str(world["config"])], capture_output=True, text=True)
    assert refused.returncode == 2 and "pass --add" in refused.stderr, refused.stderr[-2000:]

    add = ["--add"]
    finish(subprocess.Popen([*run_curate_cmd(second, data, world["config"]), *add], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True))
    both = read_manifest(data).to_pandas()
    shard = 20  # write_config's download.shard_size
    offset = -(-split // shard) * shard  # the added list starts at the next free shard
    assert list(both["key"]) == [f"{i:010d}" for i in [*range(split), *range(offset, offset + len(rows) - split)]]
    pd.testing.assert_frame_equal(both.iloc[:split].reset_index(drop=True), alone)  # old verdicts stand
    new = both.iloc[split:]
    assert (new["dup_of"].dropna() < f"{split:010d}").any()  # a copy of a row the first list kept points at it
    assert set(new["dup_of"].dropna()) <= set(alone.loc[alone["keep"], "key"]) | set(new["key"])

    proc = subprocess.Popen([*run_curate_cmd(second, killed, world["config"]), *add], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 240
    while not (killed / "download" / f"{offset // shard:05d}_stats.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finish(subprocess.Popen([*run_curate_cmd(second, killed, world["config"]), *add], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True))
    pd.testing.assert_frame_equal(read_manifest(killed).to_pandas(), both)
