"""The run report: ``report.md`` and a self-contained ``report.html`` built from the run directory.

Everything is read from files the stages wrote (manifest, prompts, shards, training log,
evaluation results, export), so ``synthdistill report <run>`` can rebuild it at any time.
"""

from __future__ import annotations

import base64
import html
import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from synthdistill.errors import SynthdistillError
from synthdistill.fileio import atomic_path, atomic_write_text, read_json
from synthdistill.rundir import RunDir

ASSETS = "report_assets"
METRIC_NAMES = {"top1": "top-1", "top5": "top-5", "mean_per_class_recall": "mean per-class recall"}


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


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _count(value: object, noun: str) -> str:
    return f"{value:,} {noun}" if isinstance(value, int) else f"? {noun}"


def _prompts_summary(s: dict) -> str:
    text = _count(s.get("total"), "prompts")
    if s.get("generator"):
        text += f" ({s['generator']} generator" + (f", {s['design']} design)" if s.get("design") else ")")
    if s.get("per_class"):
        text += f" for {len(s['per_class'])} classes"
    if s.get("unique_share_min") is not None:
        text += f"; {_pct(s['unique_share_min'])} unique in the least varied class"
    if s.get("shortened"):
        text += f"; {s['shortened']} shortened to the text encoder's limit"
    answers = s.get("prompt_answers") or s.get("option_answers")
    if isinstance(answers, dict):
        used, replaced = answers.get("used", 0), answers.get("replaced", 0)
        text += f"; LLM answers used {used}, replaced by the registry's {replaced}"
    return text


def _generate_summary(s: dict) -> str:
    images = s.get("images_in_shards", s.get("images_written"))
    text = f"{_count(images, 'images')} in {_count(s.get('shards_total'), 'shards')}"
    if isinstance(s.get("images_per_second"), float):
        text += f" at {s['images_per_second']:.2g} images/s"
    if s.get("shards_skipped"):
        text += f"; {s['shards_skipped']} shards were already complete"
    if s.get("images_retried") or s.get("images_failed"):
        text += (
            f"; {s.get('images_retried', 0)} NaN/black images redrawn, {s.get('images_failed', 0)} unusable"
        )
    return text


def _distill_summary(s: dict) -> str:
    text = f"{_count(s.get('steps'), 'steps')} over {_count(s.get('epochs'), 'epochs')}"
    if isinstance(s.get("samples"), int):
        text += f" of {s['samples']:,} images"
    if s.get("resumed_from_step"):
        text += f", resumed from step {s['resumed_from_step']}"
    if isinstance(s.get("final_loss"), float):
        text += f"; final loss {s['final_loss']:.4g}"
    if isinstance(s.get("final_cosine"), float):
        text += f", cosine to the teacher {s['final_cosine']:.3f}"
    skipped = (s.get("corrupt_samples") or 0) + (s.get("corrupt_images") or 0)
    if skipped:
        text += f"; {skipped} undecodable images skipped"
    return text


def _evaluate_summary(s: dict) -> str:
    """'pets: student 80.1% top-1, teacher 85.0% top-1, agreement 90.2%' per dataset (and protocol:
    keys of the paper protocol's numbers start with 'paper/')."""
    datasets: dict[str, list[str]] = {}
    for key, value in s.items():
        if not isinstance(value, float):
            continue
        if key.endswith("/agreement"):
            where, text = key.removesuffix("/agreement"), f"agreement {_pct(value)}"
        elif key.count("/") >= 2:
            where, model, metric = key.rsplit("/", 2)
            text = f"{model} {_pct(value)} {METRIC_NAMES.get(metric, metric)}"
        else:
            continue
        datasets.setdefault(where, []).append(text)
    return "; ".join(f"{name}: {', '.join(parts)}" for name, parts in datasets.items()) or "no test set"


def _export_summary(s: dict) -> str:
    files = ", ".join(Path(p).name for p in (s.get("files") or {}).values())
    text = f"{files or 'no files'} for {_count(s.get('num_classes'), 'classes')}"
    if isinstance(s.get("student_parameters"), int):
        text += f"; student {s['student_parameters']:,} parameters"
        if isinstance(s.get("student_flops"), int):
            text += f", {s['student_flops'] / 1e9:.3g} GFLOPs/image"
    latency = (s.get("latency_ms") or {}).get("student@1")
    if latency is not None:
        text += f", {latency:.3g} ms per image at batch 1 on CPU"
    return text


STAGE_SUMMARIES = {
    "prompts": _prompts_summary,
    "generate": _generate_summary,
    "distill": _distill_summary,
    "evaluate": _evaluate_summary,
    "export": _export_summary,
}


def _stage_section(run: RunDir) -> list[Block]:
    stages = run.manifest().get("stages", {})
    rows = []
    for stage, record in stages.items():
        summary = record.get("summary", {})
        done = record.get("status") == "done" and stage in STAGE_SUMMARIES
        details = STAGE_SUMMARIES[stage](summary) if done else ""
        rows.append([stage, record.get("status", "?"), _fmt(summary.get("seconds", "")), details])
    if not rows:
        return []
    return [Heading("Stages"), Table(["stage", "status", "seconds", "what it made"], rows)]


def _recipe(run: RunDir) -> dict:
    import yaml

    if not run.config.is_file():
        return {}
    return yaml.safe_load(run.config.read_text(encoding="utf-8")) or {}


def _results(run: RunDir) -> dict:
    path = run.eval / "results.json"
    return read_json(path) if path.is_file() else {}


def reading_notes(run: RunDir) -> list[str]:
    """What a reader must know before believing the numbers: tiny random models, evaluation on the
    run's own training images, a teacher at chance level."""
    notes = []
    recipe = _recipe(run)
    tiny = [
        f"{what} '{name}'"
        for what, name in (
            ("teacher", recipe.get("distill", {}).get("teacher")),
            ("student", recipe.get("distill", {}).get("student")),
            ("diffusion model", recipe.get("generate", {}).get("model")),
        )
        if name in ("tiny", "tiny-sdxl")
    ]
    if tiny:
        notes.append(
            f"Numbers from tiny random models mean nothing ({', '.join(tiny)}): this run only shows that "
            "every stage works and hands its files to the next."
        )
    entries = _results(run).get("entries", [])
    if any(e["dataset"].endswith("(synthetic)") for e in entries):
        notes.append(
            "The evaluation is on the run's own synthetic training images (there is no real test set for "
            "these classes): it shows how closely the student copies its teacher on images it was trained "
            "on, not how well it classifies real photos; evaluate on real ones with "
            f"`synthdistill evaluate --student {run.student} --image-folder DIR` (one folder per class)."
        )
    for e in entries:
        chance = 1 / e["num_classes"] if e.get("num_classes") else None
        if e["model"] == "teacher" and chance and e["top1"] <= 1.5 * chance:
            notes.append(
                f"The teacher is at chance level on {e['dataset']} ({_pct(e['top1'])} top-1, chance "
                f"{_pct(chance)} for {e['num_classes']} classes): a student distilled from it cannot do "
                "better; check the teacher's weights and the class names."
            )
    return notes


def headline_lines(run: RunDir) -> list[str]:
    """The end of a run in a few lines: student and teacher numbers, agreement, the exported model
    and a ready-to-paste predict command."""
    lines = []
    entries = _results(run).get("entries", [])
    for dataset in dict.fromkeys(e["dataset"] for e in entries):
        rows = {
            e["model"]: e
            for e in entries
            if e["dataset"] == dataset and e["protocol"] == entries[0]["protocol"]
        }
        student, teacher = rows.get("student"), rows.get("teacher")
        metric = (student or teacher or {}).get("headline_metric", "top1")
        parts = [
            f"{who} {_pct(row['headline'])}"
            for who, row in (("student", student), ("teacher", teacher))
            if row
        ]
        if student and student.get("agreement_with_teacher") is not None:
            parts.append(f"agreement {_pct(student['agreement_with_teacher'])}")
        lines.append(f"{dataset} ({METRIC_NAMES.get(metric, metric)}): {', '.join(parts)}")
    onnx = run.export / "model.onnx"
    if onnx.is_file():
        lines.append(f"exported: {onnx} ({onnx.stat().st_size / 1e6:.1f} MB)")
        lines.append(f"classify your photos: synthdistill predict --model {shlex.quote(str(onnx))} IMAGE")
    return lines + [f"note: {note}" for note in reading_notes(run)]


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
    notes = reading_notes(run)
    if notes:
        blocks += [Heading("How to read these numbers"), Paragraph("\n\n".join(notes))]
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
