"""How far a student's zero-shot predictions provably follow its teacher's (PAPER.md, "The agreement bound").

With unit-norm class embeddings w_c and unit-norm image embeddings s (student) and t (teacher), every
logit moves by at most eps = ||s - t|| (times the scale), so s.w_y - s.w_c >= (t.w_y - t.w_c) -
eps ||w_y - w_c||: the student predicts the teacher's class y when, for every c != y, the teacher's
margin exceeds eps ||w_y - w_c||.
"""

from __future__ import annotations

import torch

from synthdistill.evaluate.protocols import top1_predictions


class AgreementBound:
    """The bound for one (D, C) unit-norm head; the (C, C) class distances ||w_a - w_b|| are computed
    once here, not per batch."""

    def __init__(self, head: torch.Tensor):
        self.head = head
        self.class_distances = torch.cdist(head.T, head.T)

    def guaranteed(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """(N, D) L2-normalised student and teacher embeddings -> (N,) bool: agreement guaranteed by
        the measured distance alone. y is the teacher's top-1 prediction (CLIP_benchmark's tie rule)."""
        teacher_logits = teacher @ self.head
        predicted = top1_predictions(teacher_logits)
        eps = (student - teacher).norm(dim=1)
        margins = teacher_logits.gather(1, predicted[:, None]) - teacher_logits
        holds = margins > eps[:, None] * self.class_distances[predicted]
        holds[torch.arange(len(predicted)), predicted] = True
        return holds.all(dim=1)
