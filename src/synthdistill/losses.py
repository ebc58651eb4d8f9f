"""Distillation losses: a registry of named terms, combined by weight ('fd', 'fd:1,vl:0.5').

Every term takes the same inputs:

- ``student``: (B, D) student image features, not normalised;
- ``teacher``: (B, D) teacher image features, not normalised;
- ``labels``: (B,) class indices of the images;
- ``class_text``: (C, D) L2-normalised teacher text embeddings of the class prompts (or None).

Terms that need ``labels`` and ``class_text`` say so with ``needs_text``. With captioned data the
batch's distinct captions take the place of the classes (``class_text`` their (C, D) embeddings,
``labels`` each image's caption), so identical captions are positives of each other in mpc.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from synthdistill.errors import SynthdistillError

LOSSES: dict[str, type[nn.Module]] = {}
MAX_LOGIT_SCALE = 100.0  # CLIP clamps its learnable logit scale here


def register_loss(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def add(cls: type[nn.Module]) -> type[nn.Module]:
        LOSSES[name] = cls
        return cls

    return add


@dataclass(frozen=True)
class LossSettings:
    """What the terms may be configured with (each term reads what it needs)."""

    fd_variant: str = "l2"
    logit_scale: float = 100.0
    learnable_temperature: bool = False


@register_loss("fd")
class FeatureDistillation(nn.Module):
    """Match the teacher's image embedding.

    ``l2``: ||s - t||^2 of the normalised embeddings (= 2 - 2 cos), the paper's loss;
    ``cosine``: 1 - cos(s, t); ``mse``: mean squared error of the unnormalised features.
    """

    needs_text = False

    def __init__(self, settings: LossSettings):
        super().__init__()
        if settings.fd_variant not in ("l2", "cosine", "mse"):
            raise SynthdistillError(f"Unknown fd variant '{settings.fd_variant}'; use l2, cosine or mse.")
        self.variant = settings.fd_variant

    def forward(self, student, teacher, labels, class_text) -> torch.Tensor:
        if self.variant == "mse":
            return F.mse_loss(student, teacher)
        s, t = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
        if self.variant == "cosine":
            return (1 - (s * t).sum(-1)).mean()
        return (s - t).pow(2).sum(-1).mean()


class _Contrastive(nn.Module):
    """Image-text logits with CLIP's temperature: the teacher's logit scale, fixed or learnable."""

    needs_text = True

    def __init__(self, settings: LossSettings):
        super().__init__()
        log_scale = torch.tensor(math.log(settings.logit_scale))
        if settings.learnable_temperature:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    def logits(self, student: torch.Tensor, labels: torch.Tensor, class_text: torch.Tensor) -> torch.Tensor:
        """(B, B): scale * cos(image i, text of image j's class)."""
        scale = self.log_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        return scale * F.normalize(student, dim=-1) @ class_text[labels].T


@register_loss("vl")
class VisionLanguageDistillation(_Contrastive):
    """CLIP's symmetric contrastive loss between student image embeddings and the texts of their
    classes: image i's positive is text i only (images of one class in a batch are negatives)."""

    def forward(self, student, teacher, labels, class_text) -> torch.Tensor:
        logits = self.logits(student, labels, class_text)
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


@register_loss("mpc")
class MultiPositiveContrastive(_Contrastive):
    """Every text of the same class is a positive (PAPER.md, appendix A.15):
    p_ij = 1[y_i = y_j] / sum_k 1[y_i = y_k], q_ij = softmax_j(s_i . T_j / tau),
    loss = -sum_j p_ij log q_ij, averaged over images i."""

    def forward(self, student, teacher, labels, class_text) -> torch.Tensor:
        logits = self.logits(student, labels, class_text)
        positives = (labels[:, None] == labels[None, :]).float()
        target = positives / positives.sum(dim=1, keepdim=True)
        return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def parse_loss_spec(spec: str) -> list[tuple[str, float]]:
    """'fd' -> [('fd', 1.0)]; 'fd:1,vl:0.5' -> [('fd', 1.0), ('vl', 0.5)]."""
    terms = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name, _, weight = part.partition(":")
        name = name.strip()
        if name not in LOSSES:
            raise SynthdistillError(
                f"Unknown loss '{name}' in '{spec}'; use {', '.join(LOSSES)} "
                "or a weighted sum such as 'fd:1,vl:0.5'."
            )
        try:
            value = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise SynthdistillError(
                f"Loss weight '{weight}' of '{name}' is not a number (e.g. 'fd:1,vl:0.5')."
            ) from None
        if not math.isfinite(value) or value < 0:
            raise SynthdistillError(f"Loss weight of '{name}' must be a finite number >= 0; got {weight}.")
        terms.append((name, value))
    if not terms or len({name for name, _ in terms}) != len(terms):
        raise SynthdistillError(
            f"Loss '{spec}' must name each of {', '.join(LOSSES)} at most once, at least one."
        )
    return terms


class WeightedLoss(nn.Module):
    """sum_k weight_k * term_k(student, teacher, labels, class_text): a scalar."""

    def __init__(self, spec: str, settings: LossSettings):
        super().__init__()
        terms = parse_loss_spec(spec)
        self.weights = dict(terms)
        self.terms = nn.ModuleDict({name: LOSSES[name](settings) for name, _ in terms})

    @property
    def needs_text(self) -> bool:
        return any(term.needs_text for term in self.terms.values())

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        labels: torch.Tensor | None = None,
        class_text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return sum(
            self.weights[name] * term(student, teacher, labels, class_text)
            for name, term in self.terms.items()
        )
