"""DATA/report.html: one self-contained page for a whole `lensforge run` (or `lensforge demo`).

Sections: the stages (time, what each produced), the curation funnel and score histograms, words per caption, the
training loss curve (train and validation), the final samples with each prompt under its image and, on synthetic
scene data, the prompt-adherence score per category next to chance. The per-stage reports (curation.html,
captions.html, buckets.html) stay where the stages wrote them; this page links them.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

import numpy as np
from PIL import Image

from common.html import figure_tag, image_tag, new_figure, table_html, write_page
from pipelines.run_config import STAGES
from pipelines.sample import final_dir
from pipelines.stage_cache import read_marker

STAGE_REPORTS = ("curation.html", "captions.html", "buckets.html")


def write_run_report(plan) -> Path:
    data, train_dir = plan.data, plan.train_dir
    sections = [
        ("", _intro(plan)),
        ("Stages", _stages(data)),
        ("Curation", _curation(data)),
        ("Captions", _captions(data)),
        ("Training", _training(train_dir)),
        ("Samples", _samples(train_dir)),
    ]
    return write_page(plan.report, "lensforge run report", sections)


def _intro(plan) -> str:
    links = [f'<a href="reports/{name}">{name}</a>' for name in STAGE_REPORTS
             if (plan.data / "reports" / name).exists()]
    return (f"<p>Data: <code>{escape(str(plan.data))}</code>; training run: <code>{escape(str(plan.train_dir))}"
            f"</code>. Stage reports: {', '.join(links) or 'none'}.</p>")


def _stages(data: Path) -> str:
    rows = []
    for stage in STAGES:
        marker = read_marker(data, stage)
        if marker is None:
            rows.append({"stage": stage, "finished": "not yet"})
            continue
        summary = ", ".join(f"{k}: {v}" for k, v in marker["summary"].items() if not isinstance(v, (dict, list)))
        rows.append({"stage": stage, "finished": marker["finished"], "seconds": marker["seconds"],
                     "key": marker["key"], "summary": summary})
    return table_html(rows)


def _curation(data: Path) -> str:
    from curation.config import CurateConfig
    from curation.funnel import funnel
    from curation.manifest import MANIFEST_COLUMNS, read_manifest
    from curation.report import funnel_section, scores_section
    from pipelines.config import load_section

    try:
        manifest = read_manifest(data).select(list(MANIFEST_COLUMNS))
    except FileNotFoundError:
        return '<p class="note">No manifest.</p>'
    saved = data / "config.curate.yaml"
    cfg = load_section("curate", str(saved), []) if saved.exists() else CurateConfig()
    kept = np.asarray(manifest["keep"].fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
    return "<h3>Funnel</h3>" + funnel_section(funnel(manifest)) + "<h3>Scores</h3>" + scores_section(
        manifest, kept, cfg)


def _captions(data: Path) -> str:
    from captioning.stats import caption_stats, words_histograms

    try:
        stats = caption_stats(data)
    except FileNotFoundError:
        return '<p class="note">No captions.</p>'
    rows = [{"variant": v, "ok": s["ok"], "words (median)": s["words_median"]} for v, s in stats.items()]
    return table_html(rows) + words_histograms(stats)


def read_metrics(train_dir: Path) -> dict[str, list[dict]]:
    """metrics.jsonl by kind; the last record per (kind, step) wins (a resumed run rewrites the steps after its
    checkpoint)."""
    path = Path(train_dir) / "metrics.jsonl"
    if not path.exists():
        return {}
    latest: dict[tuple[str, int], dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            latest[(record["kind"], record["step"])] = record
    out: dict[str, list[dict]] = {}
    for (kind, _), record in sorted(latest.items(), key=lambda kv: kv[0][1]):
        out.setdefault(kind, []).append(record)
    return out


def _training(train_dir: Path) -> str:
    metrics = read_metrics(train_dir)
    train = metrics.get("train", [])
    if not train:
        return '<p class="note">No training metrics.</p>'
    fig = new_figure(7, 3)
    ax = fig.add_subplot()
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", color="#0550ae", lw=1)
    val = [r for r in metrics.get("val", []) if "loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="validation loss", color="#c62828")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.legend(fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    last = train[-1]
    facts = {"steps": last["step"], "first loss": round(train[0]["loss"], 4), "last loss": round(last["loss"], 4),
             "samples/s (last)": last.get("samples_per_s"), "data wait (last)": last.get("data_wait")}
    return figure_tag(fig, alt="loss curve") + table_html([facts])


def _samples(train_dir: Path) -> str:
    out = final_dir(train_dir)
    meta_path = out / "prompts.json"
    if not meta_path.exists():
        return '<p class="note">No samples yet.</p>'
    meta = json.loads(meta_path.read_text())
    parts = []
    adherence = out / "adherence.json"
    if adherence.exists():
        parts.append(_adherence(json.loads(adherence.read_text())))
    figures = []
    for i, prompt in enumerate(meta["prompts"]):
        with Image.open(out / f"{i:03d}.png") as image:
            tag = image_tag(image.convert("RGB").resize((96, 96), Image.NEAREST), max_side=96, title=prompt)
        figures.append(f'<figure style="max-width:150px">{tag}<figcaption>{escape(prompt)}</figcaption></figure>')
    parts.append(f'<p class="note">{len(figures)} samples from <code>{escape(meta["weights"])}</code>, '
                 f'{meta["size"]}², {meta["steps"]} Euler steps, CFG {meta["cfg"]}; one seed per prompt.</p>')
    parts.append(f'<div class="thumbs">{"".join(figures)}</div>')
    return "\n".join(parts)


def _adherence(result: dict) -> str:
    def est(entry: dict | None) -> str:
        return "–" if entry is None else f"{entry['mean']:.3f} ({entry['ci95'][0]:.3f}–{entry['ci95'][1]:.3f})"

    rows = [{"category": name, "prompts": c["n"], "passed": c["passed"], "score (95 % CI)": est(c["score"]),
             "chance (95 % CI)": est(c["chance"])} for name, c in result["categories"].items()]
    rows.append({"category": "overall (mean of categories)", "prompts": sum(r["prompts"] for r in rows),
                 "passed": sum(r["passed"] for r in rows), "score (95 % CI)": est(result["overall"]),
                 "chance (95 % CI)": est(result["chance"])})
    return (f"<h3>Prompt adherence</h3><p><b>{est(result['overall'])}</b> against chance {est(result['chance'])}: "
            "each sample is parsed back with <code>scenes.parse</code> and checked against its prompt's category "
            "rule (<code>scenes/adherence.py</code>); chance is the same images scored against the other prompts "
            "of their category.</p>" + table_html(rows))
