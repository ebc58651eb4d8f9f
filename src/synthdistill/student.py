"""The student: a timm backbone plus a projection head onto the teacher's embedding space.

Its layout (``trunk`` + ``head.proj`` or ``head.mlp``) is exactly open_clip's ``TimmModel``, so
the export stage can hand a student to open_clip as a timm image tower without renaming.
A student folder holds ``model.safetensors`` and ``config.json``: everything needed to rebuild it.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from synthdistill.errors import SynthdistillError
from synthdistill.fileio import atomic_path, atomic_write_json, read_json
from synthdistill.teacher import Preprocessing
from synthdistill.tiny import TINY_IMAGE_SIZE, TINY_STUDENT_TIMM_NAME, is_tiny

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class StudentConfig:
    """What a student folder records besides its weights."""

    timm_name: str
    embed_dim: int
    head: str = "linear"
    preprocessing: Preprocessing | None = None
    teacher: str | None = None
    teacher_pretrained: str | None = None
    format_version: int = 1

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> StudentConfig:
        data = dict(data)
        if data.get("preprocessing"):
            p = data["preprocessing"]
            data["preprocessing"] = Preprocessing(**{**p, "mean": tuple(p["mean"]), "std": tuple(p["std"])})
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def timm_name_for(student: str) -> str:
    """'tiny' -> timm's tiny test model; any other name must be a timm model."""
    import timm

    name = TINY_STUDENT_TIMM_NAME if is_tiny(student) else student
    if name not in timm.list_models() and name not in timm.list_pretrained():
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" Closest: {', '.join(close)}." if close else ""
        raise SynthdistillError(f"Unknown timm model '{student}'.{hint} Or use 'tiny' for a tiny test model.")
    return name


class Student(nn.Module):
    """Image -> (B, D) L2-normalised embedding comparable with the teacher's image embeddings."""

    def __init__(self, config: StudentConfig, pretrained: bool = False):
        super().__init__()
        import timm
        from timm.layers import Mlp

        self.config = config
        try:
            self.trunk = timm.create_model(
                config.timm_name, pretrained=pretrained, num_classes=0, global_pool="avg"
            )
        except RuntimeError as e:
            if pretrained and ("hub" in str(e).lower() or "download" in str(e).lower()):
                raise SynthdistillError(
                    f"Could not download timm weights for '{config.timm_name}' (no network?); "
                    "run with network access or set distill.student_pretrained=false."
                ) from None
            raise
        width = self.trunk.num_features
        if config.head == "linear":
            layers = OrderedDict(drop=nn.Dropout(0.0), proj=nn.Linear(width, config.embed_dim, bias=False))
        elif config.head == "mlp":
            layers = OrderedDict(
                mlp=Mlp(width, 2 * config.embed_dim, config.embed_dim, drop=(0.0, 0.0), bias=(True, False))
            )
        else:
            raise SynthdistillError(f"Unknown head '{config.head}'; use 'linear' or 'mlp'.")
        self.head = nn.Sequential(layers)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) projected, not yet normalised."""
        return self.head(self.trunk(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.forward_features(images), dim=-1)


def create_student(
    name: str,
    embed_dim: int,
    head: str = "linear",
    pretrained: bool = False,
    preprocessing: Preprocessing | None = None,
    image_size: int | None = None,
    teacher: str | None = None,
    teacher_pretrained: str | None = None,
) -> Student:
    """Build a student from a timm name (or 'tiny').

    Preprocessing follows the teacher (CLIP's mean/std, so student and teacher see the same
    pixels) at the student's own input size: ``image_size``, else the timm model's default.
    """
    timm_name = timm_name_for(name)
    if image_size is None:
        if is_tiny(name):
            image_size = TINY_IMAGE_SIZE
        else:
            import timm

            image_size = int(timm.models.get_pretrained_cfg(timm_name).input_size[-1])
    base = preprocessing or Preprocessing(
        image_size, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    )
    config = StudentConfig(
        timm_name=timm_name,
        embed_dim=embed_dim,
        head=head,
        preprocessing=dataclasses.replace(base, image_size=image_size),
        teacher=teacher,
        teacher_pretrained=teacher_pretrained,
    )
    return Student(config, pretrained=pretrained)


def save_student(student: Student, directory: str | Path) -> Path:
    """Write weights then config, each atomically; config.json last, so its presence means complete."""
    from safetensors.torch import save_file

    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "synthdistill": "student"})
    atomic_write_json(directory / CONFIG_NAME, student.config.to_json())
    return directory


def load_student(directory: str | Path, device: str | torch.device = "cpu") -> Student:
    """A student folder -> the model in eval mode, ready for inference."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise SynthdistillError(
                f"'{directory}' is not a student folder: '{path.name}' is missing "
                "(train one with `synthdistill distill`)."
            )
    config = StudentConfig.from_json(read_json(config_path))
    student = Student(config)
    student.load_state_dict(load_file(str(weights_path)))
    return student.to(device).eval()
