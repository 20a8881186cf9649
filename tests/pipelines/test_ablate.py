"""`lensforge ablate caption-density` in miniature: three arms (`short`, `mixed`, `random-length`) and a sweep run
(`dense@4`) trained 4 steps at batch 8 on 32 scene shards, scored on 2 prompts per category with 2 sampling steps,
checkpoints every 2 steps for the time-matched view; then the rerun, a study whose checkpoints are gone, the
refusals and the variant syntax.
About 60 s on 2 cores."""

import csv
import json
import shutil

import pytest

from pipelines import cli
from pipelines.ablate import Variant, parse_variant, study_variants
from scenes.adherence import CATEGORIES

FAST = ["--per-category", "2", "--sample-steps", "2", "--eval-batch-size", "16",
        "--set", "train.data.batch_size=8", "--set", "train.data.holdout=0.25", "--set", "train.val.every=2",
        "--set", "train.val.samples=8", "--set", "train.checkpoint_every=4", "--set", "train.progress=false",
        "--set", "train.log_every=1"]
ARMS = ["--variants", "short,mixed,random-length", "--sweep-words", "4", "--time-every", "2"]


def ablate(data, out, *extra: str, steps: int = 4) -> int:
    """`lensforge ablate caption-density ...` in this process (only this command's parser is built)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "COMMAND_MODULES", ["ablate"])
        return cli.main(["ablate", "caption-density", "--data", str(data), "--out", str(out), "--steps", str(steps),
                         *FAST, *extra])


RATES = {"short": 1.0, "mixed": 2.0, "random-length": 4.0, "dense@4": 1.0}  # fake training seconds per step


@pytest.fixture(scope="module", autouse=True)
def fixed_clock():
    """Training seconds from RATES, not the wall clock: which arm is fastest, and which checkpoint the time-matched
    view reads, must not depend on how busy the machine is."""
    import pipelines.ablate

    real = pipelines.ablate.train_seconds
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipelines.ablate, "train_seconds",
                   lambda run: {step: RATES[run.name.rsplit("-s", 1)[0]] * step for step in real(run)})
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from scenes.shards import write_scene_shards

    root = tmp_path_factory.mktemp("ablate") / "data"
    write_scene_shards(root, {(32, 32): 32}, variants=("dense", "short", "dense@4"), shard_size=16)
    return root


@pytest.fixture(scope="module")
def study(data):
    out = data.parent / "study"
    assert ablate(data, out, *ARMS) == 0
    return out


def test_outputs_cover_every_arm_prompt_style_and_category(study):
    for name in ("results.csv", "results.md", "README.md", "adherence.png", "categories.png", "val_loss.png",
                 "sweep.png", "ablate.json", "config.train.yaml", "command.txt"):
        assert (study / name).is_file(), name
    rows = list(csv.DictReader((study / "results.csv").open()))
    assert {(r["variant"], r["prompts"], r["prompt_style"]) for r in rows} == {
        ("short", "dense", "dense"), ("short", "short", "short"),
        ("mixed", "dense", "dense"), ("mixed", "short", "short"), ("mixed", "own", "dense+short"),
        ("random-length", "dense", "dense"), ("random-length", "short", "short"),
        ("random-length", "own", "dense@random"),
        ("dense@4", "dense", "dense"), ("dense@4", "own", "dense@4")}
    for r in rows:
        assert all(r[c] != "" and float(r[f"{c}_low"]) <= float(r[c]) <= float(r[f"{c}_high"]) for c in CATEGORIES)
        assert r["chance"] != "" and float(r["final_val_loss_dense"]) > 0 and float(r["train_seconds"]) > 0
    words = {r["variant"]: float(r["words_per_caption"]) for r in rows}
    assert words["dense@4"] == 4.0 and words["short"] > 4 and words["random-length"] < words["mixed"]
    # One seed: the crossed bootstrap's mean is the run's own evaluation.
    own = json.loads((study / "runs" / "short-s0" / "adherence-short.json").read_text())
    assert float(next(r for r in rows if r["variant"] == "short" and r["prompts"] == "short")["overall"]) == \
        pytest.approx(own["overall"]["mean"], abs=1e-4)
    # Own prompts are drawn per prompt as the arm's captions were drawn in training.
    dense = [it["prompt"] for it in json.loads((study / "runs" / "mixed-s0" / "adherence-dense.json").read_text())
             ["items"]]
    short = [it["prompt"] for it in json.loads((study / "runs" / "mixed-s0" / "adherence-short.json").read_text())
             ["items"]]
    mixed = [it["prompt"] for it in json.loads((study / "runs" / "mixed-s0" / "adherence-own.json").read_text())
             ["items"]]
    assert all(m in (d, s) for m, d, s in zip(mixed, dense, short)) and set(mixed) & set(dense) and \
        set(mixed) & set(short)
    cut = [it["prompt"] for it in json.loads((study / "runs" / "random-length-s0" / "adherence-own.json")
                                              .read_text())["items"]]
    assert all(d.split()[:len(c.split())] == c.split() for c, d in zip(cut, dense))
    assert len({len(c.split()) for c in cut}) > 3  # lengths drawn per prompt
    four = json.loads((study / "runs" / "dense@4-s0" / "adherence-own.json").read_text())
    assert all(len(item["prompt"].split()) <= 4 for item in four["items"])
    # Time-matched: each arm slower than the fastest is read at its checkpoint nearest the fastest's time (random-
    # length, which encodes its cuts, is the slowest); then only the checkpoints the view reads stay.
    timed = {arm: list((study / "runs" / f"{arm}-s0").glob("adherence-dense-step*.json"))
             for arm in ("short", "mixed", "random-length")}
    assert sum(map(len, timed.values())) == 2 and len(timed["random-length"]) == 1
    record = json.loads(timed["random-length"][0].read_text())["settings"]
    fastest = min(json.loads((study / "runs" / f"{arm}-s0" / "trained.json").read_text())["seconds"] for arm in timed)
    assert record["step"] == 2 and record["time_limit"] == fastest
    assert sorted(p.name for p in (study / "runs" / "random-length-s0" / "checkpoints").iterdir()) == [
        "step_00000002", "step_00000004"]
    assert not list((study / "runs" / "dense@4-s0").glob("adherence-dense-step*.json"))
    # Every run validates on dense captions.
    config = json.loads((study / "runs" / "random-length-s0" / "config.json").read_text())["train"]
    assert config["data"]["captions"] == {"dense@random": 1.0} and config["val"]["captions"] == "dense"
    assert config["max_steps"] == 4 and config["seed"] == 0 and config["checkpoint_every"] == 2
    trained = json.loads((study / "runs" / "short-s0" / "trained.json").read_text())
    assert trained["steps"] == 4 and trained["seconds"] > 0
    markdown = (study / "results.md").read_text()
    assert all(c in markdown for c in CATEGORIES) and "Time-matched" in markdown and "Length sweep" in markdown
    assert "mixed − short" in markdown
    readme = (study / "README.md").read_text()
    assert "lensforge ablate caption-density --data" in readme and "--sweep-words 4" in readme
    assert "On dense prompts (adherence, then chance):" in readme
    # Each adherence cell carries its chance level, the CSV's.
    short = next(r for r in rows if r["variant"] == "short" and r["prompts"] == "dense")
    line = markdown.split("| short |")[1].split("\n")[0]
    assert f" / {float(short['chance']):.2f} | " in line
    assert f" | {float(short['overall']) - float(short['chance']):+.2f} (" in line  # above chance, item by item
    assert "Above chance on dense prompts: " in readme


def test_rerun_skips_finished_work_and_redoes_only_what_is_missing_or_changed(study, data, monkeypatch):
    import scenes.adherence
    import training.trainer

    evaluated = []
    original = scenes.adherence.evaluate
    monkeypatch.setattr(training.trainer, "train", lambda *a, **k: pytest.fail("a finished run was retrained"))
    monkeypatch.setattr(scenes.adherence, "evaluate", lambda *a, **k: evaluated.append(1) or original(*a, **k))
    before = (study / "runs" / "short-s0" / "adherence-dense.json").stat().st_mtime_ns
    lost = study / "runs" / "dense@4-s0" / "adherence-own.json"
    (study / "results.md").unlink()
    assert ablate(data, study, *ARMS, "--report-only", "--per-category", "3") == 0  # tables only: nothing scored
    assert not evaluated and (study / "results.md").is_file()
    assert "--report-only" not in (study / "command.txt").read_text()
    kept = json.loads(lost.read_text())
    lost.unlink()
    assert ablate(data, study, *ARMS) == 0
    assert len(evaluated) == 1  # only the deleted evaluation
    assert (study / "runs" / "short-s0" / "adherence-dense.json").stat().st_mtime_ns == before
    assert json.loads(lost.read_text())["overall"] == kept["overall"]  # sampling is seeded
    # More prompts: every model re-scored (3 arms × 3 or 2 sets, 2 time-matched, the sweep's 2), none retrained.
    assert ablate(data, study, *ARMS, "--per-category", "3") == 0
    assert len(evaluated) == 1 + (2 + 3 + 3) + 2 + 2
    assert len(json.loads(lost.read_text())["items"]) == 3 * len(CATEGORIES)


def test_a_study_copied_without_checkpoints_keeps_its_numbers(study, data, tmp_path, monkeypatch, capsys):
    import training.trainer

    copy = tmp_path / "copy"
    shutil.copytree(study, copy, ignore=shutil.ignore_patterns("checkpoints"))
    monkeypatch.setattr(training.trainer, "train", lambda *a, **k: pytest.fail("a finished run was retrained"))
    (copy / "runs" / "short-s0" / "adherence-dense.json").unlink()
    assert ablate(data, copy, *ARMS, "--per-category", "3") == 0
    out = capsys.readouterr().out
    assert "short-s0: no checkpoint at step 4 to evaluate (adherence-dense.json" in out
    assert (copy / "results.md").is_file()


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
    assert parse_variant("mixed").mix == {"dense": 0.5, "short": 0.5}  # Lens Fig. 4's 50/50, per draw
    assert parse_variant("random-length").mix == {"dense@random": 1.0}  # cut per draw by the trainer
    for bad in ("mix:dense", "mix:dense=0", "mix:dense=x", "mix:dense=1+dense=1", "dense@0", "mix:dense@0=1",
                "dense@15@random"):
        with pytest.raises(ValueError):
            parse_variant(bad)
    names = [v.name for v in study_variants("alt,dense,dense@15", [5, 15, 40])]
    assert names == ["alt", "dense", "dense@15", "dense@5", "dense@40"]  # a name given twice counts once
    assert [v.sweep for v in study_variants("alt,dense,dense@15", [5, 15, 40])] == [False, False, False, True, True]
    assert [v.name for v in study_variants("short", [8], sweep_base="short")] == ["short", "short@8"]


def test_each_arm_is_scored_on_dense_short_and_its_own_style():
    def own(name: str) -> dict | None:
        sets = parse_variant(name).prompt_sets()
        assert list(sets)[:2] == ["dense", "short"]
        return sets.get("own")

    assert own("dense") is None and own("short") is None  # their own style is one of the two
    assert own("alt") == {"style": "tags", "words": None, "own": None}
    assert own("dense@15") == {"style": "dense", "words": 15, "own": None}
    assert own("mixed")["own"] == [["dense", None, 0.5], ["short", None, 0.5]]
    assert own("random-length")["own"] == [["dense", "random", 1.0]]
    assert own("mix:short=0.7+alt=0.3")["own"] == [["short", None, 0.7], ["tags", None, 0.3]]
    assert Variant("x", {"my-preset": 1.0}).prompt_sets().keys() == {"dense", "short"}  # no scenes style
    assert parse_variant("dense@4", sweep=True).prompt_sets().keys() == {"dense", "own"}


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
