"""Stage 4: zero-shot accuracy on real test sets, the student and its teacher side by side.

The protocol is CLIP_benchmark's zero-shot classification, so our numbers compare with published
ones: per class, the teacher's text embedding of every template, each normalised, averaged and
renormalised (the head, cached on disk); images through each model's own validation preprocessing;
logits = 100 * normalised image embedding @ head; top-1, top-5, mean per-class recall (balanced
accuracy) and the DataComp headline metric of each dataset. For a student, the teacher sees the same
images in the same pass; we report how often the two agree and how much of that agreement the
measured embedding distance alone guarantees (PAPER.md, "The agreement bound").
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from synthdistill.config import EvaluateConfig
from synthdistill.errors import SynthdistillError
from synthdistill.eval_data import (
    TestSet,
    image_folder_test_set,
    make_loader,
    registry_test_set,
    validation_transform,
)
from synthdistill.fileio import atomic_write_json, atomic_write_text
from synthdistill.registry import Domain
from synthdistill.runtime import autocast, autocast_dtype, resolve_device
from synthdistill.student import Student, load_student
from synthdistill.teacher import Teacher, cached_zero_shot_head, load_teacher

log = logging.getLogger(__name__)

HEAD_CACHE = "zero_shot_heads"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
METRIC_LABELS = {"top1": "top-1", "top5": "top-5", "mean_per_class_recall": "mean per-class"}


@dataclass
class ClassificationScores:
    """CLIP_benchmark's metrics, as fractions in [0, 1]; top-5 is None below 5 classes."""

    top1: float
    top5: float | None
    mean_per_class_recall: float


def classification_scores(logits: torch.Tensor, labels: torch.Tensor) -> ClassificationScores:
    """(N, C) logits and (N,) labels -> top-1, top-5 and mean per-class recall.

    Mean per-class recall averages the recall of the classes present in ``labels``, exactly as
    scikit-learn's ``balanced_accuracy_score`` that CLIP_benchmark calls.
    """
    num_images, num_classes = logits.shape
    predicted = logits.argmax(dim=1)
    correct = predicted == labels
    top5 = None
    if num_classes >= 5:
        in_top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(dim=1)
        top5 = in_top5.sum().item() / num_images
    per_class = torch.bincount(labels, minlength=num_classes).double()
    hits = torch.bincount(labels[correct], minlength=num_classes).double()
    present = per_class > 0
    return ClassificationScores(
        top1=correct.sum().item() / num_images,
        top5=top5,
        mean_per_class_recall=(hits[present] / per_class[present]).mean().item(),
    )


def guaranteed_agreement(student: torch.Tensor, teacher: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Which images the student provably classifies like the teacher, from the embedding distance alone.

    ``student``, ``teacher``: (N, D) L2-normalised image embeddings; ``head``: (D, C) unit-norm class
    embeddings w_c. With eps = ||s - t|| and y the teacher's class, every logit moves by at most
    eps (times the scale), so s.w_y - s.w_c >= (t.w_y - t.w_c) - eps ||w_y - w_c||: the student
    predicts y when, for every c != y, the teacher's margin exceeds eps ||w_y - w_c||. Returns (N,) bool.
    """
    teacher_logits = teacher @ head
    predicted = teacher_logits.argmax(dim=1)
    eps = (student - teacher).norm(dim=1)
    margins = teacher_logits.gather(1, predicted[:, None]) - teacher_logits
    class_distances = torch.cdist(head.T, head.T)
    holds = margins > eps[:, None] * class_distances[predicted]
    holds[torch.arange(len(predicted)), predicted] = True
    return holds.all(dim=1)


@dataclass
class Entry:
    """One model on one test set: a row of the results table and an entry of results.json."""

    dataset: str
    model: str
    model_id: str
    teacher: str
    student: str | None
    source: str
    num_classes: int
    templates: list[str]
    precision: str
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
    """Everything one evaluation measured; written as results.json and results.md."""

    teacher: str
    student: str | None
    precision: str
    device: str
    entries: list[Entry] = field(default_factory=list)
    note: str = ""

    def entry(self, dataset: str, model: str) -> Entry:
        return next(e for e in self.entries if e.dataset == dataset and e.model == model)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def to_dict(self) -> dict:
        """The short summary the run manifest records: headline metric per dataset and model."""
        summary: dict = {"precision": self.precision}
        for e in self.entries:
            summary[f"{e.dataset}/{e.model}/{e.headline_metric}"] = round(e.headline, 4)
            if e.agreement_with_teacher is not None:
                summary[f"{e.dataset}/agreement"] = round(e.agreement_with_teacher, 4)
        return summary

    def to_markdown(self) -> str:
        """A table in percent, then a paragraph that says what was compared and how."""
        if not self.entries:
            return self.note + "\n"

        def pct(value: float | None) -> str:
            return "" if value is None else f"{100 * value:.1f}"

        lines = [
            "| dataset | model | images | top-1 | top-5 | mean per-class recall | headline "
            "| agreement | guaranteed by bound |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for e in self.entries:
            headline = f"{pct(e.headline)} ({METRIC_LABELS[e.headline_metric]})"
            lines.append(
                f"| {e.dataset} | {e.model} | {e.n_images} | {pct(e.top1)} | {pct(e.top5)} "
                f"| {pct(e.mean_per_class_recall)} | {headline} | {pct(e.agreement_with_teacher)} "
                f"| {pct(e.agreement_guaranteed_by_bound)} |"
            )
        student = f"; student: {self.student}" if self.student else ""
        notes = [
            f"Teacher: {self.teacher}{student}; {self.precision} on {self.device}. Zero-shot with "
            "CLIP_benchmark's protocol, in percent; headline: the DataComp metric of each dataset."
        ]
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


def zero_shot_head(teacher: Teacher, test_set: TestSet, cache_dir: Path) -> torch.Tensor:
    """The teacher's (D, C) head for a test set's class names and templates (cached on disk)."""
    return cached_zero_shot_head(teacher, test_set.classnames, test_set.templates, cache_dir, test_set.name)


@dataclass
class _Outputs:
    """What one pass over a test set produced: logits per model (N, C), labels (N,), per-image bound."""

    labels: torch.Tensor
    logits: dict[str, torch.Tensor]
    skipped: int
    guaranteed: torch.Tensor | None = None
    distances: torch.Tensor | None = None


def _run_test_set(
    test_set: TestSet,
    head: torch.Tensor,
    teacher: Teacher | None,
    student: Student | None,
    transforms: list,
    config: EvaluateConfig,
    device: torch.device,
) -> _Outputs:
    """One pass over the images: every model on each batch. The teacher reads the first of
    ``transforms``, the student the last (one transform when they share their preprocessing)."""
    loader = make_loader(
        test_set, transforms, config.batch_size, config.workers, config.max_images, device.type == "cuda"
    )
    total = test_set.num_images if config.max_images is None else min(test_set.num_images, config.max_images)
    logits: dict[str, list[torch.Tensor]] = {"teacher": [], "student": []}
    labels, guaranteed, distances = [], [], []
    skipped = seen = 0
    with tqdm(total=total, unit="img", desc=test_set.name, disable=None) as bar:
        for batch in loader:
            keep = len(batch) if config.max_images is None else min(len(batch), config.max_images - seen)
            skipped += batch.skipped
            bar.update(keep + batch.skipped)
            if keep > 0:
                batch_labels = batch.labels[:keep]
                if batch_labels.min() < 0 or batch_labels.max() >= test_set.num_classes:
                    raise SynthdistillError(
                        f"{test_set.source} has label {int(batch_labels.max())} but only "
                        f"{test_set.num_classes} class names; the class list does not fit the data."
                    )
                images = [x[:keep].to(device, non_blocking=True) for x in batch.images]
                with torch.no_grad(), autocast(device, config.precision):
                    t = teacher.encode_images(images[0]) if teacher is not None else None
                    s = student(images[-1]) if student is not None else None
                labels.append(batch_labels)
                if t is not None:
                    t = F.normalize(t.float(), dim=-1)
                    logits["teacher"].append((100 * t @ head).cpu())
                if s is not None:
                    s = F.normalize(s.float(), dim=-1)
                    logits["student"].append((100 * s @ head).cpu())
                if t is not None and s is not None:
                    guaranteed.append(guaranteed_agreement(s, t, head).cpu())
                    distances.append((s - t).norm(dim=1).cpu())
                seen += keep
            if config.max_images is not None and seen >= config.max_images:
                break
    if not labels:
        raise SynthdistillError(f"No readable image in {test_set.source} ({skipped} could not be read).")
    if skipped:
        log.warning("%s: %d unreadable images skipped (of %d)", test_set.name, skipped, seen + skipped)
    return _Outputs(
        labels=torch.cat(labels),
        logits={k: torch.cat(v) for k, v in logits.items() if v},
        skipped=skipped,
        guaranteed=torch.cat(guaranteed) if guaranteed else None,
        distances=torch.cat(distances) if distances else None,
    )


def resolve_test_sets(config: EvaluateConfig, domain: Domain | None) -> list[TestSet]:
    """``config.datasets`` (registry names) and ``config.image_folder`` (class names from ``domain``);
    with neither, the domain's own test set when it is a registry dataset. Checks every folder first."""
    names = list(config.datasets)
    if not names and not config.image_folder and domain is not None and domain.eval is not None:
        names = [domain.name]
    test_sets = [registry_test_set(name, config.data_root, config.download) for name in names]
    if config.image_folder:
        test_sets.append(image_folder_test_set(config.image_folder, domain))
    return test_sets


def _teacher_name(
    student: Student | None, student_dir: Path | None, teacher: str | None, teacher_pretrained: str | None
) -> tuple[str, str | None]:
    if teacher is not None:
        if teacher_pretrained is None and student is not None and student.config.teacher == teacher:
            teacher_pretrained = student.config.teacher_pretrained  # the student's own teacher weights
        return teacher, teacher_pretrained
    if student is None:
        raise SynthdistillError("Name the teacher to evaluate with --teacher (and --teacher-pretrained).")
    if student.config.teacher is None:
        raise SynthdistillError(
            f"Student '{student_dir}' does not record its teacher; "
            "name it with --teacher and --teacher-pretrained."
        )
    return student.config.teacher, teacher_pretrained or student.config.teacher_pretrained


def _entries(
    test_set: TestSet, outputs: _Outputs, teacher_id: str, student_id: str | None, precision: str
) -> list[Entry]:
    entries = []
    for model, logits in outputs.logits.items():
        scores = classification_scores(logits, outputs.labels)
        entry = Entry(
            dataset=test_set.name,
            model=model,
            model_id=teacher_id if model == "teacher" else student_id,
            teacher=teacher_id,
            student=student_id,
            source=test_set.source,
            num_classes=test_set.num_classes,
            templates=list(test_set.templates),
            precision=precision,
            n_images=len(outputs.labels),
            skipped_images=outputs.skipped,
            headline_metric=test_set.headline_metric,
            headline=getattr(scores, test_set.headline_metric),
            **dataclasses.asdict(scores),
        )
        if model == "student" and "teacher" in outputs.logits:
            same = outputs.logits["student"].argmax(1) == outputs.logits["teacher"].argmax(1)
            entry.agreement_with_teacher = same.float().mean().item()
            entry.agreement_guaranteed_by_bound = outputs.guaranteed.float().mean().item()
            entry.mean_student_teacher_distance = outputs.distances.mean().item()
        entries.append(entry)
    return entries


def write_results(results: EvaluationResults, out_dir: str | Path) -> None:
    atomic_write_json(Path(out_dir) / RESULTS_JSON, results.to_json())
    atomic_write_text(Path(out_dir) / RESULTS_MD, results.to_markdown())


def evaluate(
    config: EvaluateConfig,
    out_dir: Path,
    *,
    student_dir: Path | None = None,
    teacher: str | None = None,
    teacher_pretrained: str | None = None,
    domain: Domain | None = None,
    device: str = "auto",
) -> EvaluationResults:
    """Zero-shot evaluation of a student (with its teacher beside it) or of a teacher alone.

    The teacher is the one named in the student's config.json unless ``teacher`` is given; the test
    sets are ``config.datasets`` and/or ``config.image_folder``, else the domain's registry dataset.
    Writes ``out_dir/results.json`` and ``out_dir/results.md``.
    """
    out_dir = Path(out_dir)
    torch_device = resolve_device(device)
    dtype = autocast_dtype(torch_device, config.precision)
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    test_sets = resolve_test_sets(config, domain)
    student = load_student(student_dir, torch_device) if student_dir is not None else None
    name, pretrained = _teacher_name(student, student_dir, teacher, teacher_pretrained)
    teacher_model = load_teacher(name, pretrained, torch_device)
    if student is not None and student.config.embed_dim != teacher_model.embed_dim:
        raise SynthdistillError(
            f"Student '{student_dir}' outputs {student.config.embed_dim}-d embeddings but teacher "
            f"'{teacher_model.identity}' has {teacher_model.embed_dim}-d ones; evaluate it with the "
            "teacher it was distilled from (--teacher, --teacher-pretrained)."
        )
    student_id = f"{student.config.timm_name} ({student_dir})" if student is not None else None
    results = EvaluationResults(teacher_model.identity, student_id, precision, str(torch_device))
    if not test_sets:
        results.note = (
            "No real test set to evaluate on: name registry datasets (evaluate.datasets, --datasets) "
            "or an image folder (evaluate.image_folder, --image-folder)."
        )
        log.warning(results.note)
    cache_dir = Path(config.head_cache).expanduser() if config.head_cache else out_dir / HEAD_CACHE
    runs_teacher = student is None or config.with_teacher
    transforms = [teacher_model.preprocess_val] if runs_teacher else []
    if student is not None:
        preprocessing = student.config.preprocessing or teacher_model.preprocessing
        if not transforms or preprocessing != teacher_model.preprocessing:
            transforms.append(validation_transform(preprocessing))
    for test_set in test_sets:
        head = zero_shot_head(teacher_model, test_set, cache_dir)
        outputs = _run_test_set(
            test_set,
            head,
            teacher_model if runs_teacher else None,
            student,
            transforms,
            config,
            torch_device,
        )
        results.entries += _entries(test_set, outputs, teacher_model.identity, student_id, precision)
    write_results(results, out_dir)
    return results
