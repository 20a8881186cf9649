"""The input URL list: Parquet, CSV or JSONL (a file, or a folder of them), with a `url` column, an optional
alt-text column and any other columns, which are carried through to the manifest."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from curation.manifest import MANIFEST_COLUMNS, make_key

READERS = {
    ".parquet": pd.read_parquet,
    ".csv": pd.read_csv,
    ".jsonl": lambda p: pd.read_json(p, lines=True),
    ".json": lambda p: pd.read_json(p, lines=True),
}


def _files(urls: Path) -> list[Path]:
    if urls.is_dir():
        files = sorted(p for p in urls.iterdir() if p.suffix in READERS)
        if not files:
            raise FileNotFoundError(f"no .parquet, .csv or .jsonl files in {urls}")
        return files
    if not urls.exists():
        raise FileNotFoundError(f"URL list not found: {urls}")
    if urls.suffix not in READERS:
        raise ValueError(f"URL list {urls}: unsupported format {urls.suffix!r} (use .parquet, .csv or .jsonl)")
    return [urls]


def read_url_list(urls: str | Path, url_col: str = "url", caption_col: str = "caption") -> tuple[pd.DataFrame, list]:
    """(rows with key, url, alt_text and the carried columns; the carried column names)."""
    frames = []
    for path in _files(Path(urls)):
        try:
            frames.append(READERS[path.suffix](path))
        except Exception as err:  # pandas/pyarrow raise many types for a corrupt file
            raise ValueError(f"cannot read URL list {path}: {str(err).splitlines()[0]}") from None
    df = pd.concat(frames, ignore_index=True)
    if len(df) == 0:  # nothing to curate; an empty frame would also break every later join (its key dtype is float)
        raise ValueError(f"URL list {urls} has no URLs (0 rows)")
    if url_col not in df.columns:
        raise ValueError(f"URL list {urls} has no {url_col!r} column (columns: {', '.join(map(str, df.columns))})")
    out = pd.DataFrame({
        "key": [make_key(i) for i in range(len(df))],
        "url": df[url_col].astype("string").fillna("").astype(str),
        "alt_text": df[caption_col].astype("string") if caption_col in df.columns else pd.NA,
    })
    out["alt_text"] = out["alt_text"].astype(object).where(out["alt_text"].notna(), None)
    extra = [c for c in df.columns if c not in (url_col, caption_col)]
    carried = {}
    for col in extra:  # never let an input column shadow a manifest column
        name = f"input_{col}" if col in MANIFEST_COLUMNS else str(col)
        carried[name] = df[col]
    return pd.concat([out, pd.DataFrame(carried)], axis=1), list(carried)
