"""The run report: ``report.md`` and a self-contained ``report.html`` built from the run directory.

Everything is read from files the stages wrote (manifest, prompts, shards, training log,
evaluation results, export), so ``synthdistill report <run>`` can rebuild it at any time.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path

from synthdistill.errors import SynthdistillError
from synthdistill.fileio import atomic_path, atomic_write_text, read_json
from synthdistill.rundir import RunDir

ASSETS = "report_assets"


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Picture:
    path: Path
    alt: str


@dataclass
class Code:
    text: str
    summary: str | None = None  # HTML: folded behind this summary line


Block = Heading | Paragraph | Table | Picture | Code


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)[:80]
    return str(value)


def _read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                rows.append(json.loads(line))
            if limit and len(rows) >= limit:
                break
    return rows


def _stage_section(run: RunDir) -> list[Block]:
    stages = run.manifest().get("stages", {})
    rows = []
    for stage, record in stages.items():
        summary = record.get("summary", {})
        details = ", ".join(
            f"{k}: {_fmt(v)}"
            for k, v in summary.items()
            if v is not None
            and k != "seconds"
            and not k.endswith(("_dir", "path", "cache"))
            and not isinstance(v, dict | list)
        )
        rows.append([stage, record.get("status", "?"), _fmt(summary.get("seconds", "")), details[:300]])
    if not rows:
        return []
    return [Heading("Stages"), Table(["stage", "status", "seconds", "counts"], rows)]


def _prompt_section(run: RunDir, classes: int = 6, per_class: int = 2) -> list[Block]:
    if not run.prompts.is_file():
        return []
    examples: dict[int, list[str]] = {}
    for row in _read_jsonl(run.prompts):
        bucket = examples.setdefault(row["class_index"], [])
        if len(bucket) < per_class:
            bucket.append(f"{row['class_name']}: {row['prompt']}")
        if len(examples) > classes:
            break
    lines = [p for index in sorted(examples)[:classes] for p in examples[index]]
    return [Heading("Example prompts"), Code("\n".join(lines))]


def _sample_grid(run: RunDir, out: Path, classes: int = 8, per_class: int = 4, cell: int = 96) -> Path | None:
    """A PNG grid: one row per class (up to ``classes``), ``per_class`` synthetic images each."""
    from PIL import Image, ImageDraw

    from synthdistill.shards import ShardSamples, decode_image, list_shards

    shards = list_shards(run.shards)
    if not shards:
        return None
    samples = ShardSamples(shards)
    rows: dict[int, list] = {}
    names: dict[int, str] = {}
    for index in range(len(samples)):
        sample = samples[index]
        label = sample.meta.get("class_index", -1)
        if label not in rows and len(rows) >= classes:
            continue
        row = rows.setdefault(label, [])
        if len(row) < per_class:
            image = decode_image(sample.image)
            if image is not None:
                row.append(image)
                names[label] = sample.meta.get("class_name", str(label))
        if len(rows) >= classes and all(len(r) >= per_class for r in rows.values()):
            break
    label_width = 160
    grid = Image.new("RGB", (label_width + per_class * cell, len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for r, label in enumerate(sorted(rows)):
        draw.text((6, r * cell + cell // 2 - 6), names[label][:24], fill="black")
        for c, image in enumerate(rows[label]):
            grid.paste(image.resize((cell, cell)), (label_width + c * cell, r * cell))
    with atomic_path(out) as tmp:
        grid.save(tmp, format="PNG")
    return out


def _training_section(run: RunDir, assets: Path) -> list[Block]:
    log = run.student / "train_log.jsonl"
    if not log.is_file():
        return []
    records = _read_jsonl(log)
    rows = [r for r in records if "step" in r and "loss" in r]
    validation = [r for r in records if r.get("event") == "validation"]
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    series = [("loss", "training loss")]
    if "cosine" in rows[0]:
        series.append(("cosine", "student-teacher cosine"))
    panels = len(series) + bool(validation)
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.2), squeeze=False)
    for axis, (key, title) in zip(axes[0], series, strict=False):
        axis.plot(steps, [r[key] for r in rows])
        axis.set_xlabel("step")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    if validation:  # zero-shot top-1 on the real test sets, at the steps that ended the epochs
        axis = axes[0][-1]
        for dataset in dict.fromkeys(r["dataset"] for r in validation):
            points = [r for r in validation if r["dataset"] == dataset]
            axis.plot([r["step"] for r in points], [r["top1"] for r in points], marker="o", label=dataset)
        axis.set_xlabel("step")
        axis.set_title(f"validation top-1 ({validation[0]['protocol']} protocol)")
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    out = assets / "training.png"
    with atomic_path(out) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
    last = rows[-1]
    text = f"{len(rows)} log points; last step {last['step']}: loss {_fmt(last['loss'])}"
    if "cosine" in last:
        text += f", student-teacher cosine {_fmt(last['cosine'])}"
    summary = run.manifest().get("stages", {}).get("distill", {}).get("summary", {})
    if validation and summary.get("best_epoch") is not None:  # chosen by the distill stage
        names = ", ".join(dict.fromkeys(r["dataset"] for r in validation))
        kept = f", kept as {summary['best_checkpoint']}" if summary.get("best_checkpoint") else ""
        text += (
            f"; best validation epoch {summary['best_epoch']}: zero-shot top-1 {_fmt(summary['best_top1'])} "
            f"(mean over {names}, {validation[0]['protocol']} protocol{kept})"
        )
    return [Heading("Training"), Picture(out, "training curves"), Paragraph(text + ".")]


def _evaluation_section(run: RunDir) -> list[Block]:
    table = run.eval / "results.md"
    if table.is_file():
        return [Heading("Zero-shot evaluation"), Paragraph(table.read_text(encoding="utf-8").strip())]
    results = run.eval / "results.json"
    if results.is_file():
        return [Heading("Zero-shot evaluation"), Code(json.dumps(read_json(results), indent=2)[:4000])]
    return []


def _export_section(run: RunDir) -> list[Block]:
    if not run.export.is_dir():
        return []
    files = sorted(p for p in run.export.iterdir() if p.is_file() and not p.name.startswith("."))
    rows = [[p.name, f"{p.stat().st_size / 1e6:.2f} MB"] for p in files]
    blocks: list[Block] = [Heading("Export"), Table(["file", "size"], rows)]
    card = run.export / "MODEL_CARD.md"
    if card.is_file():
        text = card.read_text(encoding="utf-8")
        latency = text[text.find("## Latency") :] if "## Latency" in text else ""
        if latency:
            blocks += [
                Heading("Latency", 3),
                Paragraph(latency.split("\n## ")[0].replace("## Latency", "").strip()),
            ]
    return blocks


def build_report(run_dir: str | Path) -> list[Block]:
    run = RunDir(Path(run_dir))
    if not run.root.is_dir():
        raise SynthdistillError(f"Run directory '{run.root}' does not exist.")
    assets = run.root / ASSETS
    blocks: list[Block] = [Heading(f"synthdistill run: {run.root.name}", 1)]
    blocks += _stage_section(run)
    blocks += _prompt_section(run)
    grid = _sample_grid(run, assets / "samples.png")
    if grid:
        blocks += [Heading("Synthetic images"), Picture(grid, "sample synthetic images per class")]
    blocks += _training_section(run, assets)
    blocks += _evaluation_section(run)
    blocks += _export_section(run)
    if run.config.is_file():
        blocks += [Heading("Recipe"), Code(run.config.read_text(encoding="utf-8"), summary="config.yaml")]
    return blocks


def render_markdown(blocks: list[Block], root: Path) -> str:
    out = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Paragraph):
            out.append(block.text)
        elif isinstance(block, Table):
            out.append("| " + " | ".join(block.header) + " |")
            out.append("|" + "---|" * len(block.header))
            out.extend("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in block.rows)
        elif isinstance(block, Picture):
            out.append(f"![{block.alt}]({block.path.relative_to(root).as_posix()})")
        elif isinstance(block, Code):
            out.append(f"```\n{block.text.rstrip()}\n```")
        out.append("")
    return "\n".join(out)


def _markdown_table_to_html(text: str) -> str:
    """Paragraphs that are Markdown tables (from results.md / the model card) become HTML tables."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < 2 or not all(line.strip().startswith("|") for line in lines):
        return f"<p>{html.escape(text).replace(chr(10), '<br>')}</p>"
    cells = [[html.escape(c.strip()) for c in line.strip().strip("|").split("|")] for line in lines]
    head, body = cells[0], [row for row in cells[2:]]
    rows = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in body)
    return "<table><tr>" + "".join(f"<th>{c}</th>" for c in head) + f"</tr>{rows}</table>"


def render_html(blocks: list[Block]) -> str:
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            chunks = block.text.split("\n\n")
            parts.extend(_markdown_table_to_html(chunk) for chunk in chunks)
        elif isinstance(block, Table):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block.header)
            rows = "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in block.rows
            )
            parts.append(f"<table><tr>{head}</tr>{rows}</table>")
        elif isinstance(block, Picture):
            data = base64.b64encode(block.path.read_bytes()).decode("ascii")
            parts.append(f'<img alt="{html.escape(block.alt)}" src="data:image/png;base64,{data}">')
        elif isinstance(block, Code):
            pre = f"<pre>{html.escape(block.text)}</pre>"
            parts.append(
                f"<details><summary>{html.escape(block.summary)}</summary>{pre}</details>"
                if block.summary
                else pre
            )
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:left}pre{background:#f6f6f6;padding:1em;overflow-x:auto}img{max-width:100%}"
    )
    title = next((b.text for b in blocks if isinstance(b, Heading)), "synthdistill report")
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n"
    )


def write_report(run_dir: str | Path) -> Path:
    """Build the report of a run; returns the path of report.md (report.html sits beside it)."""
    run = RunDir(Path(run_dir))
    blocks = build_report(run.root)
    atomic_write_text(run.report_md, render_markdown(blocks, run.root))
    atomic_write_text(run.report_md.with_suffix(".html"), render_html(blocks))
    return run.report_md
