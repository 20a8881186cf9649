"""Download with img2dataset on Ray: webdataset shards of the original bytes, incremental, guarded.

img2dataset does the downloading (its Ray distributor, its opt-out header handling, its incremental mode); lensforge
adds the URL guard (installed in every Ray worker by `worker_process_setup_hook`) and keeps img2dataset from
decoding: `disable_all_reencoding` stores the bytes as served, so a decompression bomb is caught by our header
check in the pixel-filter step instead of being decoded by OpenCV inside the downloader.

Output: DATA/download/{shard:05d}.tar (+ .parquet and _stats.json per finished shard, img2dataset's own files), and
DATA/download/_done/{shard}.json, ours: written when a finished shard is first seen whole, with the sizes of its tar
and parquet (curation/markers.py). A shard whose files are gone, cut or unreadable is removed and downloaded again.
"""

from __future__ import annotations

import hashlib
import tarfile
import threading
from collections import OrderedDict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from common.progress import progress_bar
from common.ray_runtime import QUIET_ENV
from curation.config import CurateConfig
from curation.input_shards import SHARD_DIGITS
from curation.markers import marker_path, read_marker, stale_reason, write_marker
from curation.safety import POLICY_ENV, UrlPolicy


TAR_INDEX_CACHE = 8  # tars whose member index stays in memory (a 10k-sample tar's index is ~1 MB)
_index_cache: OrderedDict[tuple, dict[str, tuple[int, int]]] = OrderedDict()

KEY_COLUMN = "lf_key"  # img2dataset reserves "key"; ours travels as an additional column (input_shards.py)
TAR_END = 2 * tarfile.BLOCKSIZE  # zero blocks that close every tar (tarfile then pads it to a 10 KiB record)


def url_policy(cfg: CurateConfig) -> UrlPolicy:
    return UrlPolicy(
        allow_hosts=tuple(cfg.allow_hosts), max_bytes=cfg.download.max_bytes, max_seconds=cfg.download.max_seconds
    )


def ray_runtime_env(cfg: CurateConfig) -> dict:
    """What every Ray worker of a curate job needs: the guard installed, the quiet environment."""
    return {
        "worker_process_setup_hook": "curation.safety.install_guard",
        "env_vars": {**QUIET_ENV, POLICY_ENV: url_policy(cfg).to_env()},
    }


def done_shards(download_dir: Path) -> list[str]:
    """Shard names (e.g. '00003') img2dataset finished: it writes `_stats.json` last. Unchecked: `verified_shards`."""
    return sorted(p.name.split("_")[0] for p in download_dir.glob("*_stats.json"))


def download_stamp(download_dir: Path, shard: str) -> str | None:
    """Which download of `shard` its files are (the filtered marker records it: a shard fetched again is filtered
    again); None before the shard is verified."""
    record = read_marker(marker_path(download_dir, shard))
    return record.get("stamp") if record else None


def _not_whole(download_dir: Path, shard: str) -> str | None:
    """Why a shard img2dataset finished is not whole, or None: a file missing, a tar without the end blocks every
    closed tar ends with (a cut one has none), a parquet whose footer does not read. It reads 1 KiB of the tar and
    the parquet's footer: cheap enough for every shard of a web-scale run."""
    tar, meta = download_dir / f"{shard}.tar", download_dir / f"{shard}.parquet"
    for path in (tar, meta):
        if not path.is_file():
            return f"{path.name} missing"
    size = tar.stat().st_size
    with open(tar, "rb") as f:
        f.seek(max(0, size - TAR_END))
        if size % tarfile.BLOCKSIZE or f.read() != bytes(TAR_END):
            return f"{tar.name} is cut ({size} bytes, without a tar's end blocks)"
    try:
        pq.read_metadata(meta)
    except (OSError, pa.ArrowException) as err:
        return f"{meta.name} unreadable ({str(err).splitlines()[0]})"
    return None


def _shard_problem(download_dir: Path, shard: str) -> str | None:
    """None when the shard's files are whole. Its marker (sizes) is written the first time they are found whole;
    img2dataset's `_stats.json` (start and end times) stamps which download the marker is for."""
    stamp = hashlib.sha256((download_dir / f"{shard}_stats.json").read_bytes()).hexdigest()[:16]
    marker = marker_path(download_dir, shard)
    record = read_marker(marker)
    if record is not None and record.get("stamp") == stamp:
        return stale_reason(record, download_dir)
    problem = _not_whole(download_dir, shard)
    if problem is None:
        write_marker(marker, {"shard": shard, "stamp": stamp}, download_dir, [f"{shard}.tar", f"{shard}.parquet"])
    return problem


def verified_shards(download_dir: Path, then: str = "downloading it again") -> list[str]:
    """The finished shards whose files are whole. Any other finished shard is removed, its `_stats.json` first (so
    img2dataset's incremental mode downloads it again), and the run says so: one line a shard, ending in `then`."""
    whole = []
    for shard in done_shards(download_dir):
        problem = _shard_problem(download_dir, shard)
        if problem is None:
            whole.append(shard)
            continue
        print(f"curate: download shard {shard}: {problem}; {then}")
        for name in (f"{shard}_stats.json", f"{shard}.tar", f"{shard}.parquet"):
            (download_dir / name).unlink(missing_ok=True)
        marker_path(download_dir, shard).unlink(missing_ok=True)
    return whole


def _watch(download_dir: Path, total: int, stop: threading.Event) -> None:
    """img2dataset's Ray distributor prints no progress; count finished shards instead."""
    with progress_bar(total=total, desc="download", unit="shard", initial=len(done_shards(download_dir))) as bar:
        while not stop.wait(0.5):
            bar.update(len(done_shards(download_dir)) - bar.n)
        bar.update(len(done_shards(download_dir)) - bar.n)


def download(input_folder: Path, download_dir: Path, n_shards: int, cfg: CurateConfig) -> list[str]:
    """Run img2dataset's Ray distributor over the input shards in `input_folder` (one file of at most shard_size
    rows each, so img2dataset's shard i is input shard i); finished shards whose files are whole are skipped on
    rerun, the others downloaded again. Returns the finished, whole shards.

    Ray must already be initialised with `ray_runtime_env(cfg)` (see curation.pipeline)."""
    from img2dataset import download as img2dataset_download

    verified_shards(download_dir)  # before img2dataset's incremental mode trusts the `_stats.json` files
    d = cfg.download
    total = max(1, n_shards)
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(download_dir, total, stop), daemon=True)
    watcher.start()
    try:
        img2dataset_download(
            url_list=str(input_folder),
            input_format="parquet",
            url_col="uri",  # what the guard vetted ("" when it refused the URL: never fetched)
            caption_col="alt_text",
            save_additional_columns=[KEY_COLUMN],
            output_folder=str(download_dir),
            output_format="webdataset",
            distributor="ray",
            processes_count=max(1, d.processes),
            thread_count=d.threads,
            number_sample_per_shard=d.shard_size,
            oom_shard_count=SHARD_DIGITS,
            timeout=int(max(1, d.timeout_s)),
            retries=d.retries,
            disable_all_reencoding=True,  # keep the served bytes; decoding happens in our filter step
            extract_exif=False,
            compute_hash="sha256",
            incremental_mode="incremental",
            user_agent_token=d.user_agent_token,
            disallowed_header_directives=list(d.disallowed_header_directives),
            enable_wandb=False,
        )
    finally:
        stop.set()
        watcher.join()
    return verified_shards(download_dir, then="rerun to download it again")


def tar_index(path: Path) -> dict[str, tuple[int, int]]:
    """member name → (data offset, size) of one download tar, from its headers; cached per file version."""
    stat = Path(path).stat()
    cache_key = (str(path), stat.st_mtime_ns, stat.st_size)  # a rewritten tar (a redone shard) is indexed anew
    if cache_key in _index_cache:
        _index_cache.move_to_end(cache_key)
        return _index_cache[cache_key]
    with tarfile.open(path) as tar:
        index = {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}
    _index_cache[cache_key] = index
    while len(_index_cache) > TAR_INDEX_CACHE:
        _index_cache.popitem(last=False)
    return index


def read_members(tar_path: Path, members: list[str]) -> dict[str, bytes]:
    """The bytes of `members` of one tar (absent members are left out), with one open of the file."""
    index = tar_index(tar_path)
    out = {}
    with open(tar_path, "rb") as f:
        for name in sorted(set(members) & set(index), key=lambda n: index[n][0]):  # sequential reads
            offset, size = index[name]
            f.seek(offset)
            out[name] = f.read(size)
    return out
