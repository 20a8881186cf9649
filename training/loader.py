"""The training loader: shards → bucket-homogeneous micro-batches, deterministic from (seed, rank, step).

    shards = open_shard_set("data", cfg)                 # refuses other encoders or buckets, or a cut tar, by name
    loader = Loader(shards, cfg, rank=0, world=2)         # Loader(..., state=saved) resumes at a saved position
    batch = loader.next_batch()                           # Batch(bucket, latents (B, C, h, w), text (B, L, D), mask)
    for batch in prefetch(loader, depth=4): ...           # the same batches, prepared by a background thread

Each step every rank draws its own bucket from an RNG seeded by (seed, rank, step), with probability ∝ the bucket's
samples / its batch size (every sample is then seen at the same rate); so ranks may train different resolutions in
the same step (Lens stage 2), with per-base-area batch sizes so that their steps take about as long.

A bucket's stream, per rank: epoch e visits the bucket's shards in an order seeded by (seed, bucket, e), the rank
taking every world-th shard (or, with fewer shards than ranks, every world-th sample of each shard); within a shard a
seeded shuffle buffer mixes the samples. Its position is (epoch, shard, samples taken from that shard): resuming
replays at most one shard's worth of raw records (undecoded) to get back to the same place.
"""

from __future__ import annotations

import copy
import hashlib
import queue
import random
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import webdataset as wds

from inference.config import ModelConfig
from training.buckets import LENS_BASE_SIDES, LENS_RATIOS, BucketTable
from training.cache_key import encoder_mismatches, training_key
from training.caption_cut import CaptionCut, draw_cut
from training.caption_variants import stored_variant, truncated
from training.shard_format import (
    ENCODERS_FILE,
    REDO,
    dict_diff,
    read_done,
    read_encoders,
    read_index,
    read_sample,
    tar_mismatch,
)
from training.train_config import TrainConfig


def seed_of(*parts) -> int:
    """A 63-bit seed from any tuple of ints and strings (stable across processes, unlike `hash`)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def held_out(key: str, fraction: float) -> bool:
    """Whether a key belongs to the validation hold-out: a fixed fraction of keys, chosen by hash."""
    return fraction > 0 and int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32 < fraction


# --- the shard set (its cache key: training/cache_key.py) -------------------------------------------------------------


@dataclass(frozen=True)
class BucketShards:
    name: str  # "WxH"
    base: int
    width: int
    height: int
    shards: tuple[str, ...]  # absolute tar paths, index order
    samples: int


@dataclass
class ShardSet:
    root: Path
    encoders: dict
    buckets: dict[str, BucketShards]

    @property
    def samples(self) -> int:
        return sum(b.samples for b in self.buckets.values())


def shard_set_candidates(root: Path, shard_set: str | None) -> list[Path]:
    """The shard sets to consider: `root` itself when it is one, DATA/shards/<shard_set> when named, else every set."""
    if (root / ENCODERS_FILE).is_file():
        return [root]
    if shard_set:
        return [root / "shards" / shard_set]
    return sorted(p.parent for p in (root / "shards").glob(f"*/{ENCODERS_FILE}"))


def open_shard_set(data: str | Path, cfg: TrainConfig, model: ModelConfig | None = None,
                   any_encoders: bool = False) -> ShardSet:
    """DATA (or DATA/shards/<set_id>) → the shard set this config can train on; ValueError saying what differs.
    `model`: when not the config's preset (init_from's); `any_encoders`: any codec and text encoder whose shapes
    fit `model` (a bare transformer, which names neither)."""
    model = model or cfg.model_config_resolved()
    root = Path(data)
    candidates = shard_set_candidates(root, cfg.data.shard_set)
    if not candidates:
        raise FileNotFoundError(f"no shard set under {root / 'shards'}: run `lensforge precompute --data {root}`")
    expected = training_key(cfg, encoders=not any_encoders)  # fingerprints the weights once, for every candidate
    records = {c: read_encoders(c) for c in candidates}
    found = {c: encoder_mismatches(r, cfg, model, expected) + bucket_mismatches(r, cfg) for c, r in records.items()}
    good = [c for c, problems in found.items() if not problems]
    if not good:
        why = " | ".join(f"{c.name}: {'; '.join(p)}" for c, p in found.items())
        raise ValueError(f"refusing shards whose encoders.json differs from this config ({why})")
    if len(good) > 1:
        raise ValueError(f"several shard sets fit this config ({', '.join(c.name for c in good)}): "
                         "choose one with train.data.shard_set")
    set_dir = good[0]
    encoders, index = records[set_dir], read_index(set_dir)
    factor = int(encoders.get("codec", {}).get("factor", 1))
    for shard in index["shard"]:
        check_shard(set_dir / shard)
    buckets = {}
    for name, rows in index.groupby("bucket", sort=True):
        width, height = (int(v) for v in str(name).split("x"))
        if (width // factor) % model.patch or (height // factor) % model.patch:
            raise ValueError(f"bucket {name}: latent sides are not multiples of the model's patch {model.patch}")
        buckets[str(name)] = BucketShards(str(name), int(rows["base"].iloc[0]), width, height,
                                          tuple(str(set_dir / p) for p in rows["shard"]), int(rows["samples"].sum()))
    if not buckets:
        raise ValueError(f"shard set {set_dir} has no samples")
    return ShardSet(set_dir, encoders, buckets)


def bucket_mismatches(encoders: dict, cfg: TrainConfig) -> list[str]:
    """Where the shards' bucket table differs from the one `train.buckets` names ([] when it names none). Its
    `multiple` unset means the codec's, which the codec comparison already covers: the shards' is taken then."""
    if cfg.buckets is None:
        return []
    found = encoders.get("buckets", {})
    named = BucketTable(cfg.buckets.base_sides or LENS_BASE_SIDES, cfg.buckets.ratios or LENS_RATIOS,
                        cfg.buckets.multiple or found.get("multiple", 1)).identity()
    fields = ("base_sides", "ratios", "multiple")  # the sizes follow from these three
    return dict_diff({k: found.get(k) for k in fields}, {k: named[k] for k in fields}, "buckets")


def check_shard(tar: Path) -> None:
    """Refuse a shard whose tar is gone or cut (not the size its done marker records) before training starts."""
    if not tar.is_file():
        why = f"{tar} is missing"
    else:  # a set without markers (made by hand, or by scenes/shards.py) has only the tar to check
        record = read_done(tar)
        why = tar_mismatch(tar, record) if record is not None else None
    if why:
        raise ValueError(f"shard {why} (changed since precompute wrote it): rerun `lensforge precompute` with the "
                         "same settings to redo it")


# --- one bucket's endless stream, for one rank --------------------------------------------------------------------


def raw_samples(path: str) -> Iterator[dict]:
    """The records of one tar, undecoded (webdataset: `__key__` plus one bytes value per member); a tar that
    cannot be read to its end is a ValueError naming it."""
    try:
        yield from wds.DataPipeline(wds.SimpleShardList([path]), wds.tarfile_to_samples())
    except tarfile.TarError as err:  # webdataset appends the stream and the URL to tarfile's own message
        reason = str(err.args[0] if err.args else err).partition(" @ ")[0]
        raise ValueError(f"shard {path} is truncated or corrupt (tar: {reason}); {REDO}") from None


class BucketStream:
    def __init__(self, bucket: BucketShards, rank: int, world: int, seed: int, buffer: int,
                 keep: Callable[[str], bool], state: dict | None = None):
        self.bucket, self.rank, self.world, self.seed, self.buffer, self.keep = bucket, rank, world, seed, buffer, keep
        state = state or {}
        self.epoch, self.shard, self.taken = state.get("epoch", 0), state.get("shard", 0), state.get("taken", 0)
        self._iter = self._samples()

    def state(self) -> dict:
        return {"epoch": self.epoch, "shard": self.shard, "taken": self.taken}

    def __next__(self) -> dict:
        return next(self._iter)

    def share(self, epoch: int) -> tuple[list[str], int]:
        """(this rank's shards of the epoch in order, sample stride): every world-th shard of a seeded order, or
        with fewer shards than ranks every shard and every world-th sample of each."""
        order = np.random.default_rng(seed_of(self.seed, self.bucket.name, epoch)).permutation(
            len(self.bucket.shards))
        shards = [self.bucket.shards[i] for i in order]
        if len(shards) >= self.world:
            return shards[self.rank::self.world], 1
        return shards, self.world

    def _shuffled(self, path: str, stride: int) -> Iterator[dict]:
        rng = random.Random(seed_of(self.seed, self.bucket.name, self.rank, self.epoch, self.shard))
        pool: list[dict] = []
        for j, raw in enumerate(raw_samples(path)):
            if j % stride != (self.rank % stride) or not self.keep(raw["__key__"]):
                continue
            if len(pool) < self.buffer:
                pool.append(raw)
                continue
            k = rng.randrange(len(pool))
            pool[k], raw = raw, pool[k]
            yield raw
        rng.shuffle(pool)
        yield from pool

    def _samples(self) -> Iterator[dict]:
        while True:
            shards, stride = self.share(self.epoch)
            any_sample = False
            while self.shard < len(shards):
                skip = self.taken
                for i, raw in enumerate(self._shuffled(shards[self.shard], stride)):
                    any_sample = True
                    if i >= skip:
                        self.taken = i + 1  # set before the yield: state() after next() includes this sample
                        yield raw
                self.shard, self.taken = self.shard + 1, 0
            if not any_sample:
                raise ValueError(f"bucket {self.bucket.name}: rank {self.rank} of {self.world} gets no samples in "
                                 f"epoch {self.epoch} (all held out, or empty shards)")
            self.epoch, self.shard = self.epoch + 1, 0


# --- batches --------------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    step: int
    bucket: str
    latents: torch.Tensor  # (B, C, h, w) as stored (bf16 or fp32)
    text: torch.Tensor  # (B, L, D) as stored, zero past each sample's tokens
    mask: torch.Tensor  # (B, L) bool, True = real token; a dropped or empty caption has none
    keys: list[str]
    variants: list[str | None]  # None = caption dropped
    position: dict = field(default_factory=dict)  # the loader's state after this batch: resume from here

    @property
    def size(self) -> int:
        return self.latents.shape[0]


def pad_features(feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpadded (L_i, D) features → (B, max L, D) right-padded with zeros and the (B, max L) mask."""
    length, dim = max(f.shape[0] for f in feats), feats[0].shape[1]
    text = feats[0].new_zeros(len(feats), length, dim)
    mask = torch.zeros(len(feats), length, dtype=torch.bool)
    for i, f in enumerate(feats):
        text[i, : f.shape[0]] = f
        mask[i, : f.shape[0]] = True
    return text, mask


def choose_captions(samples: list[dict], mix: dict[str, float], dropout: float, rng: np.random.Generator,
                    cut: CaptionCut | None = None) -> tuple[list[torch.Tensor], list[str | None]]:
    """Per sample: a variant drawn from the mix (among those the sample has), or none (dropout: no tokens). A
    random-length variant (`dense@random`) cuts its base's caption text per draw and `cut` encodes the cuts; the
    chosen variant then reads `dense@N`."""
    names = [v for v, p in mix.items() if p > 0]
    stored = [stored_variant(v) for v in names]
    probs = np.array([mix[v] for v in names], dtype=np.float64)
    draws, drops = rng.random(len(samples)), rng.random(len(samples)) < dropout
    randoms = any(v != s for v, s in zip(names, stored))
    lengths = rng.random(len(samples)) if randoms else None  # after the mix's draws: other mixes keep their order
    feats, chosen, pending = [], [], []
    for i, (s, u, drop) in enumerate(zip(samples, draws, drops)):
        have = np.array([v in s["text"] for v in stored])
        if not have.any():
            raise ValueError(f"sample {s['key']} has none of the caption variants {stored}")
        p = probs * have
        k = min(int(np.searchsorted(np.cumsum(p / p.sum()), u, side="right")), len(names) - 1)
        text = s["text"][stored[k]]
        if drop:
            feats.append(text[:0])
            chosen.append(None)
            continue
        feats.append(text)
        chosen.append(names[k])
        if names[k] != stored[k]:
            caption = s["meta"].get("captions", {}).get(stored[k])
            if not isinstance(caption, str):
                raise ValueError(f"sample {s['key']} stores no {stored[k]!r} caption text to cut for {names[k]}")
            cut_text, n = draw_cut(caption, float(lengths[i]))
            if n < len(caption.split()):  # a draw of every word keeps the stored features
                pending.append((i, cut_text))
            chosen[i] = truncated(stored[k], n)
    if pending:
        if cut is None:
            raise ValueError(f"the caption mix {names} cuts captions per draw but the loader has no text encoder")
        for (i, _), f in zip(pending, cut.encode([t for _, t in pending])):
            feats[i] = f
    return feats, chosen


def collate(samples: list[dict], mix: dict[str, float], dropout: float, rng: np.random.Generator,
            step: int, bucket: str, cut: CaptionCut | None = None) -> Batch:
    feats, variants = choose_captions(samples, mix, dropout, rng, cut)
    text, mask = pad_features(feats)
    latents = torch.stack([s["latent"] for s in samples])
    return Batch(step, bucket, latents, text, mask, [s["key"] for s in samples], variants)


class Loader:
    def __init__(self, shards: ShardSet, cfg: TrainConfig, rank: int = 0, world: int = 1, state: dict | None = None):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.names = sorted(shards.buckets)
        self.buckets = shards.buckets
        # P(bucket) ∝ samples / batch size: the steps it takes to pass the bucket once.
        w = np.array([shards.buckets[b].samples / cfg.batch_size_for(shards.buckets[b].base) for b in self.names])
        self.probs = w / w.sum()
        state = state or {}
        randoms = any(stored_variant(v) != v for v in cfg.data.captions)
        self.cut = CaptionCut(shards.encoders) if randoms else None  # per-draw random-length captions
        self.step = state.get("step", 0)
        holdout = cfg.data.holdout
        self.streams = {b: BucketStream(shards.buckets[b], rank, world, cfg.seed, cfg.data.shuffle_buffer,
                                        lambda key: not held_out(key, holdout), state.get("buckets", {}).get(b))
                        for b in self.names}

    def plan(self, step: int) -> tuple[str, np.random.Generator]:
        """The bucket of this rank at `step`, and the RNG for the rest of that batch's choices."""
        rng = np.random.default_rng(seed_of(self.cfg.seed, "step", self.rank, step))
        return self.names[int(rng.choice(len(self.names), p=self.probs))], rng

    def state(self) -> dict:
        return {"step": self.step, "buckets": {b: s.state() for b, s in self.streams.items()}}

    def next_batch(self) -> Batch:
        bucket, rng = self.plan(self.step)
        size = self.cfg.batch_size_for(self.buckets[bucket].base)
        stream = self.streams[bucket]
        samples = [read_sample(next(stream)) for _ in range(size)]
        batch = collate(samples, self.cfg.data.captions, self.cfg.data.caption_dropout, rng, self.step, bucket,
                        self.cut)
        self.step += 1
        batch.position = copy.deepcopy(self.state())
        return batch


class prefetch:
    """Iterate `loader.next_batch()` from a background thread, `depth` batches ahead (decoding overlaps the
    step: torch and tar reads release the GIL). Errors in the thread are raised at the consumer."""

    def __init__(self, loader: Loader, depth: int = 4, pin_memory: bool = False):
        self.loader, self.pin = loader, pin_memory
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="lensforge-loader", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                batch = self.loader.next_batch()
                if self.pin:
                    batch.latents, batch.text = batch.latents.pin_memory(), batch.text.pin_memory()
                while not self.stop.is_set():
                    try:
                        self.queue.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as err:  # handed to the consumer
            self.queue.put(err)

    def __iter__(self) -> "prefetch":
        return self

    def __next__(self) -> Batch:
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


class inline:
    """`prefetch`'s interface without the thread: each batch is made when asked for."""

    def __init__(self, loader: Loader):
        self.loader = loader

    def __iter__(self) -> "inline":
        return self

    def __next__(self) -> Batch:
        return self.loader.next_batch()

    def close(self) -> None:
        pass


# --- the held-out set -----------------------------------------------------------------------------------------------


def holdout_batches(shards: ShardSet, cfg: TrainConfig, samples: int, batch_size: int) -> list[Batch]:
    """The first `samples` held-out samples in index order, as fixed bucket-homogeneous batches with the mix's
    most likely caption variant or `val.captions` (no dropout): every rank builds the same list."""
    variant = cfg.val.captions or stored_variant(max(cfg.data.captions, key=cfg.data.captions.get))
    found: dict[str, list[dict]] = {}
    total = 0
    for name in sorted(shards.buckets):
        for path in shards.buckets[name].shards:
            for raw in raw_samples(path):
                if total >= samples:
                    break
                if held_out(raw["__key__"], cfg.data.holdout):
                    found.setdefault(name, []).append(read_sample(raw))
                    total += 1
    rng = np.random.default_rng(0)
    batches = []
    for name, group in found.items():
        for start in range(0, len(group), batch_size):
            batches.append(collate(group[start:start + batch_size], {variant: 1.0}, 0.0, rng, 0, name))
    return batches
