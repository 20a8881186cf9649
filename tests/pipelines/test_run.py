"""`lensforge run` end to end on tiny sizes, as a user runs it: a subprocess on configs/demo.yaml, with a scene web
server and the captioning endpoint on loopback, every stage for real (Ray, img2dataset, the openai client, Ray
Data, the trainer, sampling, the report).

The slow test kills `lensforge run` (SIGKILL to its process group) inside every stage in turn, reruns the same
command each time, and checks that the outputs equal an uninterrupted run's.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from safetensors.torch import load_file

from pipelines.run_config import STAGES
from pipelines.stage_cache import read_marker

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "demo.yaml"
TINY = [
    "scenes.n=48", "curate.download.shard_size=16", "curate.download.threads=4", "caption.concurrency=8",
    "caption.flush_rows=8", "precompute.shard_size=8", "train.max_steps=12", "train.checkpoint_every=4",
    "train.val.every=4", "train.val.samples=4", "train.data.batch_size=8", "train.deterministic=true",
    "train.progress=false", "run.sample.per_category=1", "run.sample.steps=4",
]


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """The scenes on a loopback web server and the captioning endpoint, for the whole module."""
    from captioning.endpoint import start_endpoint
    from pipelines.config import load_section
    from scenes import render_dataset, start_server

    web_dir = tmp_path_factory.mktemp("web")
    server, base_url = start_server(web_dir, host="127.0.0.1", port=0)
    render_dataset(load_section("scenes", str(CONFIG), TINY, base_url=base_url), web_dir)
    endpoint, endpoint_url = start_endpoint(host="127.0.0.1", port=0)
    yield [f"run.urls={web_dir / 'urls.parquet'}", f"caption.base_url={endpoint_url}"]
    endpoint.stop()
    server.shutdown()
    server.server_close()


def command(out: Path | str, services: list[str]) -> list[str]:
    sets = [arg for s in TINY + services if not s.startswith("scenes.") for arg in ("--set", s)]
    return [sys.executable, "-m", "pipelines.cli", "run", str(CONFIG), "--out", str(out), *sets]


def run_to_end(out: Path | str, services: list[str], env: dict | None = None) -> str:
    done = subprocess.run(command(out, services), cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def reference(tmp_path_factory, services):
    out = tmp_path_factory.mktemp("reference")
    return out, run_to_end(out, services)


def test_a_run_goes_from_urls_to_a_report_and_a_rerun_skips_every_stage(reference, services):
    out, stdout = reference
    data, run = out / "data", out / "run"
    for stage in STAGES:
        assert read_marker(data, stage)["stage"] == stage, stage
    assert read_marker(data, "train")["summary"]["step"] == 12
    assert (run / "samples" / "final" / "grid.png").exists()
    adherence = json.loads((run / "samples" / "final" / "adherence.json").read_text())
    assert set(adherence["categories"]) >= {"single_object", "counting", "position"}
    report = (data / "report.html").read_text()
    for heading in ("Curation", "Captions", "Training", "Samples", "Prompt adherence"):
        assert heading in report
    assert (data / "config.curate.yaml").exists() and (run / "config.json").exists()

    again = run_to_end(out, services)
    assert again.count("up to date") == len(STAGES), again


def test_from_reruns_a_finished_stage_and_until_stops(reference, services):
    out, _ = reference
    marker = read_marker(out / "data", "report")
    done = subprocess.run(command(out, services) + ["--from", "report", "--until", "report"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "run: report: starting (--from" in done.stdout
    assert read_marker(out / "data", "report")["finished"] >= marker["finished"]
    bad = subprocess.run(command(out, services) + ["--from", "sample", "--until", "train"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "comes after" in bad.stderr


# --- killed inside every stage ------------------------------------------------------------------------------

# Evidence that a stage is under way (so the kill lands inside it, not at its first line): a file it writes.
PROGRESS = {
    "curate": lambda data, run: list((data / "download").glob("*.tar")),
    "caption": lambda data, run: list((data / "captions").rglob("*.parquet")),
    "precompute": lambda data, run: list((data / "shards").rglob("*.done.json")),
    "train": lambda data, run: list((run / "checkpoints").glob("step_*")),
    "sample": lambda data, run: True,
    "report": lambda data, run: True,
}


def run_and_kill_inside(out: Path | str, services: list[str], stage: str, env: dict | None = None,
                        local: Path | None = None) -> str:
    """Start the run; SIGKILL its process group once `stage` has started and shows progress in `local` (OUT, or
    the working copy of an s3:// OUT). Returns stdout."""
    local = local or out
    proc = subprocess.Popen(command(out, services), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env=env)
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(f"run: {stage}: starting"):
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.time() + 300
    while not started.is_set() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    while started.is_set() and not PROGRESS[stage](local / "data", local / "run") and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    reader.join(timeout=10)
    text = "".join(lines)
    assert started.is_set(), f"{stage} never started:\n{text[-3000:]}"
    return text


def latest_captions(data: Path) -> dict:
    from captioning.schema import latest_captions as read

    table = read(data)
    return {(k, v): t for k, v, t in zip(table["key"].to_pylist(), table["variant"].to_pylist(),
                                         table["text"].to_pylist())}


def manifest_rows(data: Path) -> list:
    from curation.manifest import read_manifest

    table = read_manifest(data, columns=["key", "keep", "reject_reason"])
    return sorted(zip(*(table[c].to_pylist() for c in ("key", "keep", "reject_reason"))), key=str)


@pytest.mark.slow
def test_killed_inside_any_stage_the_same_command_finishes_with_the_same_outputs(reference, services, tmp_path):
    ref, _ = reference
    out = tmp_path / "killed"
    for stage in STAGES:
        text = run_and_kill_inside(out, services, stage)
        assert read_marker(out / "data", stage) is None, f"{stage} was marked done before the kill:\n{text}"
    run_to_end(out, services)

    assert manifest_rows(out / "data") == manifest_rows(ref / "data")
    assert latest_captions(out / "data") == latest_captions(ref / "data")
    ours = load_file(next((out / "run" / "checkpoints").glob("step_00000012/ema.safetensors")))
    theirs = load_file(next((ref / "run" / "checkpoints").glob("step_00000012/ema.safetensors")))
    for name, tensor in theirs.items():  # text features may differ in float noise after a resumed precompute
        torch.testing.assert_close(ours[name], tensor, rtol=1e-3, atol=1e-4)
    final = Path("run") / "samples" / "final"
    assert json.loads((out / final / "prompts.json").read_text())["prompts"] == \
        json.loads((ref / final / "prompts.json").read_text())["prompts"]
    assert (out / "data" / "report.html").exists()


def test_precompute_reads_the_caption_stage_s_captioner_and_its_key_says_so(tmp_path):
    from captioning.presets import PRESETS
    from pipelines.run import make_plan

    plan = make_plan(str(CONFIG), ["caption.model=cap-a"], out=str(tmp_path))
    pre = plan.cfgs["precompute"]
    assert pre.caption_model == "cap-a" and pre.caption_prompts["dense"] == PRESETS["dense"].prompt_id
    other = make_plan(str(CONFIG), ["caption.model=cap-b"], out=str(tmp_path))
    assert other.cfgs["precompute"].caption_model == "cap-b" and other.keys["precompute"] != plan.keys["precompute"]
    mine = make_plan(str(CONFIG), ["caption.model=cap-b", "precompute.caption_model=cap-a"], out=str(tmp_path))
    assert mine.cfgs["precompute"].caption_model == "cap-a"  # the section's own choice wins


def test_torchrun_gets_only_train_overrides_and_what_the_run_filled(tmp_path):
    import yaml

    from pipelines.config import load_section
    from pipelines.run import make_plan, torchrun_command

    sets = ["caption.model=cap-a", "run.nproc_per_node=2", "train.max_steps=3", "precompute.buckets.base_sides=[32]"]
    plan = make_plan(str(CONFIG), sets, out=str(tmp_path))
    command = torchrun_command(plan)
    overrides = [command[i + 1] for i, arg in enumerate(command) if arg == "--set"]
    assert all(o.startswith("train.") for o in overrides) and "train.max_steps=3" in overrides
    train = load_section("train", str(CONFIG), overrides, reads=("train",))  # what `lensforge train` will read
    assert train.buckets.base_sides == [32] and train.encoders["captions"]["dense"]["model"] == "cap-a"
    assert train == plan.cfgs["train"]
    assert yaml.safe_load(overrides[-1].partition("=")[2])["base_sides"] == [32]


@pytest.mark.slow
def test_a_run_on_object_storage_killed_on_one_machine_finishes_on_another_with_the_same_outputs(
        reference, services, tmp_path, bucket):
    """`--out s3://...` and an s3:// URL list (moto's server on loopback): killed inside precompute on machine A
    (its own working copy), the same command on machine B (a fresh copy) resumes from the bucket."""
    from common.storage import Mirror, cache_dir

    ref, _ = reference
    urls = next(s for s in services if s.startswith("run.urls=")).partition("=")[2]
    fs, path = pafs.FileSystem.from_uri(f"{bucket}/lists/urls.parquet")
    with fs.open_output_stream(path) as out:
        out.write(Path(urls).read_bytes())
    remote = [f"run.urls={bucket}/lists/urls.parquet", *(s for s in services if not s.startswith("run.urls="))]
    base = {**os.environ, "LENSFORGE_SYNC_S": "0.5"}

    machine_a = {**base, "LENSFORGE_CACHE": str(tmp_path / "machine-a")}
    copy = tmp_path / "machine-a" / cache_dir(f"{bucket}/run").name
    run_and_kill_inside(f"{bucket}/run", remote, "precompute", env=machine_a, local=copy)
    machine_b = {**base, "LENSFORGE_CACHE": str(tmp_path / "machine-b")}
    stdout = run_to_end(f"{bucket}/run", remote, env=machine_b)
    assert "run: curate: up to date" in stdout and "run: caption: up to date" in stdout, stdout[-3000:]

    out = tmp_path / "pulled"
    Mirror(f"{bucket}/run", out).pull()  # what the bucket holds, on a third machine
    assert manifest_rows(out / "data") == manifest_rows(ref / "data")
    assert latest_captions(out / "data") == latest_captions(ref / "data")
    ours = load_file(next((out / "run" / "checkpoints").glob("step_00000012/ema.safetensors")))
    theirs = load_file(next((ref / "run" / "checkpoints").glob("step_00000012/ema.safetensors")))
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-3, atol=1e-4)
    assert (out / "data" / "report.html").exists()
