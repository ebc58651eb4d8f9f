"""The zero-shot classifier: a student, its teacher's cached zero-shot head and normalisation in one module.

Export turns it into every deployable format, and ``predict --student`` runs it in PyTorch. Both
take the head from :func:`synthdistill.teacher.cached_zero_shot_head` for the same classes,
templates and teacher, so a student folder classifies exactly as the model exported from it.
Export records the classes, templates and superclass in ``labels.json``; ``predict --student``
reads them from there (the run's ``export/labels.json`` by default), so it needs no class options.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from synthdistill.deploy.predict import (
    LABELS_NAME,
    LOGIT_SCALE,
    ModelInfo,
    Prediction,
    classify_files,
    read_labels,
)
from synthdistill.errors import SynthdistillError
from synthdistill.registry import Domain
from synthdistill.student import Student, load_student
from synthdistill.teacher import Preprocessing, Teacher, cached_zero_shot_head, load_teacher

HEAD_CACHE = "zero_shot_heads"


class ZeroShotClassifier(nn.Module):
    """(B, 3, S, S) RGB in [0, 1] -> logits (B, C) = 100 * embedding @ head, embedding (B, D) L2-normalised.

    Normalisation with the student's mean/std happens inside, so a deployment only resizes and crops.
    """

    def __init__(self, student: Student, head: torch.Tensor, preprocessing: Preprocessing):
        super().__init__()
        self.student = student
        self.register_buffer("head", head.float().cpu().contiguous())
        self.register_buffer("mean", torch.tensor(preprocessing.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preprocessing.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.student((images - self.mean) / self.std)
        return LOGIT_SCALE * embedding @ self.head, embedding


def run_head_cache(run_root: Path) -> Path:
    """Where a run caches its zero-shot heads: evaluate's default, ``<run>/eval/zero_shot_heads``."""
    return Path(run_root) / "eval" / HEAD_CACHE


def build_classifier(
    student_dir: Path,
    *,
    domain_name: str,
    classnames: Sequence[str],
    templates: Sequence[str],
    superclass: str = "",
    head_cache: Path | None,
    device: str | torch.device = "cpu",
) -> tuple[ZeroShotClassifier, Teacher, ModelInfo]:
    """A student folder + classes -> the CPU classifier, the teacher named in its config, and its ModelInfo.

    The head is the teacher's template ensemble over ``classnames`` x ``templates`` (computed on
    ``device``), cached in ``head_cache`` under the label ``domain_name`` as evaluate caches it.
    """
    student = load_student(student_dir)
    config = student.config
    if config.teacher is None or config.preprocessing is None:
        raise SynthdistillError(
            f"'{Path(student_dir) / 'config.json'}' does not name its teacher and preprocessing; "
            "it was not written by `synthdistill distill`, train the student again."
        )
    teacher = load_teacher(config.teacher, config.teacher_pretrained, device=device)
    if teacher.embed_dim != config.embed_dim:
        raise SynthdistillError(
            f"The student embeds to {config.embed_dim} dimensions but its teacher '{teacher.identity}' to "
            f"{teacher.embed_dim}; the student folder does not belong to this teacher."
        )
    head = cached_zero_shot_head(teacher, classnames, templates, head_cache, domain_name)
    classifier = ZeroShotClassifier(student, head, config.preprocessing).eval()
    pre = config.preprocessing
    info = ModelInfo(
        classnames=tuple(classnames),
        image_size=pre.image_size,
        mean=tuple(pre.mean),
        std=tuple(pre.std),
        interpolation=pre.interpolation,
        resize_mode=pre.resize_mode,
        domain=domain_name,
        teacher=teacher.identity,
        student=config.timm_name,
        embed_dim=config.embed_dim,
        templates=tuple(templates),
        superclass=superclass,
    )
    return classifier, teacher, info


def classifier_for_domain(
    student_dir: Path, domain: Domain, head_cache: Path | None, device: str | torch.device = "cpu"
) -> tuple[ZeroShotClassifier, Teacher, ModelInfo]:
    """:func:`build_classifier` over a registry dataset or a user's class list."""
    return build_classifier(
        student_dir,
        domain_name=domain.name,
        classnames=domain.classnames,
        templates=domain.templates,
        superclass=domain.superclass,
        head_cache=head_cache,
        device=device,
    )


def _student_labels(student_dir: Path, labels: Path | None) -> ModelInfo:
    """The classes and templates a student was exported with: ``labels``, else the run's labels.json."""
    path = Path(labels) if labels is not None else Path(student_dir).parent / "export" / LABELS_NAME
    if labels is None and not path.is_file():
        raise SynthdistillError(
            f"Predicting with the student folder '{student_dir}' needs the classes: pass --labels "
            "<export>/labels.json (the classes and templates it was exported with), --dataset or --classes."
        )
    info = read_labels(path)
    if not info.templates:
        raise SynthdistillError(
            f"'{path}' records no zero-shot templates (an older export); export the student again "
            "or pass --dataset / --classes with --superclass."
        )
    return info


def predict_student(
    student_dir: Path,
    images: list[str],
    *,
    labels: Path | None = None,
    domain: Domain | None = None,
    top_k: int = 5,
    batch_size: int = 32,
    on_skip: Callable[[Path, str], None] | None = None,
) -> list[Prediction]:
    """Classify images with a student folder in PyTorch, exactly as its exported ONNX model does.

    The classes come from ``domain`` if given, else from ``labels`` (an export's labels.json), else
    from ``<student>/../export/labels.json``. The head is cached in the run's zero-shot head cache
    when that folder exists (the student lives in a run directory that was evaluated or exported).
    """
    student_dir = Path(student_dir)
    if top_k < 1 or batch_size < 1:
        raise SynthdistillError("--top-k and --batch-size must be at least 1.")
    if labels is not None and domain is not None:
        raise SynthdistillError("Pass either --labels or --dataset / --classes, not both.")
    cache = run_head_cache(student_dir.parent)
    head_cache = cache if cache.is_dir() else None
    if domain is not None:
        classifier, _, info = classifier_for_domain(student_dir, domain, head_cache)
    else:
        exported = _student_labels(student_dir, labels)
        classifier, _, info = build_classifier(
            student_dir,
            domain_name=exported.domain,
            classnames=exported.classnames,
            templates=exported.templates,
            superclass=exported.superclass,
            head_cache=head_cache,
        )

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return classifier(torch.from_numpy(batch))[0].numpy()

    return classify_files(run, info, images, top_k=top_k, batch_size=batch_size, on_skip=on_skip)
