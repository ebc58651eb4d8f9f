"""synthdistill: distil CLIP's image encoder into a small zero-shot student from synthetic images.

The public API, imported lazily so that ``synthdistill --help`` does not pay for torch::

    from synthdistill import load_recipe, run_pipeline, load_student, load_teacher
"""

from __future__ import annotations

import importlib
from importlib import metadata

try:
    __version__ = metadata.version("synthdistill")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

# Stage functions whose name is also their module's (distill, evaluate, predict) are reached as
# ``synthdistill.distill.distill`` etc.: a submodule import would shadow a package attribute.
_API = {
    "load_recipe": "synthdistill.config",
    "RecipeConfig": "synthdistill.config",
    "SynthdistillError": "synthdistill.errors",
    "get_dataset": "synthdistill.registry",
    "resolve_domain": "synthdistill.registry",
    "write_prompts": "synthdistill.prompts",
    "generate_images": "synthdistill.generate",
    "distill_student": "synthdistill.train",
    "export_student": "synthdistill.deploy.export",
    "run_pipeline": "synthdistill.pipeline",
    "write_report": "synthdistill.report",
    "load_teacher": "synthdistill.teacher",
    "create_student": "synthdistill.student",
    "load_student": "synthdistill.student",
    "save_student": "synthdistill.student",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'synthdistill' has no attribute '{name}'")
