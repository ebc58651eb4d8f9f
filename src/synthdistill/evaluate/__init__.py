"""Stage 4, zero-shot evaluation: protocols (clip_benchmark, paper), test sets, the agreement bound.

- :mod:`~synthdistill.evaluate.stage`: ``evaluate`` (the stage) and ``zero_shot_top1`` (validation
  during training);
- :mod:`~synthdistill.evaluate.protocols`: what each protocol measures and how (templates,
  preprocessing, precision, metrics);
- :mod:`~synthdistill.evaluate.test_sets`: the real test sets (torchvision, WebDataset mirrors,
  image folders, a run's own shards);
- :mod:`~synthdistill.evaluate.agreement`: the student-teacher agreement bound;
- :mod:`~synthdistill.evaluate.results`: results.json and results.md.
"""

from synthdistill.evaluate.results import RESULTS_JSON, RESULTS_MD, Entry, EvaluationResults
from synthdistill.evaluate.stage import evaluate, zero_shot_top1

__all__ = ["RESULTS_JSON", "RESULTS_MD", "Entry", "EvaluationResults", "evaluate", "zero_shot_top1"]
