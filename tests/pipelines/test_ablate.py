"""`lensforge ablate caption-density` in miniature: two variants (`short`, and `dense@4` from --sweep-words) trained
4 steps at batch 8 on 32 scene shards, scored on 2 prompts per category with 2 sampling steps; then the rerun,
the refusals and the variant syntax. About 30 s on 2 cores."""

import csv
import json

import pytest

from pipelines import cli
from pipelines.ablate import Variant, parse_variant, study_variants
from scenes.adherence import CATEGORIES

FAST = ["--per-category", "2", "--sample-steps", "2", "--eval-batch-size", "16",
        "--set", "train.data.batch_size=8", "--set", "train.data.holdout=0.25", "--set", "train.val.every=2",
        "--set", "train.val.samples=8", "--set", "train.checkpoint_every=4", "--set", "train.progress=false"]


def ablate(data, out, *extra: str, steps: int = 4) -> int:
    """`lensforge ablate caption-density ...` in this process (only this command's parser is built)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "COMMAND_MODULES", ["ablate"])
        return cli.main(["ablate", "caption-density", "--data", str(data), "--out", str(out), "--steps", str(steps),
                         *FAST, *extra])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from scenes.shards import write_scene_shards

    root = tmp_path_factory.mktemp("ablate") / "data"
    write_scene_shards(root, {(32, 32): 32}, variants=("dense", "short", "dense@4"), shard_size=16)
    return root


@pytest.fixture(scope="module")
def study(data):
    out = data.parent / "study"
    assert ablate(data, out, "--variants", "short", "--sweep-words", "4") == 0
    return out


def test_outputs_cover_every_variant_and_category(study):
    for name in ("results.csv", "results.md", "README.md", "adherence.png", "val_loss.png", "words.png",
                 "sweep.png", "ablate.json", "config.train.yaml", "command.txt"):
        assert (study / name).is_file(), name
    rows = list(csv.DictReader((study / "results.csv").open()))
    assert {(r["variant"], r["prompts"], r["prompt_style"]) for r in rows} == {
        ("short", "dense", "dense"), ("short", "own", "short"), ("dense@4", "dense", "dense"),
        ("dense@4", "own", "dense@4")}
    for r in rows:
        assert all(r[c] != "" and float(r[f"{c}_low"]) <= float(r[c]) <= float(r[f"{c}_high"]) for c in CATEGORIES)
        assert r["chance"] != "" and float(r["final_val_loss"]) > 0
    words = {r["variant"]: float(r["words_per_caption"]) for r in rows}
    assert words["dense@4"] == 4.0 and words["short"] > 4  # every dense caption is longer than 4 words
    # One seed: the pooled table is the run's own evaluation.
    own = json.loads((study / "runs" / "short-s0" / "adherence-own.json").read_text())
    assert float(next(r for r in rows if r["variant"] == "short" and r["prompts"] == "own")["overall"]) == \
        own["overall"]["mean"]
    assert own["settings"]["style"] == "short" and len(own["items"]) == 2 * len(CATEGORIES)
    cut = json.loads((study / "runs" / "dense@4-s0" / "adherence-own.json").read_text())
    assert all(len(item["prompt"].split()) <= 4 for item in cut["items"])  # own prompts: dense cut to 4 words
    markdown = (study / "results.md").read_text()
    assert all(c in markdown for c in CATEGORIES) and "dense@4" in markdown
    readme = (study / "README.md").read_text()
    assert "lensforge ablate caption-density --data" in readme and "--sweep-words 4" in readme
    config = json.loads((study / "runs" / "dense@4-s0" / "config.json").read_text())["train"]
    assert config["data"]["captions"] == {"dense@4": 1.0} and config["max_steps"] == 4 and config["seed"] == 0


def test_rerun_skips_finished_work_and_redoes_only_what_is_missing_or_changed(study, data, monkeypatch):
    import scenes.adherence
    import training.trainer

    evaluated = []
    original = scenes.adherence.evaluate
    monkeypatch.setattr(training.trainer, "train", lambda *a, **k: pytest.fail("a finished run was retrained"))
    monkeypatch.setattr(scenes.adherence, "evaluate", lambda *a, **k: evaluated.append(1) or original(*a, **k))
    before = (study / "runs" / "short-s0" / "adherence-dense.json").stat().st_mtime_ns
    lost = study / "runs" / "dense@4-s0" / "adherence-own.json"
    kept = json.loads(lost.read_text())
    lost.unlink()
    assert ablate(data, study, "--variants", "short", "--sweep-words", "4") == 0
    assert len(evaluated) == 1  # only the deleted evaluation
    assert (study / "runs" / "short-s0" / "adherence-dense.json").stat().st_mtime_ns == before
    assert json.loads(lost.read_text())["overall"] == kept["overall"]  # sampling is seeded
    # More prompts: every model re-scored, none retrained.
    assert ablate(data, study, "--variants", "short", "--sweep-words", "4", "--per-category", "3") == 0
    assert len(evaluated) == 1 + 4
    assert len(json.loads(lost.read_text())["items"]) == 3 * len(CATEGORIES)


def test_a_missing_variant_is_one_line_with_the_precompute_command(study, data, capsys):
    assert ablate(data, data.parent / "other", "--variants", "short,alt") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "lacks caption variant(s) alt" in err
    assert f"lensforge precompute --data {data} --config" in err and "--variants dense,short,dense@4,alt" in err


def test_other_settings_in_the_same_out_are_refused(study, data, capsys):
    assert ablate(data, study, "--variants", "short", steps=5) == 2
    assert "other settings (steps differ" in capsys.readouterr().err


def test_variant_syntax():
    assert parse_variant("mix:dense=0.5+alt=0.5").mix == {"dense": 0.5, "alt": 0.5}
    assert parse_variant("mix:dense=0.5+alt=0.5").slug == "mix-dense=0.5+alt=0.5"
    assert parse_variant("dense@15").mix == {"dense@15": 1.0}
    for bad in ("mix:dense", "mix:dense=0", "mix:dense=x", "mix:dense=1+dense=1", "dense@0", "mix:dense@0=1"):
        with pytest.raises(ValueError):
            parse_variant(bad)
    names = [v.name for v in study_variants("alt,dense,dense@15", [5, 15, 40])]
    assert names == ["alt", "dense", "dense@15", "dense@5", "dense@40"]  # a name given twice counts once
    assert [v.name for v in study_variants("short", [8], sweep_base="short")] == ["short", "short@8"]


def test_each_variant_is_also_scored_in_its_own_caption_style():
    def sets(name: str) -> dict:
        return parse_variant(name).prompt_sets()

    assert sets("dense") == {"dense": ("dense", None)}
    assert sets("short") == {"dense": ("dense", None), "own": ("short", None)}
    assert sets("alt")["own"] == ("tags", None)
    assert sets("dense@15")["own"] == ("dense", 15)
    assert sets("mix:dense=0.5+alt=0.5") == {"dense": ("dense", None)}  # ties: the first, dense
    assert sets("mix:short=0.7+dense=0.3")["own"] == ("short", None)
    assert Variant("x", {"my-preset": 1.0}).prompt_sets() == {"dense": ("dense", None)}  # no scenes style


def test_runs_differ_only_in_their_captions(data):
    """Same recipe, seed and steps; the loader gives every variant the same images and the same caption dropouts
    (its draws depend on seed, step and shard set only), and the trainer's init and noise depend on the seed."""
    import torch

    from pipelines.ablate import run_config
    from pipelines.config import load_section
    from pipelines.demo import DEMO_CONFIG
    from training.loader import Loader, open_shard_set

    base = load_section("train", str(DEMO_CONFIG), ["train.data.batch_size=8", "train.data.caption_dropout=0.3"])
    cfgs = {name: run_config(base, parse_variant(name), seed=3, steps=10) for name in ("short", "dense@4")}
    dumps = [cfg.model_dump() for cfg in cfgs.values()]
    assert [d["data"].pop("captions") for d in dumps] == [{"short": 1.0}, {"dense@4": 1.0}]
    assert dumps[0] == dumps[1] and dumps[0]["seed"] == 3 and dumps[0]["max_steps"] == 10
    batches = [[loader.next_batch() for _ in range(3)] for loader in
               (Loader(open_shard_set(data, cfg), cfg) for cfg in cfgs.values())]
    for a, b in zip(*batches):
        assert a.keys == b.keys and torch.equal(a.latents, b.latents)
        assert [v is None for v in a.variants] == [v is None for v in b.variants]
        assert {v for v in a.variants if v} == {"short"} and {v for v in b.variants if v} == {"dense@4"}


def test_pooled_seeds_reproduce_the_evaluators_scores_and_chance():
    """One run pooled is the evaluator's own Result (chance recomputed from the stored items); two runs pool
    their items."""
    from PIL import Image

    from pipelines.ablate_report import pooled
    from scenes import render
    from scenes.adherence import prompt_set, score

    items = prompt_set(per_category=8)  # the tested attributes repeat: chance above 0
    images = [render(it.scene, size=32) if k % 3 else Image.new("RGB", (32, 32), "white")
              for k, it in enumerate(items)]  # two of three drawn right, one blank
    result = score(items, images)
    assert 0 < result.overall.mean < 1 and result.chance.mean > 0
    one = pooled([result.to_dict()])
    assert one.to_dict() | {"items": []} == result.to_dict() | {"items": []}
    two = pooled([result.to_dict(), result.to_dict()])
    assert [c.n for c in two.categories] == [16] * len(CATEGORIES)
    assert two.overall.mean == pytest.approx(result.overall.mean)
    assert two.chance.mean == pytest.approx(result.chance.mean)
