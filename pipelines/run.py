"""`lensforge run PIPELINE.yaml`: curate → caption → precompute → train → sample → report, in order, each stage
skipped when its outputs are complete for the current config (`pipelines/stage_cache.py`).

    lensforge run configs/demo.yaml --set run.urls=scenes/urls.parquet --out my-run
    lensforge run my-pipeline.yaml --from train --until sample     # retrain and resample, data untouched

A crash anywhere is resumed by the same command: finished stages are skipped by their markers and the stage that
was interrupted resumes on its own (download shards, caption parts, shard sets and checkpoints are all
incremental). The data stages share one Ray runtime (local, or `run.ray_address`), shut down before training;
training runs in this process, or under torchrun when `run.nproc_per_node` > 1.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from common.data_lock import data_lock
from pipelines.config import load_section, read_yaml, save_resolved
from pipelines.run_config import STAGES, RunConfig
from pipelines.stage_cache import file_digest, is_done, mark_done, read_marker, stage_key

DATA_STAGES = ("curate", "caption", "precompute")


@dataclass
class Services:
    """Local servers some stages need, started only when such a stage runs (the demo's loopback web server for
    curate; its captioning endpoint, whose context yields the base URL, for caption)."""

    web: Callable[[], AbstractContextManager] | None = None
    captioner: Callable[[], AbstractContextManager[str]] | None = None


@dataclass
class Plan:
    config: str | None
    overrides: list[str]
    run: RunConfig
    data: Path
    train_dir: Path
    cfgs: dict = field(default_factory=dict)  # stage -> typed config
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def report(self) -> Path:
        return self.data / "report.html"


def stage_range(start: str | None, stop: str | None) -> list[str]:
    for name in (start, stop):
        if name is not None and name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    first, last = STAGES.index(start or STAGES[0]), STAGES.index(stop or STAGES[-1])
    if first > last:
        raise ValueError(f"--from {start} comes after --until {stop}")
    return list(STAGES[first:last + 1])


def make_plan(config: str | None, overrides: list[str], out: str | None = None, urls_key: str | None = None) -> Plan:
    """Every stage's typed config and cache key, before anything runs (a bad config fails here, in one line).
    The URL list is keyed by its bytes, or by `urls_key` (the demo's scene config: its URLs change port per run)."""
    run = load_section("run", config, overrides, out=out)
    root = Path(run.out)
    plan = Plan(config, overrides, run, Path(run.data) if run.data else root / "data",
                Path(run.train_dir) if run.train_dir else root / "run")
    cfgs = {s: load_section(s, config, overrides) for s in ("curate", "caption", "precompute", "train")}
    train_raw = (read_yaml(config).get("train") or {}) if config else {}
    set_in_train = {o.partition("=")[0].split(".")[1] for o in overrides if o.startswith("train.")}
    fill = {k: getattr(cfgs["precompute"], k) for k in ("codec", "text_encoder")
            if k not in train_raw and k not in set_in_train}
    cfgs["precompute"] = cfgs["precompute"].model_copy(update=caption_choice(cfgs["caption"], cfgs["precompute"]))
    if "buckets" not in train_raw and "buckets" not in set_in_train:
        fill["buckets"] = cfgs["precompute"].buckets
    if "encoders" not in set_in_train:
        fill["encoders"] = trained_captions(cfgs["precompute"]) | cfgs["train"].encoders
    cfgs["train"] = cfgs["train"].model_copy(update=fill)  # train reads what precompute wrote unless told
    plan.cfgs = cfgs

    if urls_key:
        urls = {"urls": urls_key}
    else:
        urls = {"urls": file_digest(run.urls) if run.urls and Path(run.urls).exists() else run.urls}
    upstream = ""
    for stage in STAGES:
        cfg = run.sample if stage == "sample" else cfgs.get(stage)
        plan.keys[stage] = upstream = stage_key(stage, cfg, upstream, **(urls if stage == "curate" else {}))
    return plan


def caption_choice(caption, precompute) -> dict:
    """Precompute reads the captions this pipeline's caption stage writes (its model, its presets' prompt_ids),
    unless its own section names them."""
    from captioning.presets import resolve_variants
    from training.caption_variants import split_variant

    model = caption.model or (caption.azure.deployment if caption.azure is not None else None)
    if model is None:
        return {}
    presets = resolve_variants(caption.variants, caption.prompt_file)
    bases = {split_variant(v)[0] for v in precompute.variants}
    prompts = {v: p.prompt_id for v, p in presets.items() if v in bases} | precompute.caption_prompts
    return {"caption_model": precompute.caption_model or model, "caption_prompts": prompts}


def trained_captions(precompute) -> dict:
    """`train.encoders` naming the captions precompute encodes (their model, and prompt_id where known), so that
    training takes the shard set of this pipeline's captioner when an older captioner's set is there too."""
    from captioning.schema import ALT_VARIANT
    from training.caption_variants import split_variant

    bases = sorted({split_variant(v)[0] for v in precompute.variants} - {ALT_VARIANT})
    if precompute.caption_model is None or not bases:
        return {}
    return {"captions": {v: {"model": precompute.caption_model} | (
        {"prompt_id": precompute.caption_prompts[v]} if v in precompute.caption_prompts else {}) for v in bases}}


def run_pipeline(config: str | None, overrides: list[str] | None = None, out: str | None = None,
                 start: str | None = None, stop: str | None = None, services: Services | None = None,
                 urls_key: str | None = None) -> Plan:
    plan = make_plan(config, overrides or [], out, urls_key)
    services = services or Services()
    stages = stage_range(start, stop)
    forced = start  # --from STAGE reruns that stage even when it is marked done
    ray_started = False
    print(f"run: stages {' → '.join(stages)}; data {plan.data}, run {plan.train_dir}")
    with data_lock(plan.data, "run"):  # one writer per DATA; its stages lock it again (reentrant)
        for stage in stages:
            key = plan.keys[stage]
            if stage != forced and is_done(plan.data, stage, key):
                print(f"run: {stage}: up to date (key {key}), skipped")
                continue
            previous = read_marker(plan.data, stage)
            why = "config changed" if previous else "not finished"
            print(f"run: {stage}: starting ({'--from' if stage == forced else why}; key {key})", flush=True)
            if stage in DATA_STAGES and not ray_started and stage != "caption":
                start_ray(plan)
                ray_started = True
            if stage == "train" and ray_started:
                stop_ray()
                ray_started = False
            began = time.time()
            summary = RUNNERS[stage](plan, services)
            mark_done(plan.data, stage, key, summary, time.time() - began)
            print(f"run: {stage}: done in {time.time() - began:.0f} s", flush=True)
    if ray_started:
        stop_ray()
    return plan


def start_ray(plan: Plan) -> None:
    """One Ray runtime for the data stages, with curate's worker setup (the URL guard) in its runtime env."""
    from curation.pipeline import ray_runtime_env
    from common.ray_runtime import init_ray

    init_ray(plan.run.ray_address, ray_runtime_env(plan.cfgs["curate"]))


def stop_ray() -> None:
    import ray

    ray.shutdown()


# --- the stages ---------------------------------------------------------------------------------------------


def run_curate(plan: Plan, services: Services) -> dict:
    from curation.pipeline import curate

    if not plan.run.urls:
        raise ValueError("curate needs a URL list: set run.urls (or --set run.urls=FILE), or start with --from caption")
    cfg = plan.cfgs["curate"]
    save_resolved(cfg, "curate", plan.data)
    with services.web() if services.web else contextlib.nullcontext():
        summary = curate(plan.run.urls, plan.data, cfg, ray_address=plan.run.ray_address)
    return {"rows": summary["total"], "kept": summary["kept"]}


def run_caption(plan: Plan, services: Services) -> dict:
    from captioning.pipeline import caption
    from pipelines.commands.caption import report_captions

    with services.captioner() if services.captioner else contextlib.nullcontext() as base_url:
        cfg = plan.cfgs["caption"]
        if base_url:
            cfg = cfg.model_copy(update={"base_url": base_url})
        if not cfg.model and cfg.azure is None:
            raise ValueError("no captioning model: set caption.model in the pipeline file")
        from captioning.client import probe_endpoint

        probe_endpoint(cfg, batch=cfg.batch_api)  # a closed port or a wrong path fails here, in one line
        save_resolved(cfg, "caption", plan.data)  # DATA/captions holds Parquet parts only
        if cfg.batch_api:
            from captioning import batch

            stats = batch.run_batch(plan.data, cfg) or {}
        else:
            stats = caption(plan.data, cfg)
    if stats.get("stopped"):
        raise RuntimeError(f"caption stopped early ({stats['stopped']}): raise caption.max_cost_usd and rerun")
    report_captions(plan.data)
    return {"outcomes": stats.get("outcomes", {}), "cost_usd": stats.get("cost_usd")}


def run_precompute(plan: Plan, services: Services) -> dict:
    from training.precompute import precompute

    set_dir = precompute(plan.data, plan.cfgs["precompute"], ray_address=plan.run.ray_address)
    return {"shard_set": str(set_dir)}


def run_train(plan: Plan, services: Services) -> dict:
    from inference.checkpoint import latest_step_dir, step_of

    cfg = plan.cfgs["train"]
    if plan.run.nproc_per_node == 1:
        from training.trainer import train

        result = train(cfg, plan.data, plan.train_dir, resume=True)
        step = result["step"]
    else:
        command = torchrun_command(plan)
        print("run: " + shlex.join(command), flush=True)
        subprocess.run(command, check=True)
        step = step_of(latest_step_dir(plan.train_dir))
    if step < cfg.max_steps:
        raise RuntimeError(f"training stopped at step {step} of {cfg.max_steps}; rerun to continue")
    return {"step": step, "checkpoint": str(latest_step_dir(plan.train_dir))}


def torchrun_command(plan: Plan) -> list[str]:
    """`torchrun ... -m pipelines.cli train` with the same pipeline file and overrides, resuming if it can."""
    train = plan.cfgs["train"]
    sets = [o for o in plan.overrides if o.startswith("train.")]  # `lensforge train` refuses other sections
    sets += [f"train.{k}={getattr(train, k)}" for k in ("codec", "text_encoder")]
    sets += [f"train.encoders={json.dumps(train.encoders)}"]  # JSON is YAML: --set parses it back
    if train.buckets is not None:
        sets += [f"train.buckets={train.buckets.model_dump_json()}"]
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={plan.run.nproc_per_node}",
               *plan.run.torchrun_args, "-m", "pipelines.cli", "train", "--data", str(plan.data),
               "--out", str(plan.train_dir), "--resume"]
    if plan.config:
        command += ["--config", plan.config]
    for override in sets:
        command += ["--set", override]
    return command


def run_sample(plan: Plan, services: Services) -> dict:
    from pipelines.sample import sample_grid

    return sample_grid(plan.train_dir, plan.run.sample, plan.cfgs["train"])


def run_report(plan: Plan, services: Services) -> dict:
    from pipelines.report import write_run_report

    return {"report": str(write_run_report(plan))}


RUNNERS: dict[str, Callable[[Plan, Services], dict]] = {
    "curate": run_curate, "caption": run_caption, "precompute": run_precompute,
    "train": run_train, "sample": run_sample, "report": run_report,
}
