import numpy as np
import pytest
from PIL import Image

from curation.config import DedupConfig
from curation.dedup import clip_edges, find_duplicates, phash_array, phash_edges
from curation.manifest import make_key
from curation.pixel_filters import decode, image_hashes

PIXEL_ONLY = DedupConfig(clip=False)


def hashes_of(images, to_bytes, **kw):
    pairs = [image_hashes(decode(to_bytes(im, **kw), 10**9)) for im in images]
    return [e for e, _ in pairs], phash_array([p for _, p in pairs])


def test_exact_and_resized_reencoded_near_duplicates(shapes, to_bytes):
    originals = [shapes(s, (480, 400)) for s in range(5)]
    copies = [
        originals[1],  # 5: the same file again → exact
        originals[3].resize((240, 200), Image.BICUBIC),  # 6: half size, JPEG q70 → pHash only
    ]
    exact, phash = hashes_of(originals + copies, to_bytes, quality=70)
    assert exact[5] == exact[1] and exact[6] != exact[3]
    keys = [make_key(i) for i in range(7)]
    assert find_duplicates(keys, exact, phash, None, None, PIXEL_ONLY) == {keys[5]: keys[1], keys[6]: keys[3]}
    no_phash = DedupConfig(clip=False, phash=False)
    assert find_duplicates(keys, exact, phash, None, None, no_phash) == {keys[5]: keys[1]}


def test_lossless_reencode_keeps_the_exact_hash(shapes, to_bytes):
    im = shapes(7, (64, 48))
    a, b = hashes_of([im, im], lambda x, **_: to_bytes(x, "PNG")), hashes_of([im], lambda x, **_: to_bytes(x, "BMP"))
    assert a[0][0] == b[0][0] and a[1][0] == b[1][0]


def test_phash_is_a_signed_int64_holding_imagehash_bits(shapes):
    import imagehash

    # The first bit compares the DC term with the median, so it is nearly always set: unsigned, nearly every
    # pHash would overflow an int64 column.
    hashes = []
    for seed in range(6):
        im = shapes(seed, (200, 160))
        _, p = image_hashes(np.asarray(im))
        assert p % 2**64 == int(str(imagehash.phash(im)), 16)
        hashes.append(p)
    assert all(-(2**63) <= p < 0 for p in hashes)
    values = [0, 1, 2**63, 2**64 - 1]
    signed = [0, 1, -(2**63), -1]
    assert phash_array(values).view(np.uint64).tolist() == values
    assert phash_array(signed).tolist() == signed


def _components(pairs: np.ndarray, n: int) -> set[frozenset]:
    parent = list(range(n))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b in pairs.tolist():
        parent[root(a)] = root(b)
    groups = {}
    for i in range(n):
        groups.setdefault(root(i), set()).add(i)
    return {frozenset(g) for g in groups.values() if len(g) > 1}


@pytest.mark.parametrize("max_distance", [0, 3, 8])
def test_multi_index_phash_matches_brute_force(max_distance):
    rng = np.random.default_rng(max_distance)
    u = rng.integers(0, 2**64 - 1, 600, dtype=np.uint64)
    for i in range(0, 200, 2):  # plant neighbours at distances 0..10
        flips = rng.choice(64, size=rng.integers(0, 11), replace=False)
        u[i + 1] = u[i] ^ np.bitwise_or.reduce(np.uint64(1) << flips.astype(np.uint64))
    brute = np.argwhere(np.triu(np.bitwise_count(u[:, None] ^ u[None, :]) <= max_distance, 1))
    got = phash_edges(u.view(np.int64), max_distance)
    assert (np.bitwise_count(u[got[:, 0]] ^ u[got[:, 1]]) <= max_distance).all()
    assert _components(got, len(u)) == _components(brute, len(u))


def _clustered_embeddings(rng, n_centres=8, per_centre=25, dim=32):
    """Well-separated groups (so k-means has real structure) of points ~0.9 cosine from their centre."""
    centres = rng.standard_normal((n_centres, dim))
    x = np.repeat(centres, per_centre, axis=0) * 4 + rng.standard_normal((n_centres * per_centre, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_clip_threshold_duplicates_across_a_multi_cluster_partition():
    rng = np.random.default_rng(0)
    x = _clustered_embeddings(rng)  # 200 rows
    base = list(range(0, 200, 10))  # 20 rows in all 8 centres get a near copy
    near = x[base] + 0.02 * rng.standard_normal((len(base), x.shape[1])) / np.sqrt(x.shape[1])
    far = x[base] + 0.5 * rng.standard_normal((len(base), x.shape[1])) / np.sqrt(x.shape[1])  # cos ≈ 0.9
    emb = np.concatenate([x, near, far]).astype(np.float32)
    cos_near = (near * x[base]).sum(1) / np.linalg.norm(near, axis=1)
    assert cos_near.min() > 0.985
    expected = {frozenset({b, 200 + j}) for j, b in enumerate(base)}
    for cluster_size in (10_000, 30):  # one partition; then ceil(240 / 30) = 8 k-means clusters
        assert _components(clip_edges(emb, 0.985, cluster_size), len(emb)) == expected
    keys = [make_key(i) for i in range(len(emb))]
    cfg = DedupConfig(exact=False, phash=False, cluster_size=30)
    dup_of = find_duplicates(keys, None, None, emb, None, cfg)
    assert dup_of == {keys[200 + j]: keys[b] for j, b in enumerate(base)}


def test_keep_first_vs_best_and_no_chains():
    # A chain by pHash: 0 ~ 1 (distance 3), 1 ~ 2 (distance 3), 0 and 2 six bits apart; 3 stands alone.
    h = np.array([0b000000, 0b000111, 0b111111, 2**40 - 1], dtype=np.uint64).view(np.int64)
    keys = ["k3", "k1", "k2", "k9"]  # keys need not follow positions
    exact = ["a", "b", "c", "d"]
    cfg = DedupConfig(phash_max_distance=3, clip=False)
    assert find_duplicates(keys, exact, h, None, None, cfg) == {"k3": "k1", "k2": "k1"}  # smallest key, no chain
    rank = np.array([0.1, 0.2, 0.9, 5.0])
    best = cfg.model_copy(update={"keep": "best"})
    assert find_duplicates(keys, exact, h, None, rank, best) == {"k3": "k2", "k1": "k2"}
    tie = np.array([0.9, np.nan, 0.9, 0.0])  # a tie goes to the smaller key; NaN ranks last
    assert find_duplicates(keys, exact, h, None, tie, best) == {"k3": "k2", "k1": "k2"}
    with pytest.raises(ValueError, match="needs a rank"):
        find_duplicates(keys, exact, h, None, None, best)


def test_sources_combine_and_edge_cases():
    keys = ["a", "b", "c", "d"]
    exact = ["x", "x", "y", None]  # a = b by pixels
    h = np.array([0, 2**20 - 1, (2**20 - 1) << 20, (2**20 - 1) << 40], dtype=np.int64)  # ≥ 20 bits apart
    emb = np.eye(4, dtype=np.float32)
    emb[3] = emb[2]  # c = d by CLIP
    assert find_duplicates(keys, exact, h, emb, None, DedupConfig()) == {"b": "a", "d": "c"}
    assert find_duplicates(["a"], ["x"], h[:1], None, None, DedupConfig()) == {}
    with pytest.raises(ValueError, match="unique"):
        find_duplicates(["a", "a"], ["x", "y"], h[:2], None, None, DedupConfig())


def test_thumbnails_veto_phash_pairs_that_are_not_copies():
    """Simple images share pHashes without being copies: two flat images with one object each in different
    colours collide under pHash; their thumbnails tell them apart, and a true re-encoded copy still joins."""
    from curation.pixel_filters import thumbnail

    def scene(color):
        img = np.full((256, 256, 3), 245, np.uint8)
        img[100:160, 100:160] = color
        return img

    red, blue = scene((215, 35, 35)), scene((40, 75, 220))
    copy = decode(_jpeg(red, 75), 2**26)
    imgs = [red, blue, copy]
    exact, phash = zip(*(image_hashes(i) for i in imgs))
    keys = [make_key(i) for i in range(3)]
    thumbs = np.stack([np.frombuffer(thumbnail(i), np.uint8) for i in imgs])
    cfg = DedupConfig(exact=False, clip=False, phash_max_distance=10)
    assert find_duplicates(keys, list(exact), phash_array(list(phash)), None, None, cfg) == {
        keys[1]: keys[0], keys[2]: keys[0]}  # pHash alone: red and blue are "the same"
    confirmed = find_duplicates(keys, list(exact), phash_array(list(phash)), None, None, cfg, thumbs=thumbs)
    assert confirmed == {keys[2]: keys[0]}


def _jpeg(img, quality):
    import io

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
