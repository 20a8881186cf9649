"""Answers on disk the moment they arrive: one append-only journal per worker, compacted into Parquet parts.

    journal = Journal(data, run_id, worker, flush_rows=512)  # a worker's: append(rows) per answer, compact() per part
    report = replay(data)                                    # a rerun, first: what journals hold → parts

    DATA/captions/_journal/<run>-<worker>-<segment>.jsonl   one row a line: {"seq": n, <CAPTIONS_SCHEMA fields>}
    DATA/captions/part-<run>-<worker>-<segment>.parquet    the same rows, once the segment is compacted

Why: a Parquet part is written whole, so rows used to wait in memory for the next part (up to `flush_s`, 5 s) and a
kill lost answers that were already billed, which the rerun then asked and paid for again. Now each answer's rows
are appended to the worker's open segment before its request slot is reused; every `flush_rows` rows or `flush_s`
seconds the segment becomes a part. `_journal/` is a sidecar: readers of the table skip it (see schema.py).

Writes: each answer is ONE os.write() of whole lines on an O_APPEND descriptor, with no userspace buffer left to
flush. Once write() returns, the bytes are in the kernel's page cache, which a SIGKILL of the process cannot lose;
only a machine crash or a power cut can. fsync guards against those at most once per FSYNC_S (1 s: on an append
and from the ticker), not per line: an fsync is a disk flush (~1-10 ms), dearer than the answer's own client CPU,
and a crashed machine then loses at most the last second of answers.

Compaction, in this order so that a crash at any point loses nothing and duplicates nothing:
  1. the open segment's rows are written as part-<segment>.parquet (schema.write_part: temporary name, fsync,
     rename); the part's metadata names the segment and the seqs it holds;
  2. only then is the segment unlinked; the next answer opens segment + 1.
A crash between 1 and 2 leaves both: replay's dedupe key is (segment, seq), read from the parts' metadata, so it only
unlinks the segment. A crash during 1 leaves a hidden temporary file (ignored) and the whole segment, which replay
compacts. A torn last line (a write cut short by a crash or a full disk) is not a whole line: ignored and counted.
A writer holds an flock on its open segment, and a segment appears under its name only once locked: replay leaves
a locked segment alone (a live run is writing it).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pyarrow.parquet as pq

from captioning.schema import CAPTION_COLUMNS, LATER_COLUMNS, captions_dir, write_part

FSYNC_S = 1.0
META_SEGMENT = b"lensforge.journal.segment"  # part metadata: the segment it was compacted from
META_SEQS = b"lensforge.journal.seqs"  # ... and which of its lines it holds: JSON [[first, last], ...]


def journal_dir(data: str | Path) -> Path:
    return captions_dir(data) / "_journal"


def encode(seq: int, row: dict) -> bytes:
    created = row["created_at"]
    line = {"seq": seq, **{c: row.get(c) if c in LATER_COLUMNS else row[c] for c in CAPTION_COLUMNS},
            "created_at": created.isoformat() if created is not None else None}
    return (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def decode(line: bytes) -> tuple[int, dict] | None:
    """(seq, row) of one journal line; None when it is not one of ours (damaged)."""
    try:
        obj = json.loads(line)
        seq, row = obj["seq"], {c: obj.get(c) if c in LATER_COLUMNS else obj[c] for c in CAPTION_COLUMNS}
        if row["created_at"] is not None:
            row["created_at"] = datetime.fromisoformat(row["created_at"])
    except (ValueError, KeyError, TypeError):
        return None
    return (seq, row) if isinstance(seq, int) else None


def read_segment(raw: bytes) -> tuple[list[tuple[int, dict]], int]:
    """The whole lines of a segment as (seq, row), and how many lines were torn or damaged."""
    lines = raw.split(b"\n")
    entries, bad = [], 0
    for i, line in enumerate(lines):
        if not line:
            continue
        # Every line is written with its "\n": text after the last one is a write cut short, even if it parses.
        got = decode(line) if i < len(lines) - 1 else None
        if got is None:
            bad += 1
        else:
            entries.append(got)
    return entries, bad


def seq_ranges(seqs: list[int]) -> list[list[int]]:
    """[0, 1, 2, 5] → [[0, 2], [5, 5]]."""
    out: list[list[int]] = []
    for s in sorted(seqs):
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out


def part_metadata(segment: str, seqs: list[int]) -> dict[bytes, bytes]:
    return {META_SEGMENT: segment.encode(), META_SEQS: json.dumps(seq_ranges(seqs)).encode()}


def covered(parts: Path, segment: str) -> set[int]:
    """The seqs of `segment` that parts already hold (the replay dedupe key is (segment, seq))."""
    seqs: set[int] = set()
    for part in parts.glob(f"part-{segment}*.parquet"):
        meta = pq.read_schema(part).metadata or {}
        if meta.get(META_SEGMENT) == segment.encode():
            for first, last in json.loads(meta[META_SEQS]):
                seqs.update(range(first, last + 1))
    return seqs


class Journal:
    """One worker's answers: appended to its open segment as they come, compacted into one part per segment.
    Not thread-safe: one event loop."""

    def __init__(self, data: str | Path, run_id: str, worker: int, flush_rows: int, fsync_s: float = FSYNC_S):
        self.parts, self.dir = captions_dir(data), journal_dir(data)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.stem, self.flush_rows, self.fsync_s = f"{run_id}-{worker:03d}", flush_rows, fsync_s
        self.segment = 0
        self.rows: list[dict] = []  # the open segment's rows, all of them on disk in it: its part-to-be
        self.fd: int | None = None
        self.written = 0  # rows this writer journaled
        self.unsynced = False
        self.synced = self.compacted = time.monotonic()

    @property
    def name(self) -> str:
        return f"{self.stem}-{self.segment:05d}"

    def _open(self) -> int:
        # Created under a name replay does not look at, locked, then renamed: replay never sees it unlocked.
        tmp = self.dir / f".{self.name}.new"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.replace(tmp, self.dir / f"{self.name}.jsonl")
        return fd

    def append(self, rows: list[dict]) -> None:
        """Journal one answer's rows now, in one write(); then compact if `flush_rows` rows wait."""
        if not rows:
            return
        if self.fd is None:
            self.fd = self._open()
        view = memoryview(b"".join(encode(len(self.rows) + i, r) for i, r in enumerate(rows)))
        while view:  # a regular file takes it whole; a short write means the disk is full (the next one raises)
            view = view[os.write(self.fd, view):]
        self.rows.extend(rows)
        self.written += len(rows)
        self.unsynced = True
        if len(self.rows) >= self.flush_rows:
            self.compact()
        elif time.monotonic() - self.synced >= self.fsync_s:
            self.sync()

    def sync(self) -> None:
        if self.fd is not None and self.unsynced:
            os.fsync(self.fd)
        self.unsynced, self.synced = False, time.monotonic()

    def compact(self) -> Path | None:
        """The open segment → part-<segment>.parquet (written atomically), and only then the segment is dropped."""
        self.compacted = time.monotonic()
        if not self.rows:
            return None
        part = write_part(self.parts / f"part-{self.name}.parquet", self.rows,
                          part_metadata(self.name, list(range(len(self.rows)))))
        (self.dir / f"{self.name}.jsonl").unlink()
        os.close(self.fd)  # releases the lock; the segment is gone already
        self.fd, self.rows, self.segment, self.unsynced = None, [], self.segment + 1, False
        return part

    def close(self) -> None:
        """Compact what is left. If that fails the segment stays, for replay."""
        try:
            self.compact()
        finally:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None

    async def ticker(self, flush_s: float) -> None:
        """fsync at least every `fsync_s` and compact at least every `flush_s`, however slowly answers come."""
        while True:
            await asyncio.sleep(min(self.fsync_s, flush_s))
            if time.monotonic() - self.compacted >= flush_s:
                self.compact()
            elif time.monotonic() - self.synced >= self.fsync_s:
                self.sync()


@dataclass
class Replay:
    """What `replay` found: segments compacted and dropped, rows they added to parts, lines ignored, segments left."""

    segments: int = 0
    rows: int = 0
    torn: int = 0
    busy: int = 0  # locked by a live writer: another caption run on this DATA is writing them

    def message(self, data: str | Path) -> str | None:
        if not (self.segments or self.busy):
            return None
        text = (f"caption: replayed {self.rows} answer row(s) from {self.segments} journal segment(s) of an "
                f"interrupted run into {captions_dir(data)}")
        if self.torn:
            text += f"; {self.torn} torn line(s) ignored (cut mid-write)"
        if self.busy:
            text += f"; {self.busy} segment(s) in use by a running caption job left alone"
        return text


def _pending(parts: Path, segment: str, raw: bytes) -> tuple[list[tuple[int, dict]], int, set[int]]:
    """(entries no part holds yet, torn lines, seqs parts hold) of one segment's bytes."""
    entries, torn = read_segment(raw)
    done = covered(parts, segment)
    return [(s, r) for s, r in entries if s not in done], torn, done


def unreplayed_rows(data: str | Path) -> tuple[list[dict], int]:
    """Rows that journals hold and no part does yet, and the torn lines among them; reads only (for checks)."""
    rows, torn = [], 0
    folder = journal_dir(data)
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:  # compacted by its writer meanwhile
            continue
        todo, bad, _ = _pending(captions_dir(data), path.stem, raw)
        rows += [r for _, r in todo]
        torn += bad
    return rows, torn


def replay(data: str | Path) -> Replay:
    """Compact every journal segment an interrupted run left into parts, skipping the lines a part already holds,
    then drop the segments. Idempotent: a crash during replay is finished by the next one."""
    out, parts = Replay(), captions_dir(data)
    folder = journal_dir(data)
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                out.busy += 1
                continue
            if os.fstat(fd).st_nlink == 0:  # its writer compacted and dropped it between our glob and open
                continue
            with os.fdopen(os.dup(fd), "rb") as f:
                raw = f.read()
            todo, torn, done = _pending(parts, path.stem, raw)
            if todo:
                name = f"part-{path.stem}.parquet"
                if done or (parts / name).exists():  # never overwrite a part: name this one by its first seq
                    name = f"part-{path.stem}-{todo[0][0]:06d}.parquet"
                write_part(parts / name, [r for _, r in todo], part_metadata(path.stem, [s for s, _ in todo]))
            path.unlink()
            out.segments, out.rows, out.torn = out.segments + 1, out.rows + len(todo), out.torn + torn
        finally:
            os.close(fd)
    return out
