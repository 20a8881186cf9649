"""`lensforge curate`: a URL list in, an audited, filtered, deduplicated manifest out.

    lensforge curate --urls scenes/urls.parquet --out data --allow-hosts 127.0.0.1
    lensforge curate --urls more.parquet --out data --allow-hosts 127.0.0.1 --add   # a second list, deduplicated
                                                                                    # against what data kept

Every step works on parts (one per `download.shard_size` URLs) and is resumable: kill at any moment, rerun the same
command, only what is left is done. The driver holds lists of shards and per-shard summaries, never the rows.
  1. the URL list is read in record batches and cut into input shards (DATA/input/; keys stable: same list and row
     → same key); tasks key them and run the URL guard's static check (curation/input_shards.py);
  2. img2dataset on Ray → DATA/download/ (one download shard per input shard; finished shards whose files are whole
     are not downloaded again);
  3. one Ray actor pool filters shards → DATA/filtered/ (done shards with the same filter config and download are
     skipped);
  4. dedup over the rows every other filter kept, as a distributed shuffle (curation/dedup_job.py), per URL list;
  5. the manifest, one part per shard written by tasks (curation/manifest_writer.py), the funnel (printed + JSON)
     and DATA/reports/curation.html. A run that keeps nothing raises `NothingKeptError` after writing them, naming
     the check and the setting to change.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from common.atomic import write_json
from common.progress import progress_bar
from common.ray_runtime import init_ray, node_strategies
from curation.config import CurateConfig
from curation.dedup_job import run_dedup
from curation.download import download, download_stamp, ray_runtime_env, url_policy
from curation.funnel import format_funnel, funnel_hint, write_funnel_json
from curation.input_shards import cut, input_dir, list_shards, list_source, register
from curation.inputs import url_batches
from curation.manifest import manifest_dir
from curation.manifest_writer import write_manifest  # noqa: F401 — tests and fixtures write manifests with it
from curation.manifest_writer import write_manifest_parts
from curation.report import write_report
from curation.shard_filter import ShardFilter, filter_config_hash, shard_done


class NothingKeptError(ValueError):
    """A curate run kept no image (the manifest and reports are written): a user-fixable error, exit status 2."""


class Timings(dict):
    """Wall seconds per stage of this run (DATA/reports/timings.json; bench/curate.py reads it)."""

    @contextmanager
    def __call__(self, stage: str):
        started = time.perf_counter()
        yield
        self[stage] = round(time.perf_counter() - started, 3)

    def write(self, path: Path, **extra) -> None:
        write_json(path, {"seconds": dict(self), **extra})


def filter_shards(data: Path, cfg: CurateConfig, shards: list[str]) -> list[dict]:
    """Filter every downloaded shard not yet filtered with this config and download, on a pool of Ray actors."""
    import ray
    from ray.util import ActorPool

    cfg_hash = filter_config_hash(cfg)
    todo = [s for s in shards if not shard_done(data / "filtered", s, cfg_hash, download_stamp(data / "download", s))]
    if not todo:
        return []
    cpus = int(ray.available_resources().get("CPU", 1)) or 1
    n_actors = min(len(todo), cfg.models.actors if cfg.models.clip_model else cpus)
    actor_cls = ray.remote(num_cpus=1)(ShardFilter)
    pool = ActorPool([actor_cls.options(scheduling_strategy=s).remote(str(data), cfg)  # one per node in turn
                      for s in node_strategies(n_actors, per_actor=1)])
    stats = []
    for result in progress_bar(pool.map_unordered(lambda a, s: a.__call__.remote(s), todo), total=len(todo),
                               desc="filter", unit="shard"):
        stats.append(result)
    return stats


def curate(urls: str | Path, data: str | Path, cfg: CurateConfig, ray_address: str | None = None,
           add: bool = False) -> dict:
    """Curate `urls` into DATA (with `add`, as one more list of a DATA that holds others); returns the funnel."""
    data = Path(data)
    batches = url_batches(urls, cfg.url_col, cfg.caption_col)  # an unreadable or empty list, a missing url column:
    next(batches)                                              # one line now, before Ray starts (the first batch)
    batches.close()
    lists = register(data, urls, cfg.download.shard_size, add)  # a changed or unexpected list fails here, in one line
    timings = Timings()
    with timings("ray_init"):
        init_ray(ray_address, ray_runtime_env(cfg))
    with timings("input"):
        entry = cut(data, urls, next(x for x in lists if x.source == list_source(urls)), url_policy(cfg),
                    cfg.url_col, cfg.caption_col)
    lists = [entry if x.source == entry.source else x for x in lists]
    shards = list_shards(lists)
    print(f"curate: {sum(x.rows for x in lists):,} URLs in {len(shards)} shard(s) of {cfg.download.shard_size}"
          + (f", {len(lists)} lists" if len(lists) > 1 else ""))
    with timings("download"):
        downloaded = download(input_dir(data), data / "download", len(shards), cfg)
    with timings("filter"):
        filter_shards(data, cfg, downloaded)
    done = set(downloaded)
    generations = [[s for s in list_shards([x]) if s in done] for x in lists]
    with timings("dedup"):
        dup_files = run_dedup(data, cfg.dedup, generations, embeddings=cfg.models.clip_model is not None)
    dup_file_of = {s: path for gen, path in zip(generations, dup_files) for s in gen}
    with timings("manifest"):
        summary, sample = write_manifest_parts(data, shards, done, dup_file_of)
    timings.write(data / "reports" / "timings.json", rows=summary["total"], shards=len(shards),
                  downloaded=summary["total"] - summary["reject_reasons"]["unsafe_url"])
    print(format_funnel(summary))
    write_funnel_json(summary, data / "reports" / "funnel.json")
    report = write_report(data, sample, cfg, summary=summary)
    print(f"curate: manifest in {manifest_dir(data)}, report at {report}")
    hint = funnel_hint(summary, cfg)
    if summary["kept"] == 0:
        raise NothingKeptError(hint)
    if hint:
        print(hint)
    return summary
