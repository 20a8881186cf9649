"""CLIP near-duplicate search for more embeddings than fit in memory: k-means partitions spilled to disk.

The same search as `dedup.clip_edges` (exact cosine search inside k-means partitions, SemDeDup-style), but the
embeddings are read twice as a stream of batches instead of held at once:
  1. a uniform sample of `sample_rows` rows (reservoir) fits MiniBatchKMeans with ceil(N / cluster_size) centroids;
  2. every batch is assigned to its nearest centroid and appended to that partition's files in `workdir`
     (`<c>.emb` float32 rows, `<c>.idx` int64 global indices);
  3. each partition is loaded alone and searched exactly.
Peak memory: one batch, the sample, and the largest partition (≈ cluster_size rows), not N rows.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

Batches = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]  # () -> iter of (idx (m,) int64, emb (m, D))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _reservoir(batches: Batches, size: int, seed: int) -> np.ndarray:
    """A uniform sample of at most `size` unit rows over all batches, in one pass (Algorithm R, vectorised)."""
    rng = np.random.default_rng(seed)
    sample: np.ndarray | None = None
    seen = 0
    for _, emb in batches():
        emb = _unit(emb)
        if sample is None:
            sample = np.empty((size, emb.shape[1]), np.float32)
        take = min(len(emb), max(0, size - seen))
        sample[seen : seen + take] = emb[:take]
        rest = emb[take:]
        slots = rng.integers(0, seen + take + np.arange(1, len(rest) + 1))  # row j replaces slot < its rank
        keep = slots < size
        sample[slots[keep]] = rest[keep]
        seen += len(emb)
    return np.empty((0, 0), np.float32) if sample is None else sample[: min(seen, size)]


def clip_edges_spilled(batches: Batches, n: int, threshold: float, cluster_size: int, workdir: str | Path,
                       sample_rows: int = 100_000, seed: int = 0) -> np.ndarray:
    """(E, 2) global index pairs with cosine > threshold, searched exactly inside spilled k-means partitions."""
    from sklearn.cluster import MiniBatchKMeans

    from curation.dedup import _pairs_above

    k = max(1, -(-n // cluster_size))
    sample = _reservoir(batches, max(sample_rows, 256 * k), seed)
    if len(sample) == 0:
        return np.empty((0, 2), np.int64)
    km = MiniBatchKMeans(n_clusters=min(k, len(sample)), random_state=seed, n_init=3, batch_size=4096).fit(sample)
    workdir = Path(workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    for idx, emb in batches():
        emb = _unit(emb)
        labels = km.predict(emb)
        for c in np.unique(labels):
            rows = labels == c
            with open(workdir / f"{c}.emb", "ab") as f:
                f.write(emb[rows].tobytes())
            with open(workdir / f"{c}.idx", "ab") as f:
                f.write(np.asarray(idx, np.int64)[rows].tobytes())
    found = [np.empty((0, 2), np.int64)]
    dim = sample.shape[1]
    for part in sorted(workdir.glob("*.idx")):
        members = np.fromfile(part, np.int64)  # (m,) global indices of one partition
        x = np.fromfile(part.with_suffix(".emb"), np.float32).reshape(len(members), dim)
        a, b = _pairs_above(x, threshold)
        found.append(np.stack([members[a], members[b]], axis=1))
    shutil.rmtree(workdir, ignore_errors=True)
    return np.concatenate(found)
