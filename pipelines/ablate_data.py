"""The data side of `lensforge ablate` (pipelines/ablate.py): the one shard set every run of a study trains on, and
the words per caption of each variant stored in it.

    set_dir = resolve_shard_set("abl/data", train_cfg, ["alt", "short", "dense"], "configs/demo.yaml")
    words = words_json(out, set_dir, holdout=0.03)     # {"dense": {"mean", "std", "median", "samples"}, ...}
"""

from __future__ import annotations

import json
import shlex
from collections import defaultdict
from pathlib import Path

from common.atomic import write_json
from training.caption_variants import split_variant
from training.train_config import TrainConfig


def resolve_shard_set(data: str | Path, cfg: TrainConfig, needed: list[str], config_file: str | Path) -> Path:
    """The one shard set under DATA that this recipe can train on and that holds every needed variant. A set that
    fits but lacks variants → ValueError with the precompute command that makes one with them."""
    from training.cache_key import encoder_mismatches, training_key
    from training.loader import shard_set_candidates
    from training.shard_format import ENCODERS_FILE, read_encoders

    root, model = Path(data), cfg.model_config_resolved()
    candidates = shard_set_candidates(root, cfg.data.shard_set)
    if cfg.data.shard_set and not (candidates[0] / ENCODERS_FILE).is_file():
        raise FileNotFoundError(f"shard set {cfg.data.shard_set} (train.data.shard_set, or the set this --out was "
                                f"started on) is not in {root / 'shards'}")
    if not candidates:
        raise FileNotFoundError(f"no shard set in {root}: prepare DATA first, e.g. `lensforge demo --out abl --set "
                                "caption.variants=[dense,short] --set precompute.variants=[dense,short,alt] --until "
                                "precompute` (DATA = abl/data; see pipelines/ablate.py)")
    fits, lacking, problems = [], [], []
    expected = training_key(cfg)  # the caption mix below does not enter it
    for c in candidates:
        encoders = read_encoders(c)
        have = list(encoders.get("text", {}).get("variants", []))
        probe = cfg.model_copy(update={"data": cfg.data.model_copy(update={"captions": {v: 1.0 for v in have}})})
        wrong = encoder_mismatches(encoders, probe, model, expected)
        missing = [v for v in needed if v not in have]
        if wrong:
            problems.append(f"{c.name}: {'; '.join(wrong)}")
        elif missing:
            lacking.append((len(missing), c, have, missing))
        else:
            fits.append(c)
    if len(fits) > 1:
        raise ValueError(f"several shard sets hold {needed} ({', '.join(c.name for c in fits)}): choose one with "
                         f"--set train.data.shard_set={fits[-1].name}")
    if fits:
        return fits[0]
    if lacking:
        _, c, have, missing = min(lacking, key=lambda x: x[0])
        own = c / "config.precompute.yaml"
        command = ["lensforge", "precompute", "--data", str(root if root != c else c.parent.parent),
                   "--config", str(own if own.is_file() else config_file), "--variants", ",".join(have + missing)]
        raise ValueError(f"shard set {c.name} lacks caption variant(s) {', '.join(missing)} (it has "
                         f"{', '.join(have)}): run `{shlex.join(command)}`, then rerun this command")
    raise ValueError(f"refusing shards made with other encoders than this recipe's ({' | '.join(problems)})")


def words_per_caption(set_dir: Path, holdout: float) -> dict[str, dict]:
    """Per stored variant, over the training samples (hold-out excluded): mean, std and median words per caption
    (an empty caption counts 0) and, for `X@N`, the fraction of captions the cut shortened."""
    import numpy as np

    from training.loader import held_out, raw_samples
    from training.shard_format import read_index

    words: dict[str, list[int]] = defaultdict(list)
    for shard in read_index(set_dir)["shard"]:
        for raw in raw_samples(str(set_dir / shard)):
            if not held_out(raw["__key__"], holdout):
                for variant, text in json.loads(raw["meta.json"]).get("captions", {}).items():
                    words[variant].append(len((text or "").split()))
    out = {}
    for variant, counts in sorted(words.items()):
        a = np.asarray(counts, dtype=np.float64)
        out[variant] = {"mean": round(float(a.mean()), 3), "std": round(float(a.std()), 3),
                        "median": float(np.median(a)), "samples": len(a)}
        base, n = split_variant(variant)
        if n is not None and base in words:
            out[variant]["cut"] = round(float(np.mean(np.asarray(words[base]) > n)), 4)
    return out


def mix_words(words: dict[str, dict], mix: dict[str, float]) -> float:
    """Expected words per caption of a mix (captions dropped for CFG not counted)."""
    total = sum(mix.values())
    return sum(p / total * words[v]["mean"] for v, p in mix.items())


def words_json(out: Path, set_dir: Path, holdout: float) -> dict:
    """words_per_caption, cached in OUT/words.json for this shard set and hold-out."""
    path = out / "words.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("shard_set") == set_dir.name and cached.get("holdout") == holdout:
            return cached["words"]
    words = words_per_caption(set_dir, holdout)
    write_json(path, {"shard_set": set_dir.name, "holdout": holdout, "words": words})
    return words
