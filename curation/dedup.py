"""Dedup of `lensforge curate`: which copy of an image survives, and which key every other copy points at.

Per image, in the shard task beside the pixel scores, `pixel_filters.image_hashes(img)` gives the exact hash and
the pHash. Then once over every image that passed all other filters:

    dup_of = find_duplicates(keys, exact, phash_array(phashes), embeddings, rank, cfg.dedup)  # {dup key: kept key}

Three edge sources — identical pixels, pHash Hamming distance ≤ phash_max_distance, CLIP cosine > clip_threshold —
are joined into groups (connected components, so A~B and B~C put A, B, C together); each group keeps one copy and
every other member points straight at it (no chains).
"""

from __future__ import annotations

import numpy as np

from curation.config import DedupConfig

# CLIP pairs are searched in blocks of rows whose (rows, cluster) similarity matrix stays under this many floats.
_SIM_BLOCK_ELEMENTS = 2**25  # 128 MiB of float32


def phash_array(phashes: list[int]) -> np.ndarray:
    """64-bit pHashes, as signed (int64 two's complement, what image_hashes returns) or unsigned ints → (N,) int64
    holding the same 64 bits."""
    return np.array([int(v) % 2**64 for v in phashes], dtype=np.uint64).view(np.int64)


def find_duplicates(
    keys: list[str],
    exact: list[str] | None,
    phash: np.ndarray | None,
    embeddings: np.ndarray | None,
    rank: np.ndarray | None,
    cfg: DedupConfig,
    thumbs: np.ndarray | None = None,
    clip_pairs: np.ndarray | None = None,
) -> dict[str, str]:
    """{duplicate key: key of the kept copy} over N images; images without duplicates are absent.

    exact: N sha1 strings; phash: (N,) int64 or uint64; embeddings: (N, D) CLIP image embeddings (L2-normalised
    here if they are not); rank: (N,) higher is better (aesthetic or clip score; NaN = worst), used by keep="best".
    thumbs: (N, 8, 8, 3) uint8 thumbnails (pixel_filters.thumbnail); when given, a pHash pair counts only if
    no thumbnail value differs by more than cfg.phash_verify_max_diff.
    clip_pairs: (E, 2) index pairs already found by CLIP (dedup_spill, for embeddings that do not fit in memory).
    Kept copy: keep="first" → smallest key; keep="best" → highest rank, ties → smallest key.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(keys)
    if len(set(keys)) != n:
        raise ValueError("find_duplicates: keys must be unique")
    if n < 2:
        return {}
    edges = []  # (E, 2) int64 index pairs from each source
    if cfg.exact and exact is not None:
        edges.append(_equal_value_edges(np.asarray(exact, dtype=object)))
    if cfg.phash and phash is not None:
        pairs = phash_edges(np.asarray(phash), cfg.phash_max_distance)
        edges.append(pairs if thumbs is None else confirm_pairs(pairs, thumbs, cfg.phash_verify_max_diff))
    if cfg.clip and embeddings is not None:
        edges.append(clip_edges(embeddings, cfg.clip_threshold, cfg.cluster_size))
    if cfg.clip and clip_pairs is not None:
        edges.append(np.asarray(clip_pairs, np.int64).reshape(-1, 2))
    pairs = np.concatenate(edges) if edges else np.empty((0, 2), np.int64)
    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    kept = _kept_copy(np.asarray(keys), labels, rank if cfg.keep == "best" else None, cfg.keep)
    return {keys[i]: keys[kept[i]] for i in np.flatnonzero(kept != np.arange(n))}


def _kept_copy(keys: np.ndarray, labels: np.ndarray, rank: np.ndarray | None, keep: str,
               prefer: np.ndarray | None = None) -> np.ndarray:
    """(N,) index of the kept copy of each image's group (itself when it is kept). `prefer` (N,) bool: a group
    with preferred members keeps one of them (an incremental dedup's rows already kept by an earlier list)."""
    n = len(keys)
    if keep == "best" and rank is None:
        raise ValueError('dedup keep="best" needs a rank (e.g. aesthetic or clip score) per image')
    key_order = np.empty(n, np.int64)
    key_order[np.argsort(keys, kind="stable")] = np.arange(n)  # keys are zero-padded, so string order = row order
    if rank is None:
        worse = np.zeros(n)
    else:
        worse = -np.asarray(rank, dtype=np.float64)
        worse[np.isnan(worse)] = np.inf  # a missing score loses to any real one
    preferred = np.zeros(n, bool) if prefer is None else np.asarray(prefer, bool)
    order = np.lexsort((key_order, worse, ~preferred, labels))  # by group, preferred, best rank, smallest key
    first = np.r_[True, labels[order][1:] != labels[order][:-1]]
    keeper = np.empty(labels.max() + 1, np.int64)
    keeper[labels[order][first]] = order[first]
    return keeper[labels]


def _equal_value_edges(values: np.ndarray) -> np.ndarray:
    """Star edges joining every run of equal values to its first member: (E, 2), linear in N. None is skipped."""
    valid = np.flatnonzero(np.array([v is not None for v in values], dtype=bool))
    _, first_idx, inverse = np.unique(values[valid].astype(str), return_index=True, return_inverse=True)
    a, b = valid, valid[first_idx[inverse]]
    return np.stack([a[a != b], b[a != b]], axis=1).astype(np.int64)


def phash_edges(phash: np.ndarray, max_distance: int) -> np.ndarray:
    """(E, 2) index pairs with pHash Hamming distance ≤ max_distance, without comparing all pairs.

    Multi-index hashing: split the 64 bits into max_distance + 1 bands; by pigeonhole two hashes within the
    distance agree exactly on at least one band, so only pairs sharing a band value are compared. Identical hashes
    are joined first (star edges) and the search runs over distinct values. Uniform hashes give about
    N² · (d + 1) / 2^(64 / (d + 1)) candidates: cheap at d = 4 (13-bit bands), near all-pairs at d ≥ 16.
    """
    h = phash.view(np.uint64) if phash.dtype == np.int64 else phash.astype(np.uint64)
    uniq, first_idx, inverse = np.unique(h, return_index=True, return_inverse=True)
    found = [np.stack([np.arange(len(h)), first_idx[inverse]], axis=1)]
    bands = max_distance + 1
    widths = [64 // bands + (b < 64 % bands) for b in range(bands)]
    shift = 0
    for width in widths:
        band = (uniq >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        shift += width
        for a, b in _same_value_pairs(band):
            close = np.bitwise_count(uniq[a] ^ uniq[b]) <= max_distance
            found.append(np.stack([first_idx[a[close]], first_idx[b[close]]], axis=1))
    pairs = np.concatenate(found).astype(np.int64)
    return pairs[pairs[:, 0] != pairs[:, 1]]


def confirm_pairs(pairs: np.ndarray, thumbs: np.ndarray, max_diff: int) -> np.ndarray:
    """The (E, 2) pairs whose thumbnails (N, t, t, 3) differ nowhere by more than max_diff levels."""
    t = np.asarray(thumbs, dtype=np.int16).reshape(len(thumbs), -1)  # (N, t*t*3)
    worst = np.zeros(len(pairs), np.int16)
    for start in range(0, len(pairs), 65536):  # bounded memory: (chunk, t*t*3) int16
        a, b = pairs[start : start + 65536].T
        worst[start : start + 65536] = np.abs(t[a] - t[b]).max(axis=1)
    return pairs[worst <= max_diff]


def _same_value_pairs(values: np.ndarray):
    """Yields (a, b) index arrays covering every pair i < j with values[i] == values[j], one offset k at a time
    within each run of equal sorted values: memory O(N) per step, total work O(candidate pairs)."""
    order = np.argsort(values, kind="stable")
    v = values[order]
    starts = np.flatnonzero(np.r_[True, v[1:] != v[:-1]])
    sizes = np.diff(np.r_[starts, len(v)])
    end = np.repeat(starts + sizes, sizes)  # (N,) exclusive end of each sorted position's run
    k = 1
    active = np.flatnonzero(np.arange(len(v)) + k < end)  # sorted positions that have a partner k further on
    while active.size:
        yield order[active], order[active + k]
        k += 1
        active = active[active + k < end[active]]


def clip_edges(embeddings: np.ndarray, threshold: float, cluster_size: int) -> np.ndarray:
    """(E, 2) index pairs with cosine > threshold (Lens: 0.985), searched exactly inside k-means partitions.

    Up to cluster_size images form one partition (exact, all pairs). Above that, MiniBatchKMeans splits them into
    ceil(N / cluster_size) clusters and each is searched exactly (SemDeDup). The trade-off is recall: a pair whose
    two images fall on either side of a cluster boundary is never compared. At cosine > 0.985 (under 10° apart) the
    two nearly coincide, so few pairs straddle a boundary, but it is not zero; more, larger partitions raise
    recall at quadratic cost per partition.
    """
    x = np.asarray(embeddings, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # (N, D) unit rows
    labels = _partition(x, cluster_size)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.r_[True, labels[order][1:] != labels[order][:-1], True])
    found = [np.empty((0, 2), np.int64)]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        members = order[lo:hi]  # (m,) indices of one cluster
        a, b = _pairs_above(x[members], threshold)
        found.append(np.stack([members[a], members[b]], axis=1))
    return np.concatenate(found).astype(np.int64)


def _partition(x: np.ndarray, cluster_size: int, seed: int = 0) -> np.ndarray:
    """(N,) cluster id of each unit row: all zeros up to cluster_size rows, else MiniBatchKMeans labels."""
    n = len(x)
    if n <= cluster_size:
        return np.zeros(n, np.int64)
    from sklearn.cluster import MiniBatchKMeans

    k = -(-n // cluster_size)
    # The centroids are fit on a sample (k-means needs a few hundred points per centroid, not all N), then every
    # row is assigned to its nearest one.
    rng = np.random.default_rng(seed)
    sample = x[rng.choice(n, size=min(n, max(256 * k, 100_000)), replace=False)]
    km = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3, batch_size=4096).fit(sample)
    return km.predict(x).astype(np.int64)


def _pairs_above(x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Every (i, j), i < j, of unit rows x (m, D) with x_i · x_j > threshold; blocks of rows bound the memory."""
    m = len(x)
    rows = max(1, _SIM_BLOCK_ELEMENTS // max(m, 1))
    found_a, found_b = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for start in range(0, m, rows):
        sims = x[start : start + rows] @ x[start:].T  # (r, m - start): only columns at or after the block
        r, c = np.nonzero(sims > threshold)
        upper = c > r  # c indexes from `start`, so column c is row start + c: keep j > i
        found_a.append(start + r[upper])
        found_b.append(start + c[upper])
    return np.concatenate(found_a), np.concatenate(found_b)
