"""The shards' cache key, `encoders.json`: everything that changes a stored tensor, built from the configs and the
models' config files alone (no weights loaded; weights are fingerprinted). One owner: precompute writes it,
training compares against it.

    record = encoders_record(precompute_cfg)                 # DATA/shards/<sha256(record)[:12]>/encoders.json
    problems = encoder_mismatches(found, train_cfg, model)   # [] = training can read those shards
    problems = loaded_mismatches(record, probe)              # precompute: the loaded models say the same

    {"format": 2,
     "codec": {"codec", "channels", "factor", ["batch_norm_eps"], "weights", "compute_dtype", "latent_dtype"},
     "text":  {"text_encoder", "layers", "dim", "max_tokens", "template" (None, or Lens's chat: its system
               message, thinking, date, cut and offset), "weights", "tokenizer", "compute_dtype", "dtype",
               "variants"},
     "buckets": BucketTable.identity(), "crop", "flip", "resample",
     "captions": {variant: {"model", "prompt_id"}}}          # whose captions (captioning.schema.choose_sources)

`weights` / `tokenizer` are `inference.checkpoint.file_fingerprint`s of the directories (`tokenizer` is None when
it sits with the weights). Training decides the codec and text encoder but not the dtypes, variants (checked
against its caption mix), buckets or the chat date (precompute's `text_date`): it compares what it decides, plus
any field it names in `train.encoders`. The file's I/O and the sample format: training/shard_format.py.
"""

from __future__ import annotations

from inference.checkpoint import file_fingerprint
from inference.codecs import describe_codec
from inference.config import ModelConfig
from inference.text import describe_text_encoder, resolve_text_spec
from training.buckets import LENS_BASE_SIDES, LENS_RATIOS, BucketTable
from training.caption_variants import stored_variant
from training.precompute_config import PrecomputeConfig
from training.precompute_workers import RESAMPLE
from training.shard_format import FORMAT_VERSION, dict_diff
from training.train_config import TrainConfig


# --- from the configs --------------------------------------------------------------------------------------------


def codec_key(spec: str) -> dict:
    """The codec's identity and its weights' fingerprint (None for `pixel`)."""
    identity, _ = describe_codec(spec)
    path = spec.partition(":")[2] if spec.startswith("flux2:") else None
    return {**identity, "weights": file_fingerprint(path) if path else None}


def text_key(spec: str, date: str | None) -> dict:
    """The text encoder's identity (`inference.text.describe_text_encoder`) and fingerprints of its weights and,
    when it lives apart from them (a Lens release root), its tokenizer."""
    resolved = resolve_text_spec(spec)
    tokenizer = None if resolved.tokenizer == resolved.weights else file_fingerprint(resolved.tokenizer)
    return {**describe_text_encoder(spec, date), "weights": file_fingerprint(resolved.weights),
            "tokenizer": tokenizer}


def table_for(cfg: PrecomputeConfig, codec_multiple: int | None = None) -> BucketTable:
    """The bucket table of a precompute config; sides are multiples of the codec's size multiple."""
    codec_multiple = codec_multiple or describe_codec(cfg.codec)[1]
    multiple = cfg.buckets.multiple or codec_multiple
    if multiple % codec_multiple:
        raise ValueError(f"buckets.multiple {multiple} is not a multiple of the codec's {codec_multiple}")
    return BucketTable(cfg.buckets.base_sides or LENS_BASE_SIDES, cfg.buckets.ratios or LENS_RATIOS, multiple)


def encoders_record(cfg: PrecomputeConfig, table: BucketTable | None = None,
                    sources: dict[str, tuple[str, str | None]] | None = None) -> dict:
    """The encoders.json a precompute run with `cfg` writes; `sources`: {base variant: (model, prompt_id)}, whose
    captions it encodes (a new captioner's captions make a new shard set beside the old one)."""
    table = table or table_for(cfg)
    return {
        "format": FORMAT_VERSION,
        "codec": {**codec_key(cfg.codec), "compute_dtype": cfg.codec_dtype, "latent_dtype": cfg.latent_dtype},
        "text": {**text_key(cfg.text_encoder, cfg.text_date), "compute_dtype": cfg.text_encoder_dtype,
                 "dtype": cfg.text_dtype, "variants": list(cfg.variants)},
        "buckets": table.identity(),
        "crop": cfg.crop,
        "flip": cfg.flip,
        "resample": RESAMPLE,
        "captions": {v: {"model": m, "prompt_id": p} for v, (m, p) in sorted((sources or {}).items())},
    }


# --- training's side ---------------------------------------------------------------------------------------------


def training_key(cfg: TrainConfig, encoders: bool = True) -> dict:
    """The part of encoders.json a training config decides: the format, the codec's and text encoder's keys
    (any chat date), and whatever `cfg.encoders` adds. `encoders=False`: the format and `cfg.encoders` only (a
    bare transformer's run takes the shards' encoders; `encoder_mismatches` still checks their shapes)."""
    if not encoders:
        return _merge({"format": FORMAT_VERSION}, cfg.encoders)
    text = text_key(cfg.text_encoder, None)
    if text["template"] is not None:
        del text["template"]["date"]  # precompute's `text_date`; name one in train.encoders to insist on it
    return _merge({"format": FORMAT_VERSION, "codec": codec_key(cfg.codec), "text": text}, cfg.encoders)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _project(found: dict, like: dict) -> dict:
    """`found` restricted to the keys of `like`, recursively (a key missing in `found` stays missing)."""
    return {k: _project(found[k], v) if isinstance(v, dict) and isinstance(found[k], dict) else found[k]
            for k, v in like.items() if k in found}


def encoder_mismatches(encoders: dict, cfg: TrainConfig, model: ModelConfig, expected: dict | None = None) -> list[str]:
    """Every way a shard set's encoders.json disagrees with this config and model ([] = usable). `expected`:
    `training_key(cfg)`, when already computed (it fingerprints the weights)."""
    expected = expected or training_key(cfg)
    problems = dict_diff(_project(encoders, expected), expected)
    codec, text = encoders.get("codec", {}), encoders.get("text", {})
    if codec.get("channels") != model.in_channels:
        problems.append(f"latents of {codec.get('channels')} channels ({codec.get('codec')}), model {model.name!r} "
                        f"wants {model.in_channels}")
    width, want = text.get("dim", 0) * len(text.get("layers", [])), model.text_layers * model.text_dim
    if width != want:
        problems.append(f"text features {len(text.get('layers', []))} layers × {text.get('dim')} = {width} wide, "
                        f"model {model.name!r} wants {model.text_layers} × {model.text_dim} = {want}")
    wanted = [v for v, p in cfg.data.captions.items() if p > 0] + ([cfg.val.captions] if cfg.val.captions else [])
    missing = sorted({v for v in wanted if stored_variant(v) not in text.get("variants", [])})
    if missing:
        problems.append(f"caption variants {missing} not in the shards (they hold {text.get('variants')})")
    return problems


# --- precompute's probe ------------------------------------------------------------------------------------------


def loaded_mismatches(record: dict, probe: dict) -> list[str]:
    """Where the loaded codec and text encoder (`probe["codec"]`, `probe["text"]`: their `identity()`, and
    `probe["multiple"]`) disagree with the record computed from their config files ([] = they agree)."""
    problems = [f"{section}.{k}: {v!r} loaded, {record[section].get(k)!r} from the config files"
                for section in ("codec", "text") for k, v in probe[section].items() if record[section].get(k) != v]
    if record["buckets"]["multiple"] % probe["multiple"]:
        problems.append(f"bucket sides are multiples of {record['buckets']['multiple']}, the loaded codec needs "
                        f"multiples of {probe['multiple']}")
    return problems
