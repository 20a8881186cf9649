"""DATA, RUN and the URL list in object storage (`s3://bucket/prefix`) as well as on a path.

    files = list_files("s3://bucket/urls/", (".parquet",))      # [Remote(fs, path, size)]: read in place
    with mirrored("s3://bucket/data") as data:                  # a local working copy, synced with the bucket
        curate(urls, data, cfg)                                 # every stage works on the copy, unchanged

Why a working copy and not every file opened through the bucket: the stages rely on what a local filesystem gives
and an object store does not: rename (atomic writes, the manifest's folder swap), append (the caption journal,
fsynced before a request is paid for) and flock (one writer per DATA). So a stage runs on a local copy of DATA and
the copy is synced: `pull` on entry, `push` every LENSFORGE_SYNC_S seconds (30) from a thread and once on the way
out, error or not. A SIGKILL loses at most one interval of pushing, and nothing at all on the machine that keeps
the copy (the next run pushes it). A run on a fresh machine pulls the bucket and resumes from it: markers,
journals and parts mean there what they mean locally.

Sync rules (the state file `.lensforge-sync.json` in the copy records every file's local and remote size/mtime as
of the last sync):
- pull: a remote file is fetched when the copy lacks it, or when it changed remotely and not locally; a file gone
  remotely and unchanged locally is removed locally (another machine swapped the manifest). A local change wins.
- push: changed local files are uploaded oldest first (a part before the marker written after it), then files
  gone locally are deleted remotely. Temporaries, staging folders, the lock and the state stay local
  (`local_only`); the stage markers in .lensforge/ travel.
The URL list is read in place (pyarrow's streaming readers on the bucket's files), never copied.

Credentials and endpoint: pyarrow's S3 filesystem reads the AWS variables (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL,
AWS_DEFAULT_REGION, ...). The copy lives under LENSFORGE_CACHE (default ~/.cache/lensforge/data). On a cluster the
copy must be a path every node sees (LENSFORGE_CACHE on shared scratch), as DATA is today.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from common.data_lock import LOCK_FILE

SCHEMES = ("s3://",)  # what the tests cover; pyarrow also has gs:// and hdfs://
STATE = ".lensforge-sync.json"
TEMPORARY = (".tmp", ".new", ".old", ".pull")  # common/atomic.py's and the writers' own temporary names
CHUNK = 8 << 20  # bytes per read when copying to or from the bucket
SYNC_S = float(os.environ.get("LENSFORGE_SYNC_S", 30))


def is_remote(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(SCHEMES)


def filesystem(url: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, "bucket/prefix") of an object-store URL; a bad URL is a one-line ValueError."""
    try:
        fs, path = pafs.FileSystem.from_uri(url.rstrip("/"))
    except (pafs.ArrowInvalid, OSError) as err:  # ArrowInvalid is a ValueError; OSError: no such bucket, no creds
        raise ValueError(f"cannot open {url}: {str(err).splitlines()[0]}") from None
    return fs, path


@dataclass(frozen=True)
class Remote:
    """One file in object storage, named like a Path where the URL list's readers look (name, suffix)."""
    fs: pafs.FileSystem
    path: str
    size: int

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return os.path.splitext(self.name)[1]

    @property
    def parent(self) -> str:
        return f"s3://{self.path.rsplit('/', 1)[0]}"

    def open(self):
        """A seekable file (pyarrow's Parquet, CSV and JSON readers take it)."""
        return self.fs.open_input_file(self.path)

    def __str__(self) -> str:
        return f"s3://{self.path}"


def list_files(url: str, suffixes: tuple[str, ...]) -> list[Remote]:
    """The file at `url`, or the files directly under it with one of `suffixes` (sorted by name)."""
    fs, path = filesystem(url)
    try:
        info = fs.get_file_info(path)
        found = [info] if info.type != pafs.FileType.Directory else fs.get_file_info(pafs.FileSelector(path))
    except OSError as err:
        raise ValueError(f"cannot list {url}: {str(err).splitlines()[0]}") from None
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"URL list not found: {url}")
    if info.type == pafs.FileType.File:
        return [Remote(fs, path, info.size)]
    return sorted((Remote(fs, f.path, f.size) for f in found if f.type == pafs.FileType.File
                   and os.path.splitext(f.path)[1] in suffixes), key=lambda r: r.name)


def cache_dir(url: str) -> Path:
    """Where the working copy of `url` lives: LENSFORGE_CACHE/<bucket>/<prefix>-<hash of the URL>."""
    root = Path(os.environ.get("LENSFORGE_CACHE") or Path.home() / ".cache" / "lensforge" / "data")
    tag = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:8]
    return root / f"{url.split('://', 1)[1].strip('/').replace('/', '+')}-{tag}"


def _stamp(size: int, mtime_ns: int) -> list[int]:
    return [int(size), int(mtime_ns)]


def local_only(name: str) -> bool:
    """Temporaries (a kill leaves them half written), staging folders, the lock and the sync state stay local."""
    return name.endswith(TEMPORARY) or name.startswith((".tmp-", STATE)) or name == LOCK_FILE


def _local_files(root: Path) -> dict[str, list[int]]:
    """{relative posix path: [size, mtime_ns]} of the copy's files, `local_only` names (and what is under them)
    left out."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not local_only(d)]
        for name in filenames:
            if local_only(name):
                continue
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except FileNotFoundError:  # replaced or removed by the stage while we walk
                continue
            out[os.path.relpath(full, root).replace(os.sep, "/")] = _stamp(st.st_size, st.st_mtime_ns)
    return out


class Mirror:
    """A local working copy of an object-store folder (module docstring: the sync rules)."""

    def __init__(self, url: str, local: str | Path | None = None, push: bool = True):
        self.url = url.rstrip("/")
        self.fs, self.prefix = filesystem(self.url)
        self.local = Path(local) if local else cache_dir(url)
        self.pushes = push
        self._lock = threading.Lock()  # one sync at a time (the thread and the final push)
        self._state = self._read_state()

    def _read_state(self) -> dict:
        path = self.local / STATE
        if path.exists():
            state = json.loads(path.read_text())
            if state.get("url") == self.url:
                return state
        return {"url": self.url, "files": {}}  # rel: {"local": [size, mtime_ns], "remote": [size, mtime_ns]}

    def _save_state(self) -> None:
        tmp = self.local / f"{STATE}.{os.getpid()}.tmp"  # torchrun's ranks share a copy
        tmp.write_text(json.dumps(self._state))
        os.replace(tmp, self.local / STATE)

    def _remote_files(self) -> dict[str, list[int]]:
        bucket = self.prefix.split("/", 1)[0]
        if self.fs.get_file_info(bucket).type == pafs.FileType.NotFound:  # say so now, not at the first push
            raise FileNotFoundError(f"bucket {bucket!r} of {self.url} not found: create it first")
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.prefix, recursive=True, allow_not_found=True))
        except OSError as err:
            raise ValueError(f"cannot list {self.url}: {str(err).splitlines()[0]}") from None
        base = len(self.prefix) + 1
        return {i.path[base:]: _stamp(i.size, i.mtime_ns or 0) for i in infos if i.type == pafs.FileType.File}

    def pull(self) -> int:
        """Bring remote changes into the copy; returns the number of files fetched."""
        with self._lock:
            self.local.mkdir(parents=True, exist_ok=True)
            remote, local, known = self._remote_files(), _local_files(self.local), self._state["files"]
            fetched = 0
            for rel, rstamp in remote.items():
                seen, here = known.get(rel), local.get(rel)
                if seen is None and here is not None:
                    continue  # a local file never synced: the copy wins, push sends it
                if seen is not None and (here is None or here != seen["local"] or seen["remote"] == rstamp):
                    continue  # removed or changed here since the last sync (push sends that), or nothing new
                known[rel] = {"local": self._fetch(rel), "remote": rstamp}
                fetched += 1
            for rel in [r for r in known if r not in remote]:
                here = local.get(rel)
                if here is None or here == known[rel]["local"]:
                    if here is not None:
                        (self.local / rel).unlink()  # removed remotely, untouched here
                    del known[rel]
            self._save_state()
            return fetched

    def _fetch(self, rel: str) -> list[int]:
        target = self.local / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.pull")
        with self.fs.open_input_stream(f"{self.prefix}/{rel}") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
        os.replace(tmp, target)
        st = target.stat()
        return _stamp(st.st_size, st.st_mtime_ns)

    def push(self) -> int:
        """Send the copy's changes to the bucket; returns the number of files uploaded or deleted."""
        if not self.pushes:
            return 0
        with self._lock:
            local, known = _local_files(self.local), self._state["files"]
            changed = [rel for rel, stamp in local.items() if known.get(rel, {}).get("local") != stamp]
            done = 0
            for rel in sorted(changed, key=lambda r: (local[r][1], r)):  # oldest first: parts before markers
                try:
                    with open(self.local / rel, "rb") as src, self.fs.open_output_stream(f"{self.prefix}/{rel}") as dst:
                        shutil.copyfileobj(src, dst, CHUNK)
                except FileNotFoundError:  # removed by the stage since the walk: the next push deletes it
                    continue
                info = self.fs.get_file_info(f"{self.prefix}/{rel}")
                known[rel] = {"local": local[rel], "remote": _stamp(info.size, info.mtime_ns or 0)}
                done += 1
            for rel in [r for r in known if r not in local]:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.delete_file(f"{self.prefix}/{rel}")
                del known[rel]
                done += 1
            self._save_state()
            return done

    def __enter__(self) -> Path:
        self.pull()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lensforge-sync", daemon=True)
        self._thread.start()
        return self.local

    def _loop(self) -> None:
        while not self._stop.wait(SYNC_S):
            try:
                self.push()
            except Exception as err:  # a failed interval is retried by the next one and by the final push
                print(f"lensforge: sync to {self.url} failed, will retry: {str(err).splitlines()[0]}", flush=True)

    def __exit__(self, kind, err, tb) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.push()  # what is done is in the bucket, whether the stage finished or not
        except OSError as failed:
            message = f"cannot push {self.local} to {self.url}: {str(failed).splitlines()[0]}"
            if kind is None:
                raise OSError(message + " (rerun the command to push it)") from None
            print(f"lensforge: {message}", flush=True)  # the stage's own error is the one to report


@contextlib.contextmanager
def mirrored(location: str | Path, push: bool = True):
    """A local path for `location`: the path itself, or a synced working copy of an object-store URL."""
    if not is_remote(location):
        yield location
        return
    with Mirror(str(location), push=push) as local:
        yield str(local)
