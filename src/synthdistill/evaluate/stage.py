"""Stage 4: zero-shot accuracy on real test sets, the student and its teacher side by side.

Each test set is measured under every protocol asked for (``evaluate.protocols``; see
:mod:`synthdistill.evaluate.protocols`): the teacher's zero-shot head for the protocol's templates
(cached on disk), one pass over the images with every model on each batch, logits = 100 *
normalised image embedding @ head, then top-1, top-5, mean per-class recall and the protocol's
headline metric. For a student, the teacher sees the same images in the same pass; we report how
often the two agree and how much of that agreement the measured embedding distance alone
guarantees (PAPER.md, "The agreement bound").
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from synthdistill.config import EvaluateConfig
from synthdistill.errors import SynthdistillError
from synthdistill.evaluate.agreement import AgreementBound
from synthdistill.evaluate.protocols import (
    PRECISION_NAMES,
    PROTOCOLS,
    ProtocolSetup,
    classification_scores,
    protocol_setup,
    top1_predictions,
    zero_shot_logits,
)
from synthdistill.evaluate.results import Entry, EvaluationResults, write_results
from synthdistill.evaluate.test_sets import (
    MissingTestSet,
    TestSet,
    image_folder_test_set,
    make_loader,
    registry_test_set,
)
from synthdistill.progress import progress_bar
from synthdistill.registry import Domain
from synthdistill.runtime import autocast_dtype, resolve_device
from synthdistill.student import Student, load_student
from synthdistill.teacher import Preprocessing, Teacher, cached_zero_shot_head, load_teacher

log = logging.getLogger(__name__)

HEAD_CACHE = "zero_shot_heads"


@dataclass
class Encoder:
    """A model under evaluation: its name in the results ('teacher' or 'student'), images (B, 3, H, W)
    -> (B, D) embeddings, which of the loader's transforms it reads, and what that transform is."""

    name: str
    encode: Callable[[torch.Tensor], torch.Tensor]
    transform: int
    preprocessing: Preprocessing


@dataclass
class PassOutputs:
    """What one pass over a test set produced: logits per model (N, C) in fp32, labels (N,), how many
    images were skipped, and with a student and its teacher the per-image bound and distance (N,)."""

    labels: torch.Tensor
    logits: dict[str, torch.Tensor]
    skipped: int
    guaranteed: torch.Tensor | None = None
    distances: torch.Tensor | None = None


def zero_shot_pass(
    test_set: TestSet,
    head: torch.Tensor,
    encoders: Sequence[Encoder],
    transforms: Sequence[Callable],
    *,
    amp_dtype: torch.dtype | None,
    device: torch.device,
    batch_size: int,
    workers: int = 0,
    max_images: int | None = None,
) -> PassOutputs:
    """One pass over the images, every encoder on each batch (CLIP_benchmark's autocast scope)."""
    loader = make_loader(test_set, transforms, batch_size, workers, max_images, device.type == "cuda")
    total = test_set.num_images if max_images is None else min(test_set.num_images, max_images)
    names = [encoder.name for encoder in encoders]
    bound = AgreementBound(head) if {"teacher", "student"} <= set(names) else None
    logits: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    labels, guaranteed, distances = [], [], []
    skipped = seen = 0
    with progress_bar(total, test_set.name, unit="img") as bar:
        for batch in loader:
            keep = len(batch) if max_images is None else min(len(batch), max_images - seen)
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
                embeddings = {}
                for encoder in encoders:
                    embedding, batch_logits = zero_shot_logits(
                        encoder.encode, images[encoder.transform], head, amp_dtype
                    )
                    embeddings[encoder.name] = embedding
                    logits[encoder.name].append(batch_logits.cpu())
                labels.append(batch_labels)
                if bound is not None:
                    s, t = embeddings["student"], embeddings["teacher"]
                    guaranteed.append(bound.guaranteed(s, t).cpu())
                    distances.append((s - t).norm(dim=1).cpu())
                seen += keep
            if max_images is not None and seen >= max_images:
                break
    if not labels:
        raise SynthdistillError(f"No readable image in {test_set.source} ({skipped} could not be read).")
    if skipped:
        log.warning("%s: %d unreadable images skipped (of %d)", test_set.name, skipped, seen + skipped)
    return PassOutputs(
        labels=torch.cat(labels),
        logits={name: torch.cat(chunks) for name, chunks in logits.items()},
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


def _encoders(
    setup: ProtocolSetup, teacher: Teacher, student: Student | None, runs_teacher: bool
) -> tuple[list[Encoder], list[Callable]]:
    """The models to run and the loader's transforms: one shared tensor (paper), or each model's own
    validation preprocessing (a student without one has its teacher's), read once when student and
    teacher share it (clip_benchmark)."""
    student_pre = (student.config.preprocessing or teacher.preprocessing) if student is not None else None
    if setup.shared_preprocessing is not None:
        teacher_pre = student_pre = setup.shared_preprocessing
        transforms = [setup.shared_preprocessing.eval_transform()]
    else:
        teacher_pre = teacher.preprocessing
        transforms = [teacher.preprocess_val] if runs_teacher else []
        if student is not None and (not runs_teacher or student_pre != teacher_pre):
            transforms.append(student_pre.eval_transform())
    encoders = [Encoder("teacher", teacher.model.encode_image, 0, teacher_pre)] if runs_teacher else []
    if student is not None:
        encoders.append(Encoder("student", student.forward_features, len(transforms) - 1, student_pre))
    return encoders, transforms


def _entries(
    test_set: TestSet,
    setup: ProtocolSetup,
    encoders: Sequence[Encoder],
    outputs: PassOutputs,
    teacher_id: str,
    student_id: str | None,
) -> list[Entry]:
    entries = []
    for encoder in encoders:
        logits = outputs.logits[encoder.name]
        scores = classification_scores(logits, outputs.labels)
        entry = Entry(
            dataset=test_set.name,
            model=encoder.name,
            model_id=teacher_id if encoder.name == "teacher" else student_id,
            teacher=teacher_id,
            student=student_id,
            source=test_set.source,
            num_classes=test_set.num_classes,
            protocol=setup.protocol,
            templates=list(setup.templates),
            precision=setup.precision,
            preprocessing=dataclasses.asdict(encoder.preprocessing),
            n_images=len(outputs.labels),
            skipped_images=outputs.skipped,
            headline_metric=setup.headline_metric,
            headline=getattr(scores, setup.headline_metric),
            **dataclasses.asdict(scores),
        )
        if encoder.name == "student" and outputs.guaranteed is not None:
            teacher_top1 = top1_predictions(outputs.logits["teacher"])
            entry.agreement_with_teacher = (top1_predictions(logits) == teacher_top1).float().mean().item()
            entry.agreement_guaranteed_by_bound = outputs.guaranteed.float().mean().item()
            entry.mean_student_teacher_distance = outputs.distances.mean().item()
        entries.append(entry)
    return entries


def _check_protocols(protocols: Sequence[str]) -> list[str]:
    if not protocols:
        raise SynthdistillError(f"evaluate.protocols is empty; name one or more of {', '.join(PROTOCOLS)}.")
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise SynthdistillError(
            f"Unknown evaluation protocol '{unknown[0]}'; use one or more of {', '.join(PROTOCOLS)}."
        )
    return list(dict.fromkeys(protocols))


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
    """Zero-shot evaluation of a student (with its teacher beside it) or of a teacher alone, under
    every protocol of ``config.protocols``.

    The teacher is the one named in the student's config.json unless ``teacher`` is given; the test
    sets are ``config.datasets`` and/or ``config.image_folder``, else the domain's registry dataset.
    Writes ``out_dir/results.json`` and ``out_dir/results.md``.
    """
    out_dir = Path(out_dir)
    protocols = _check_protocols(config.protocols)
    torch_device = resolve_device(device)
    amp_dtype = autocast_dtype(torch_device, config.precision)
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
    results = EvaluationResults(
        teacher_model.identity, student_id, PRECISION_NAMES[amp_dtype], str(torch_device), protocols
    )
    if not test_sets:
        results.note = (
            "No real test set to evaluate on: name registry datasets (evaluate.datasets, --datasets) "
            "or an image folder (evaluate.image_folder, --image-folder)."
        )
        log.warning(results.note)
    cache_dir = Path(config.head_cache).expanduser() if config.head_cache else out_dir / HEAD_CACHE
    runs_teacher = student is None or config.with_teacher
    image_size = teacher_model.preprocessing.image_size
    for test_set in test_sets:
        for protocol in protocols:
            setup = protocol_setup(protocol, test_set, amp_dtype, image_size)
            head = cached_zero_shot_head(
                teacher_model, test_set.classnames, setup.templates, cache_dir, test_set.name, setup.amp_dtype
            )
            encoders, transforms = _encoders(setup, teacher_model, student, runs_teacher)
            outputs = zero_shot_pass(
                test_set,
                head,
                encoders,
                transforms,
                amp_dtype=setup.amp_dtype,
                device=torch_device,
                batch_size=config.batch_size,
                workers=config.workers,
                max_images=config.max_images,
            )
            results.entries += _entries(
                test_set, setup, encoders, outputs, teacher_model.identity, student_id
            )
    write_results(results, out_dir)
    return results


def zero_shot_top1(
    model: torch.nn.Module,
    preprocessing: Preprocessing,
    teacher: Teacher,
    dataset: str,
    data_root: str | Path,
    protocol: str = "paper",
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 128,
    max_images: int | None = None,
    workers: int = 0,
    precision: str = "fp32",
    head_cache: str | Path | None = None,
) -> float | None:
    """Zero-shot top-1 (a fraction) of ``model`` on a registry test set, for validation during training.

    ``model`` maps (B, 3, H, W) images to (B, D) unit vectors (the student, any mode: it is evaluated
    in eval mode and handed back in its own); ``preprocessing`` is its own (the paper protocol replaces
    it by the shared crop). The head is built once through ``cached_zero_shot_head`` (kept under
    ``head_cache`` when given, so later epochs reuse it). A test set whose files are missing under
    ``data_root`` gives None and one log line: validation is skipped, training goes on.
    """
    _check_protocols([protocol])
    try:
        test_set = registry_test_set(dataset, data_root)
    except MissingTestSet as e:
        log.warning("Validation on '%s' skipped: %s", dataset, e)
        return None
    device = torch.device(device)
    amp_dtype = autocast_dtype(device, precision)
    setup = protocol_setup(protocol, test_set, amp_dtype, teacher.preprocessing.image_size)
    head = cached_zero_shot_head(
        teacher, test_set.classnames, setup.templates, head_cache, test_set.name, setup.amp_dtype
    ).to(device)
    preprocessing = setup.shared_preprocessing or preprocessing
    encoder = Encoder("student", model, 0, preprocessing)
    was_training = model.training
    model.eval()
    try:
        outputs = zero_shot_pass(
            test_set,
            head,
            [encoder],
            [preprocessing.eval_transform()],
            amp_dtype=setup.amp_dtype,
            device=device,
            batch_size=batch_size,
            workers=workers,
            max_images=max_images,
        )
    finally:
        model.train(was_training)
    return classification_scores(outputs.logits["student"], outputs.labels).top1
