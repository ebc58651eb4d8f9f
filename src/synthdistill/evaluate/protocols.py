"""The zero-shot protocols: which templates, preprocessing, precision and metric a number is measured with.

``clip_benchmark`` (the published tables, DataComp's evaluation): the registry's template ensemble,
each model's own validation preprocessing, the requested precision under CLIP_benchmark's autocast
scope (text head, image tower and final product), the DataComp headline metric of each dataset.

``paper`` (the authors' code, PAPER.md "Stage 4"): one template per dataset, one preprocessed
tensor for every model (short side resized to the teacher's input size, 224 for ViT-B/32, centre
crop, bilinear, CLIP mean/std), fp32, top-1 accuracy as the headline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from synthdistill.errors import SynthdistillError
from synthdistill.evaluate.test_sets import TestSet
from synthdistill.teacher import Preprocessing

PROTOCOLS = ("clip_benchmark", "paper")

# The authors' single template per dataset (PAPER.md, Stage 4 [authors]), keyed by registry name.
# It belongs in the registry entries (registry/data/*.json), which have no such field yet; until they
# do, this table is the one place it lives. A user's own classes get PAPER_DEFAULT_TEMPLATE.
PAPER_TEMPLATES = {
    "pets": "a photo of a {c}, a type of pet.",
    "food101": "a photo of a {c}, a type of food.",
    "flowers102": "a photo of a {c}, a type of flower.",
    "cars": "a photo of a {c}, a type of car.",
    "aircraft": "a photo of a {c}, a type of aircraft.",
    "dtd": "a photo of a {c} texture.",
    "imagenet100": "a photo of a {c}",
}
PAPER_DEFAULT_TEMPLATE = "a photo of a {c}."
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class ProtocolSetup:
    """How one protocol measures one test set. ``shared_preprocessing``: the one tensor every model
    reads (paper), or None for each model's own (clip_benchmark); ``amp_dtype`` None is fp32."""

    protocol: str
    templates: tuple[str, ...]
    headline_metric: str
    amp_dtype: torch.dtype | None
    shared_preprocessing: Preprocessing | None

    @property
    def precision(self) -> str:
        return PRECISION_NAMES[self.amp_dtype]


def paper_template(dataset: str | None) -> str:
    """The authors' template for a registry dataset (None: a user's own classes)."""
    return PAPER_TEMPLATES.get(dataset, PAPER_DEFAULT_TEMPLATE) if dataset else PAPER_DEFAULT_TEMPLATE


def paper_preprocessing(image_size: int) -> Preprocessing:
    """The authors' test transform: short side to ``image_size``, centre crop, bilinear, CLIP mean/std."""
    return Preprocessing(image_size, CLIP_MEAN, CLIP_STD, interpolation="bilinear", resize_mode="shortest")


def protocol_setup(
    protocol: str, test_set: TestSet, amp_dtype: torch.dtype | None, teacher_image_size: int
) -> ProtocolSetup:
    """The setup of ``protocol`` on ``test_set``; ``amp_dtype`` is the requested precision (the paper
    protocol is fp32 whatever is asked), ``teacher_image_size`` the paper protocol's crop."""
    if protocol == "clip_benchmark":
        return ProtocolSetup(protocol, test_set.templates, test_set.headline_metric, amp_dtype, None)
    if protocol == "paper":
        templates = (paper_template(test_set.dataset),)
        return ProtocolSetup(protocol, templates, "top1", None, paper_preprocessing(teacher_image_size))
    raise SynthdistillError(f"Unknown evaluation protocol '{protocol}'; use one of {', '.join(PROTOCOLS)}.")


def zero_shot_logits(
    encode: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    head: torch.Tensor,
    amp_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, D) normalised embeddings and (B, C) logits = 100 * cosine, both returned in fp32.

    The autocast scope is CLIP_benchmark's ``run_classification``: image tower, normalisation and the
    product with the head all inside it, so a mixed-precision run rounds where that code rounds.
    """
    with torch.no_grad(), torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        embeddings = F.normalize(encode(images), dim=-1)
        logits = 100.0 * embeddings @ head
    return embeddings.float(), logits.float()


def top1_predictions(logits: torch.Tensor) -> torch.Tensor:
    """(N, C) -> (N,) predicted classes, ties broken as CLIP_benchmark's ``accuracy()`` breaks them:
    the first index of ``topk(5)`` (``topk(1)`` below 5 classes), which is not always argmax's."""
    k = 5 if logits.shape[1] >= 5 else 1
    return logits.topk(k, dim=1, largest=True, sorted=True).indices[:, 0]


@dataclass
class ClassificationScores:
    """CLIP_benchmark's metrics, as fractions in [0, 1]; top-5 is None below 5 classes."""

    top1: float
    top5: float | None
    mean_per_class_recall: float


def classification_scores(logits: torch.Tensor, labels: torch.Tensor) -> ClassificationScores:
    """(N, C) logits and (N,) labels -> top-1, top-5 and mean per-class recall, as CLIP_benchmark
    computes them: top-k from ``topk`` (its ``accuracy()``), mean per-class recall from argmax (its
    call of scikit-learn's ``balanced_accuracy_score``, which averages over the classes present)."""
    num_images, num_classes = logits.shape
    top1 = (top1_predictions(logits) == labels).sum().item() / num_images
    top5 = None
    if num_classes >= 5:
        in_top5 = (logits.topk(5, dim=1, largest=True, sorted=True).indices == labels[:, None]).any(dim=1)
        top5 = in_top5.sum().item() / num_images
    correct = logits.argmax(dim=1) == labels
    per_class = torch.bincount(labels, minlength=num_classes).double()
    hits = torch.bincount(labels[correct], minlength=num_classes).double()
    present = per_class > 0
    return ClassificationScores(
        top1=top1, top5=top5, mean_per_class_recall=(hits[present] / per_class[present]).mean().item()
    )
