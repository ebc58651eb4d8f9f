"""Distillation losses: a registry of named terms, combined by weight ('fd', 'fd:0.5,vl:0.5').

:class:`WeightedLoss` takes, per step on each rank:

- ``student``: (B, D) student image features, not normalised;
- ``teacher``: (B, D) teacher image features, not normalised;
- ``labels``: (B,) each image's text, an index into ``class_text`` (vl, mpc);
- ``class_text``: (C, D) L2-normalised teacher text embeddings (the class prompts, or the batch's
  distinct captions);
- ``text_ids``: (B,) optional ids that say which images share a text *across ranks* (mpc under
  DDP with captions, see :func:`caption_ids`); default ``labels``, which class indices already are.

The terms themselves see (student, teacher, image_text, text_ids) with ``image_text`` = (B, D)
``class_text[labels]``. Terms that compare images with the rest of the batch (vl, mpc, i2i) see
the whole global batch under DDP: :func:`gather_with_local_grad` collects every rank's share, so
the loss of a global batch does not depend on the number of processes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from synthdistill.errors import SynthdistillError

LOSSES: dict[str, type[nn.Module]] = {}
MAX_LOGIT_SCALE = 100.0  # CLIP clamps its learnable logit scale here
FD_VARIANTS = ("distance", "squared", "cosine", "mse", "l2")  # l2: the old name of squared


def register_loss(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def add(cls: type[nn.Module]) -> type[nn.Module]:
        LOSSES[name] = cls
        return cls

    return add


@dataclass(frozen=True)
class LossSettings:
    """What the terms may be configured with (each term reads what it needs).

    ``logit_scale``: the contrastive terms' fixed (or starting) 1/temperature: ``distill.logit_scale``
    when set, else the teacher's.
    """

    fd_variant: str = "distance"
    logit_scale: float = 100.0
    learnable_temperature: bool = False


@dataclass(frozen=True)
class BatchGroup:
    """Which share of the global batch this process holds: rank ``rank`` of ``world_size`` in the
    process group ``group`` (None: torch.distributed's default group)."""

    rank: int = 0
    world_size: int = 1
    group: Any = None


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the gradient times ``factor`` backward."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def gather_with_local_grad(tensors: Sequence[torch.Tensor], batch: BatchGroup) -> list[torch.Tensor]:
    """Every rank's (B_r, ...) tensors -> (sum B_r, ...) in rank order, on every rank.

    As open_clip's ``gather_features(local_loss=False, gather_with_grad=False)``: the other ranks'
    rows are constants and this rank's own tensor is put back in its slot, so gradient reaches the
    local rows. Every rank then computes the same global loss, and DDP *averages* the ranks'
    gradients; the local rows' gradient is therefore scaled by ``world_size``, so that the average
    equals the gradient of one process holding the whole batch. Ranks may hold different batch
    sizes (images that did not decode are dropped): rows are padded for the exchange and cut after.
    """
    if batch.world_size == 1:
        return list(tensors)
    if not torch.distributed.is_initialized():
        raise RuntimeError(f"gather over {batch.world_size} ranks without an initialised process group")
    device = tensors[0].device
    size = torch.tensor([len(tensors[0])], device=device)
    sizes = [torch.zeros_like(size) for _ in range(batch.world_size)]
    torch.distributed.all_gather(sizes, size, group=batch.group)
    sizes = [int(s) for s in sizes]
    gathered = []
    for tensor in tensors:
        padded = torch.zeros((max(sizes), *tensor.shape[1:]), dtype=tensor.dtype, device=device)
        padded[: len(tensor)] = tensor.detach()
        parts = [torch.empty_like(padded) for _ in range(batch.world_size)]
        torch.distributed.all_gather(parts, padded, group=batch.group)
        parts = [part[:n] for part, n in zip(parts, sizes, strict=True)]
        parts[batch.rank] = _ScaleGradient.apply(tensor, float(batch.world_size))
        gathered.append(torch.cat(parts))
    return gathered


def caption_ids(captions: Sequence[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """(B,) int64 ids equal exactly when captions are equal, on every rank (the first 63 bits of
    sha256): mpc's ``text_ids`` for captioned data, whose ``labels`` only index the rank's texts."""
    ids = [
        int.from_bytes(hashlib.sha256(c.encode("utf-8")).digest()[:8], "little") & (2**63 - 1)
        for c in captions
    ]
    return torch.tensor(ids, dtype=torch.int64, device=device)


@register_loss("fd")
class FeatureDistillation(nn.Module):
    """Match the teacher's image embedding, sample by sample (PAPER.md, "Stage 3").

    ``distance``: ||s^ - t^||_2 of the L2-normalised embeddings, not squared (the authors');
    ``squared`` (alias ``l2``): ||s^ - t^||^2 = 2 - 2 cos, which weights far-off samples more;
    ``cosine``: 1 - cos(s, t); ``mse``: mean squared error of the unnormalised features.
    Each is averaged over the batch.
    """

    needs_text = False
    batch_wide = False

    def __init__(self, settings: LossSettings):
        super().__init__()
        if settings.fd_variant not in FD_VARIANTS:
            raise SynthdistillError(
                f"Unknown fd variant '{settings.fd_variant}'; use distance, squared, cosine or mse."
            )
        self.variant = "squared" if settings.fd_variant == "l2" else settings.fd_variant

    def forward(self, student, teacher, image_text, text_ids) -> torch.Tensor:
        if self.variant == "mse":
            return F.mse_loss(student, teacher)
        s, t = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
        if self.variant == "cosine":
            return (1 - (s * t).sum(-1)).mean()
        if self.variant == "squared":
            return (s - t).pow(2).sum(-1).mean()
        return torch.linalg.vector_norm(s - t, dim=-1).mean()  # its gradient at s^ = t^ is 0, not NaN


class _Contrastive(nn.Module):
    """Logits scaled by CLIP's temperature: fixed, or learnable in log space as CLIP does.

    The clamp at 100 acts on the log: a learnable scale that starts at exactly 100 (a CLIP
    teacher's) still gets gradient (clamping exp(log 100) = 100.0000076 passed none).
    """

    needs_text = True
    batch_wide = True

    def __init__(self, settings: LossSettings):
        super().__init__()
        max_log_scale = torch.tensor(math.log(MAX_LOGIT_SCALE))
        log_scale = torch.minimum(torch.tensor(math.log(settings.logit_scale)), max_log_scale)
        self.register_buffer("max_log_scale", max_log_scale, persistent=False)
        if settings.learnable_temperature:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=self.max_log_scale).exp()

    @torch.no_grad()
    def clamp_temperature_(self) -> None:
        """Pull a learnable log scale that an optimiser step pushed past log 100 back onto it."""
        self.log_scale.clamp_(max=self.max_log_scale)

    def symmetric_cross_entropy(self, logits: torch.Tensor) -> torch.Tensor:
        """CLIP's loss: the positives on the diagonal, rows and columns averaged."""
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


@register_loss("vl")
class VisionLanguageDistillation(_Contrastive):
    """CLIP's symmetric contrastive loss between student image embeddings and the texts of their
    classes: image i's positive is text i only (images of one class in a batch are negatives)."""

    def forward(self, student, teacher, image_text, text_ids) -> torch.Tensor:
        return self.symmetric_cross_entropy(self.scale * F.normalize(student, dim=-1) @ image_text.T)


@register_loss("mpc")
class MultiPositiveContrastive(_Contrastive):
    """Every text of the same class is a positive (PAPER.md, appendix A.15):
    p_ij = 1[y_i = y_j] / sum_k 1[y_i = y_k], q_ij = softmax_j(s_i . T_j / tau),
    loss = -sum_j p_ij log q_ij, averaged over images i."""

    def forward(self, student, teacher, image_text, text_ids) -> torch.Tensor:
        logits = self.scale * F.normalize(student, dim=-1) @ image_text.T
        positives = (text_ids[:, None] == text_ids[None, :]).float()
        target = positives / positives.sum(dim=1, keepdim=True)
        return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


@register_loss("i2i")
class ImageToImageContrastive(_Contrastive):
    """InfoNCE of student against teacher image embeddings (PAPER.md, "Stage 3": the authors'
    image-to-image option): image i's positive is the teacher's embedding of image i, the batch's
    other teacher embeddings are negatives. Symmetric like vl (our choice: PAPER.md does not say),
    with the same temperature settings."""

    needs_text = False

    def forward(self, student, teacher, image_text, text_ids) -> torch.Tensor:
        logits = self.scale * F.normalize(student, dim=-1) @ F.normalize(teacher, dim=-1).T
        return self.symmetric_cross_entropy(logits)


def parse_loss_spec(spec: str) -> list[tuple[str, float]]:
    """'fd' -> [('fd', 1.0)]; 'fd:0.5,vl:0.5' -> [('fd', 0.5), ('vl', 0.5)]."""
    terms = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name, _, weight = part.partition(":")
        name = name.strip()
        if name not in LOSSES:
            raise SynthdistillError(
                f"Unknown loss '{name}' in '{spec}'; use {', '.join(LOSSES)} "
                "or a weighted sum such as 'fd:0.5,vl:0.5'."
            )
        try:
            value = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise SynthdistillError(
                f"Loss weight '{weight}' of '{name}' is not a number (e.g. 'fd:0.5,vl:0.5')."
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
    """sum_k weight_k * term_k: a scalar.

    Per-sample terms (fd) average this rank's share of the batch (DDP's gradient average then
    makes it the global batch's mean); batch-wide terms (vl, mpc, i2i) see the global batch
    gathered over ``batch_group`` and give the same value on every rank.
    """

    def __init__(self, spec: str, settings: LossSettings, batch_group: BatchGroup | None = None):
        super().__init__()
        terms = parse_loss_spec(spec)
        self.weights = dict(terms)
        self.terms = nn.ModuleDict({name: LOSSES[name](settings) for name, _ in terms})
        self.batch_group = batch_group or BatchGroup()

    @property
    def needs_text(self) -> bool:
        return any(term.needs_text for term in self.terms.values())

    def clamp_temperature_(self) -> None:
        """Call after each optimiser step (as CLIP training does): keeps learnable log scales <= log 100."""
        for term in self.terms.values():
            if isinstance(term, _Contrastive) and isinstance(term.log_scale, nn.Parameter):
                term.clamp_temperature_()

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        labels: torch.Tensor | None = None,
        class_text: torch.Tensor | None = None,
        text_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        image_text = class_text[labels] if self.needs_text else None
        ids = (labels if text_ids is None else text_ids) if self.needs_text else None
        local = (student, teacher, image_text, ids)
        batch_wide = local
        if any(term.batch_wide for term in self.terms.values()):
            present = [t for t in local if t is not None]
            gathered = iter(gather_with_local_grad(present, self.batch_group))
            batch_wide = tuple(None if t is None else next(gathered) for t in local)
        return sum(
            self.weights[name] * term(*(batch_wide if term.batch_wide else local))
            for name, term in self.terms.items()
        )
