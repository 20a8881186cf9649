"""Input shards: the URL lists of a DATA, cut into DATA/input/{shard}.parquet of `download.shard_size` rows.

    lists = register(data, urls, shard_size, add=False)   # DATA/input/_lists.json: which lists, from which shard
    record = cut(data, urls, lists[-1], policy)           # streams the list; Ray tasks key, guard and write shards

Shard i holds keys i·S … (i+1)·S − 1 (S = shard_size), so a key says its shard and every later part (download tar,
filtered part, manifest part) of a shard covers the same key range. A list's keys start at its first shard:
the first list at key 0, a list added later (`lensforge curate --add`) at the next free shard, so keys stay
stable: the same list and row give the same key on every rerun. The driver holds one record batch and one
shard's rows at a time; the URL guard's static check runs in the tasks.

A shard's columns: `lf_key`, `uri` (what is vetted and fetched: `iri_to_uri(url)`, "" when refused, so a refused
URL is never fetched even without the guard installed), `refused` (the guard's reason, or null), then the list's
columns: `url` (as given), `alt_text`, carried columns. img2dataset reads uri, alt_text and lf_key from the same
files (one input file per shard: its shard ids are ours), the manifest parts the rest.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from common.atomic import atomic_path, write_json
from common.storage import is_remote
from curation.inputs import file_size, url_batches, url_files
from curation.manifest import make_key
from curation.safety import UrlGuard, UrlPolicy, iri_to_uri

LISTS_FILE = "_lists.json"
RAW_DIR = "_cut"  # a shard's rows on their way to the task that guards and writes it
SHARD_DIGITS = 5  # img2dataset's oom_shard_count: 100,000 shards of shard_size rows
IN_FLIGHT_PER_CPU = 2  # shard-writing tasks queued per CPU: bounds the shards the object store holds


@dataclass
class UrlList:
    source: str  # the URL list's resolved path
    files: list  # [[name, bytes], ...]: a changed list is refused, not silently re-keyed
    first_shard: int
    shards: int | None = None  # None until the list is cut through
    rows: int | None = None


def input_dir(data: str | Path) -> Path:
    return Path(data) / "input"


def shard_name(i: int) -> str:
    return f"{i:0{SHARD_DIGITS}d}"


def shard_path(data: str | Path, shard: str) -> Path:
    return input_dir(data) / f"{shard}.parquet"


def read_lists(data: str | Path) -> tuple[int | None, list[UrlList]]:
    """(shard_size, the registered lists in key order); (None, []) for a new DATA."""
    path = input_dir(data) / LISTS_FILE
    if not path.is_file():
        return None, []
    record = json.loads(path.read_text())
    return record["shard_size"], [UrlList(**entry) for entry in record["lists"]]


def _save(data: str | Path, shard_size: int, lists: list[UrlList]) -> None:
    write_json(input_dir(data) / LISTS_FILE, {"shard_size": shard_size, "lists": [asdict(x) for x in lists]},
               fsync=True)


def _files(urls: str | Path) -> list:
    return [[p.name, file_size(p)] for p in url_files(urls)]


def list_source(urls: str | Path) -> str:
    """How the registry names a URL list: its absolute path, or its object-store URL."""
    return str(urls).rstrip("/") if is_remote(urls) else str(Path(urls).resolve())


def register(data: str | Path, urls: str | Path, shard_size: int, add: bool = False) -> list[UrlList]:
    """The lists of DATA with `urls` among them. A list already there is resumed (same keys); a new one needs
    `add` when DATA holds another, and starts at the next free shard. One-line errors for a changed list, a
    changed shard_size, or a list added before the previous one is cut through."""
    source, files = list_source(urls), _files(urls)
    size, lists = read_lists(data)
    if size is not None and size != shard_size:
        raise ValueError(f"{data} was cut into shards of {size} URLs; download.shard_size {shard_size} would change "
                         f"every key: set download.shard_size: {size}, or curate into a new --out")
    for entry in lists:
        if entry.source == source:
            if entry.files != files:
                raise ValueError(f"URL list {urls} changed since {data} was made from it (its files or their sizes "
                                 "differ): curate it into a new --out, or put the new rows in another file and add "
                                 "it with --add")
            return lists
    if lists and not add:
        raise ValueError(f"{data} holds a curate of {lists[0].source}; pass --add to add {urls} to it (deduplicated "
                         "against what is kept there), or curate it into a new --out")
    if lists and lists[-1].shards is None:
        raise ValueError(f"{data}: the URL list {lists[-1].source} was not cut through; rerun its curate first")
    first = lists[-1].first_shard + lists[-1].shards if lists else 0
    lists = [*lists, UrlList(source=source, files=files, first_shard=first)]
    _save(data, shard_size, lists)
    return lists


def write_shard(rows: pa.Table | str, first_key: int, path: str, policy: UrlPolicy) -> str:
    """One input shard: `rows` (url, alt_text, carried; or the path of a Parquet file of them, removed after) keyed
    from `first_key`, guarded, written atomically."""
    raw = None
    if isinstance(rows, str):
        raw, rows = rows, pq.read_table(rows)
    guard = UrlGuard(policy)
    uris = [iri_to_uri(u) for u in rows["url"].to_pylist()]
    refused = [guard.static_reason(u) for u in uris]
    own = {
        "lf_key": pa.array([make_key(first_key + i) for i in range(rows.num_rows)], pa.string()),
        "uri": pa.array(["" if r else u for u, r in zip(uris, refused)], pa.string()),
        "refused": pa.array(refused, pa.string()),
    }
    table = pa.Table.from_arrays([*own.values(), *rows.columns], names=[*own, *rows.column_names])
    with atomic_path(path, fsync=True) as tmp:
        pq.write_table(table, tmp)
    if raw:
        Path(raw).unlink(missing_ok=True)
    return path


def _cut_batches(urls: str | Path, url_col: str, caption_col: str, shard_size: int):
    """Yields (index of the shard in the list, its rows as one table), holding at most a shard and a batch."""
    pending, n, index = [], 0, 0
    for batch in url_batches(urls, url_col, caption_col):
        while batch.num_rows:
            take = min(batch.num_rows, shard_size - n)
            pending.append(batch.slice(0, take))
            batch, n = batch.slice(take), n + take
            if n == shard_size:
                yield index, pa.concat_tables(pending).combine_chunks()
                pending, n, index = [], 0, index + 1
    if n:
        yield index, pa.concat_tables(pending).combine_chunks()


def cut(data: str | Path, urls: str | Path, entry: UrlList, policy: UrlPolicy, url_col: str = "url",
        caption_col: str = "caption") -> UrlList:
    """Cut one registered list into its shards (a shard already written is not written again); Ray must be
    running. Returns the entry with its shard and row counts, saved in the registry."""
    import ray

    size, lists = read_lists(data)
    if entry.shards is not None and all(shard_path(data, shard_name(entry.first_shard + i)).is_file()
                                        for i in range(entry.shards)):
        return entry
    task = ray.remote(num_cpus=1)(write_shard)
    limit = IN_FLIGHT_PER_CPU * max(1, int(ray.available_resources().get("CPU", 1)))
    refs, rows, shards = [], 0, 0
    for index, table in _cut_batches(urls, url_col, caption_col, size):
        shard = entry.first_shard + index
        path = shard_path(data, shard_name(shard))
        rows, shards = rows + table.num_rows, shards + 1
        if path.is_file():
            continue
        # the rows travel to the task through a file on DATA, not Ray's object store: the driver's memory stays
        # one batch and one shard (objects it puts in the store count in its RSS and grew to ~2 GB at 10 M rows)
        raw = input_dir(data) / RAW_DIR / f"{shard_name(shard)}.parquet"
        with atomic_path(raw) as tmp:
            pq.write_table(table, tmp)
        refs.append(task.remote(str(raw), shard * size, str(path), policy))
        if len(refs) >= limit:
            _, refs = ray.wait(refs, num_returns=1)
    ray.get(refs)
    entry.shards, entry.rows = shards, rows
    _save(data, size, [entry if x.source == entry.source else x for x in lists])
    return entry


def list_shards(lists: list[UrlList]) -> list[str]:
    """Every input shard of the lists that are cut through, in key order."""
    return [shard_name(x.first_shard + i) for x in lists if x.shards for i in range(x.shards)]


def refusals(data: str | Path, shard: str) -> dict[str, str]:
    """key → the guard's reason, for the refused rows of one input shard."""
    table = pq.read_table(shard_path(data, shard), columns=["lf_key", "refused"])
    table = table.filter(table["refused"].is_valid())
    return dict(zip(table["lf_key"].to_pylist(), table["refused"].to_pylist()))
