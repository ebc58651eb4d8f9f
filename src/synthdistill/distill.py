"""The former home of stage 3, kept as an import path: ``synthdistill.train`` holds it now."""

from synthdistill.train.loop import LOG_NAME, DistillSummary, distill_student
from synthdistill.train.loop import distill_student as distill

__all__ = ["LOG_NAME", "DistillSummary", "distill", "distill_student"]
