"""What an evaluation measured, with how it was measured: results.json and results.md."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from synthdistill.fileio import atomic_write_json, atomic_write_text

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
METRIC_LABELS = {"top1": "top-1", "top5": "top-5", "mean_per_class_recall": "mean per-class"}
PROTOCOL_NOTES = {
    "clip_benchmark": "clip_benchmark: CLIP_benchmark's protocol (the registry's template ensemble, each "
    "model's own validation preprocessing, {precision}); headline: the DataComp metric of each dataset.",
    "paper": "paper: the authors' protocol (one template per dataset, one tensor for both models: short "
    "side to {size} px, centre crop, bilinear, CLIP mean/std; fp32); headline: top-1.",
}


@dataclass
class Entry:
    """One model on one test set under one protocol: a row of the table, an entry of results.json.
    ``templates``, ``precision`` and ``preprocessing`` (a :class:`Preprocessing` as a dict) are what
    this number was measured with."""

    dataset: str
    model: str
    model_id: str
    teacher: str
    student: str | None
    source: str
    num_classes: int
    protocol: str
    templates: list[str]
    precision: str
    preprocessing: dict
    n_images: int
    skipped_images: int
    top1: float
    top5: float | None
    mean_per_class_recall: float
    headline_metric: str
    headline: float
    agreement_with_teacher: float | None = None
    agreement_guaranteed_by_bound: float | None = None
    mean_student_teacher_distance: float | None = None


@dataclass
class EvaluationResults:
    """Everything one evaluation measured; written as results.json and results.md. ``precision`` is
    the one asked for (the clip_benchmark protocol's); each entry records its own."""

    teacher: str
    student: str | None
    precision: str
    device: str
    protocols: list[str] = field(default_factory=lambda: ["clip_benchmark"])
    entries: list[Entry] = field(default_factory=list)
    note: str = ""

    def entry(self, dataset: str, model: str, protocol: str = "clip_benchmark") -> Entry:
        return next(
            e for e in self.entries if e.dataset == dataset and e.model == model and e.protocol == protocol
        )

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def to_dict(self) -> dict:
        """The short summary the run manifest records: headline metric per dataset and model (keys of
        the paper protocol's numbers start with 'paper/')."""
        summary: dict = {"precision": self.precision}
        for e in self.entries:
            prefix = "" if e.protocol == "clip_benchmark" else f"{e.protocol}/"
            summary[f"{prefix}{e.dataset}/{e.model}/{e.headline_metric}"] = round(e.headline, 4)
            if e.agreement_with_teacher is not None:
                summary[f"{prefix}{e.dataset}/agreement"] = round(e.agreement_with_teacher, 4)
        return summary

    def to_markdown(self) -> str:
        """A table in percent, then a paragraph that says what was compared and how."""
        if not self.entries:
            return self.note + "\n"

        def pct(value: float | None) -> str:
            return "" if value is None else f"{100 * value:.1f}"

        lines = [
            "| dataset | protocol | model | images | top-1 | top-5 | mean per-class recall | headline "
            "| agreement | guaranteed by bound |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for e in self.entries:
            headline = f"{pct(e.headline)} ({METRIC_LABELS[e.headline_metric]})"
            lines.append(
                f"| {e.dataset} | {e.protocol} | {e.model} | {e.n_images} | {pct(e.top1)} | {pct(e.top5)} "
                f"| {pct(e.mean_per_class_recall)} | {headline} | {pct(e.agreement_with_teacher)} "
                f"| {pct(e.agreement_guaranteed_by_bound)} |"
            )
        student = f"; student: {self.student}" if self.student else ""
        notes = [f"Teacher: {self.teacher}{student}; on {self.device}. Zero-shot, in percent."]
        for protocol in dict.fromkeys(e.protocol for e in self.entries):
            first = next(e for e in self.entries if e.protocol == protocol)
            size = first.preprocessing.get("image_size")
            notes.append(PROTOCOL_NOTES[protocol].format(precision=first.precision, size=size))
        if self.student:
            notes.append(
                "Agreement: share of images where student and teacher predict the same class; guaranteed "
                "by bound: share for which the measured embedding distance alone guarantees it."
            )
        skipped = {e.dataset: e.skipped_images for e in self.entries if e.skipped_images}
        if skipped:
            notes.append(f"Unreadable images skipped: {', '.join(f'{d} {n}' for d, n in skipped.items())}.")
        if self.note:
            notes.append(self.note)
        return "\n".join(lines) + "\n\n" + " ".join(notes) + "\n"


def write_results(results: EvaluationResults, out_dir: str | Path) -> None:
    atomic_write_json(Path(out_dir) / RESULTS_JSON, results.to_json())
    atomic_write_text(Path(out_dir) / RESULTS_MD, results.to_markdown())
