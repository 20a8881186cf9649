"""`lensforge precompute` end to end on a small DATA (pixel codec, packaged MiniLM, Ray on loopback): shards,
errors, skipped keys, the stored features, the disk budget, and kill-and-resume equivalence; and on a tiny Lens
release (its FLUX.2 VAE and GPT-OSS, by the release's own paths)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch
import webdataset as wds
import yaml

from training.buckets import BucketTable
from training.cache_key import encoders_record
from training.precompute import precompute
from training.precompute_config import PrecomputeConfig
from training.precompute_plan import assign_buckets, caption_sources
from training.shard_format import check_encoders, read_encoders, read_index, read_sample, shard_paths

REPO = Path(__file__).resolve().parents[2]
SIZES = [(64, 64)] * 5 + [(96, 48)] * 3 + [(40, 80)] * 2 + [(16, 16)]
CORRUPT, UNCAPTIONED, TINY = 2, 3, 10
SECTION = {"variants": ["dense", "alt"], "shard_size": 2, "batch_size": 4, "decode_batch_size": 2,
           "buckets": {"base_sides": [32, 64], "ratios": ["1:2", "1:1", "2:1"]}}


def samples_of(set_dir) -> dict:
    return {s["key"]: s for s in map(read_sample, wds.WebDataset(shard_paths(set_dir), shardshuffle=False))}


def run_command(data: Path, config: Path) -> int:
    """`lensforge precompute --data DATA ... --config FILE --set precompute.shard_size=2`, in this process."""
    import argparse

    from pipelines.commands import precompute as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["--data", str(data), "--codec", "pixel", "--text-encoder", "minilm",
                              "--variants", "dense,alt", "--config", str(config), "--set", "precompute.shard_size=2"])
    return command.run(args)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ray_local, data_builder):
    """One run through the command line module (config file + --set), as a user would."""
    root = tmp_path_factory.mktemp("ref")
    data = data_builder(root / "data", SIZES, variants=("dense",), corrupt={CORRUPT}, uncaptioned={UNCAPTIONED})
    config = root / "lensforge.yaml"
    config.write_text(yaml.safe_dump({"precompute": {k: v for k, v in SECTION.items() if k != "shard_size"}}))
    assert run_command(data, config) == 0
    (set_dir,) = [p for p in (data / "shards").iterdir() if p.is_dir()]
    return data, set_dir


def test_shards_hold_every_captioned_decodable_image_readable_by_plain_webdataset(reference):
    data, set_dir = reference
    index = read_index(set_dir)
    samples = samples_of(set_dir)
    expected = {f"{i:010d}" for i in range(len(SIZES))} - {f"{CORRUPT:010d}", f"{UNCAPTIONED:010d}"}
    assert set(samples) == expected and index["samples"].sum() == len(expected)
    assert set(index["bucket"]) == {"64x64", "92x44", "24x44", "32x32"}
    assert (index["samples"] <= 2).all()
    for s in samples.values():
        w, h = (int(x) for x in s["meta"]["bucket"].split("x"))
        assert s["latent"].shape == (48, h // 4, w // 4) and s["latent"].dtype == torch.bfloat16
        assert set(s["text"]) == {"dense", "alt"} and s["meta"]["variants"] == ["dense", "alt"]
    assert samples[f"{TINY:010d}"]["meta"]["upscaled"] is True
    assert samples["0000000005"]["meta"]["crop"] == [0.0, 1.043, 96.0, 46.957]  # 96x48 → 92x44, centred


def test_corrupt_image_is_a_recorded_error_and_uncaptioned_keys_are_reported(reference):
    data, set_dir = reference
    errors = pd.read_parquet(set_dir / "errors.parquet")
    assert errors[["key", "stage"]].values.tolist() == [[f"{CORRUPT:010d}", "decode"]]
    assert "undecodable" in errors["error"].iat[0]
    summary = json.loads((data / "reports" / "precompute.json").read_text())
    assert summary["skipped"] == {"dense: not captioned by scene-parser (dense@test)": 1} and summary["errors"] == 1
    html = (data / "reports" / "buckets.html").read_text()
    assert "Samples per bucket" in html and f"{CORRUPT:010d}" in html and "not captioned" in html


def test_stored_text_is_the_encoders_unpadded_output(reference):
    from inference.text import load_text_encoder

    _, set_dir = reference
    samples = samples_of(set_dir)
    keys = sorted(samples)[:3]
    encoder = load_text_encoder("minilm")
    for variant in ("dense", "alt"):
        texts = [samples[k]["meta"]["captions"][variant] for k in keys]
        features, mask = encoder.encode(texts)
        for i, k in enumerate(keys):
            stored = samples[k]["text"][variant]
            assert stored.dtype == torch.bfloat16 and stored.shape == (int(mask[i].sum()), 768)
            torch.testing.assert_close(stored.float(), features[i][mask[i]], atol=0.03, rtol=0.02)
    empty = [k for k, s in samples.items() if s["meta"]["captions"]["alt"] == ""]
    assert empty and all(samples[k]["text"]["alt"].shape == (0, 768) for k in empty)


def test_encoders_json_is_the_cache_key_and_a_mismatch_is_refused(reference):
    data, set_dir = reference
    record = read_encoders(set_dir)
    assert record["codec"]["codec"] == "pixel" and record["text"]["layers"] == [2, 5]
    assert record["text"]["weights"] and record["buckets"]["sizes"] == ["24x44", "32x32", "44x24", "44x92",
                                                                         "64x64", "92x44"]
    check_encoders(set_dir, record)
    assert record["captions"] == {"dense": {"model": "scene-parser", "prompt_id": "dense@test"}}  # whose captions
    sources = caption_sources(data, SECTION["variants"])
    assert record == encoders_record(PrecomputeConfig(**SECTION), sources=sources)  # the configs: nothing loaded
    other = {**record, "text": {**record["text"], "dtype": "float8_e4m3fn", "layers": [5]}}
    with pytest.raises(ValueError, match=r"text\.dtype: 'bfloat16' in the shards, 'float8_e4m3fn' expected"):
        check_encoders(set_dir, other)


def test_a_tiny_lens_release_precomputes_by_its_own_paths(tmp_path, ray_local, data_builder):
    """`--codec flux2:LENS/vae --text-encoder gpt-oss:LENS`: the VAE directory, the release's text_encoder/ and
    tokenizer/, the transformer config's layers, the chat with the config's fixed date."""
    import argparse

    from inference.text import load_text_encoder
    from pipelines.commands import precompute as command
    from tests.inference.tiny_models import save_tiny_lens_release

    lens = save_tiny_lens_release(tmp_path / "lens", layers=(1, 4, 9, 23))
    data = data_builder(tmp_path / "data", [(64, 64)] * 3 + [(96, 48)] * 2)
    config = tmp_path / "lensforge.yaml"
    config.write_text(yaml.safe_dump({"precompute": {"buckets": {"base_sides": [64], "ratios": ["1:1", "2:1"]},
                                                     "batch_size": 4, "decode_batch_size": 2}}))
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["--data", str(data), "--codec", f"flux2:{lens}/vae", "--text-encoder",
                              f"gpt-oss:{lens}", "--config", str(config)])
    assert command.run(args) == 0
    (set_dir,) = [p for p in (data / "shards").iterdir() if p.is_dir()]
    record = read_encoders(set_dir)
    assert record["codec"]["channels"] == 32 and record["text"]["layers"] == [1, 4, 9, 23]
    assert record["text"]["template"]["date"] == PrecomputeConfig().text_date and record["text"]["tokenizer"]
    samples = samples_of(set_dir)
    assert len(samples) == 5
    encoder = load_text_encoder(f"gpt-oss:{lens}", date=PrecomputeConfig().text_date)
    for s in samples.values():
        w, h = (int(x) for x in s["meta"]["bucket"].split("x"))
        assert s["latent"].shape == (32, h // 8, w // 8)
        features, mask = encoder.encode([s["meta"]["captions"]["dense"]])
        stored = s["text"]["dense"]
        assert stored.shape == (int(mask.sum()), 128) and stored.shape[0] > 22  # the prompt + the chat's suffix
        torch.testing.assert_close(stored.float(), features[0][mask[0]], atol=0.03, rtol=0.02)


def test_no_captions_and_another_captioner_are_one_line_errors(tmp_path, ray_local, data_builder, capsys):
    """(The plan's first pass, Ray tasks over the manifest's parts, finds that nothing is captioned: Ray is up.)"""
    import shutil

    from pipelines import cli

    data = data_builder(tmp_path / "data", SIZES[:4])
    args = ["precompute", "--data", str(data), "--variants", "dense"]
    assert cli.main([*args, "--caption-model", "gpt-4.1"]) == 2  # DATA holds scene-parser's captions only
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nothing to encode" in err and "not captioned by gpt-4.1" in err
    shutil.rmtree(data / "captions")
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "run `lensforge caption` first" in err and "Traceback" not in err
    assert not (data / "shards").exists()  # refused before any set is made: the plan's folder is gone too


def test_disk_budget_refuses_before_encoding(tmp_path, ray_local, capsys, data_builder):
    data = data_builder(tmp_path / "data", SIZES[:4])
    cfg = PrecomputeConfig(**{**SECTION, "variants": ["dense"], "disk_budget_gb": 1e-6})
    with pytest.raises(ValueError, match="above disk_budget_gb 1e-06"):
        precompute(data, cfg)
    out = capsys.readouterr().out
    assert "/sample" in out and "padded to 512 tokens in fp32" in out
    assert not list((data / "shards").rglob("*.tar"))


def test_small_buckets_are_merged_into_the_nearest_ratio_or_dropped():
    table = BucketTable((64,), ("1:2", "1:1", "4:3", "2:1"), multiple=4)
    rows = pd.DataFrame({"key": [f"{i}" for i in range(9)],
                         "width": [64] * 5 + [80, 80, 128, 40], "height": [64] * 5 + [60, 60, 64, 80]})
    merged, changes = assign_buckets(rows, table, min_samples=3, policy="merge")
    assert Counter(merged["bucket"]) == {"64x64": 9}
    assert {c["bucket"]: c["into"] for c in changes} == {"44x92": "64x64", "72x56": "64x64", "92x44": "64x64"}
    dropped, changes = assign_buckets(rows, table, min_samples=3, policy="drop")
    assert len(dropped) == 5 and {c["action"] for c in changes} == {"dropped"}


KILLED_RUN = """
import json, sys
import training.precompute as P
from common.ray_runtime import init_ray
from training.precompute_config import PrecomputeConfig

def slow_disk():  # in each Ray worker: its first shard is finished at once, any later one after 30 s
    import time
    from training.precompute_output import ShardWriter
    finish, first = ShardWriter.finish, []
    def slow_finish(self):
        if first:
            time.sleep(30)  # the test kills the run meanwhile
        first.append(self.shard)
        return finish(self)
    ShardWriter.finish = slow_finish

init_ray(runtime_env={"worker_process_setup_hook": slow_disk})  # the encoder actors write the shards
P.precompute(sys.argv[1], PrecomputeConfig.model_validate(json.loads(sys.argv[2])))
"""


def test_kill_and_resume_gives_the_same_shards(tmp_path, reference, data_builder):
    _, ref_set = reference
    data = data_builder(tmp_path / "data", SIZES, variants=("dense",), corrupt={CORRUPT}, uncaptioned={UNCAPTIONED})
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(data), json.dumps(SECTION)],
                            cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    set_dir = data / "shards" / ref_set.name
    deadline = time.time() + 120
    try:
        while not list(set_dir.glob("*/*.done.json")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
    done = list(set_dir.glob("*/*.done.json"))
    assert len(done) == 1, err.decode()[-2000:]
    first_tar = Path(str(done[0]).replace(".done.json", ".tar"))
    stamp = first_tar.stat().st_mtime_ns

    precompute(data, PrecomputeConfig(**SECTION))
    assert first_tar.stat().st_mtime_ns == stamp  # the finished shard was not redone
    assert not list(set_dir.rglob("*.tmp"))
    pd.testing.assert_frame_equal(read_index(set_dir).drop(columns="bytes"),
                                  read_index(ref_set).drop(columns="bytes"))
    ours, theirs = samples_of(set_dir), samples_of(ref_set)
    assert ours.keys() == theirs.keys()
    for key, s in ours.items():
        assert s["meta"] == theirs[key]["meta"]
        assert torch.equal(s["latent"], theirs[key]["latent"])
        for v, feats in s["text"].items():  # batches differ after a resume: same values up to float noise
            torch.testing.assert_close(feats.float(), theirs[key]["text"][v].float(), atol=0.03, rtol=0.02)


def test_a_marker_is_honoured_only_while_its_tar_has_the_size_it_records(tmp_path):
    from training.precompute_output import marker_path, settle_shard, shard_done

    shard = "32x32/shard-000000.tar"
    (tmp_path / "32x32").mkdir()
    (tmp_path / shard).write_bytes(b"t" * 1024)
    marker_path(tmp_path, shard).write_text(json.dumps({"shard": shard, "plan": "p1", "bytes": 1024}))
    assert shard_done(tmp_path, shard, "p1") and not shard_done(tmp_path, shard, "p2")
    (tmp_path / shard).write_bytes(b"t" * 512)
    assert not shard_done(tmp_path, shard, "p1")
    assert settle_shard(tmp_path, shard, "p1") == (
        None, f"{tmp_path / shard} is 512 bytes, its done marker records 1,024")  # printed by the driver
    assert not list((tmp_path / "32x32").iterdir())  # the cut tar and its marker are gone: the shard is redone


def test_a_shard_cut_after_its_marker_was_written_is_redone_on_rerun(tmp_path, reference, capsys):
    data, ref_set = reference
    shutil.copytree(data, tmp_path / "data")
    set_dir = tmp_path / "data" / "shards" / ref_set.name
    tar = sorted(set_dir.glob("*/shard-*.tar"))[0]
    size, shard = tar.stat().st_size, f"{tar.parent.name}/{tar.name}"
    shards = len(list(ref_set.glob("*/*.done.json")))
    tar.write_bytes(tar.read_bytes()[:size // 2])
    capsys.readouterr()
    assert run_command(tmp_path / "data", data.parent / "lensforge.yaml") == 0
    out = capsys.readouterr().out
    assert f"precompute: {tar} is {size // 2:,} bytes, its done marker records {size:,}: redoing {shard}" in out
    assert f"{shards} shards, {shards - 1} already done" in out
    assert tar.stat().st_size == size and samples_of(set_dir).keys() == samples_of(ref_set).keys()
