"""Stage 3, distillation: the loop (:mod:`.loop`), its data sources, checkpoints, log, optimiser
and the teacher cache."""

from synthdistill.train.loop import LOG_NAME, DistillSummary, distill_student

__all__ = ["LOG_NAME", "DistillSummary", "distill_student"]
