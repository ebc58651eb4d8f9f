"""The frozen open_clip teacher: image and text embeddings, and the zero-shot head.

Only the teacher's image tower is replaced by the student; its text tower stays the classifier,
so the head built here serves evaluation and export alike.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from synthdistill.errors import SynthdistillError, setting
from synthdistill.tiny import TINY, create_tiny_clip, is_tiny, register_tiny_clip_config


@dataclass(frozen=True)
class Preprocessing:
    """How images are prepared for a model: travels with the model into student/config.json and export."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def eval_transform(self) -> Callable:
        """PIL image -> (3, S, S) normalised tensor: resize (shortest side by default), centre crop,
        normalise; open_clip's own validation transform, so a student and its teacher are prepared alike."""
        import open_clip

        return open_clip.image_transform(
            self.image_size,
            is_train=False,
            mean=self.mean,
            std=self.std,
            resize_mode=self.resize_mode,
            interpolation=self.interpolation,
        )


@dataclass
class Teacher:
    """A frozen open_clip model in eval mode, with what callers need beside it."""

    model: torch.nn.Module
    tokenizer: Callable
    name: str
    pretrained: str | None
    preprocess_val: Callable
    preprocessing: Preprocessing
    embed_dim: int

    @property
    def identity(self) -> str:
        """Names the exact weights: keys caches and is recorded in results."""
        return f"{self.name}/{self.pretrained}" if self.pretrained else self.name

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed images -> (B, D) L2-normalised fp32 embeddings."""
        features = self.model.encode_image(images.to(self.device))
        return F.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """N texts -> (N, D) L2-normalised fp32 embeddings."""
        chunks = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start : start + batch_size])).to(self.device)
            chunks.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1))
        return torch.cat(chunks) if chunks else torch.empty(0, self.embed_dim)

    @torch.no_grad()
    def build_zero_shot_head(
        self, classnames: Sequence[str], templates: Sequence[str], amp_dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """CLIP's template ensemble: per class, normalise each template's text embedding, average,
        renormalise. Returns (D, C), so that logits = 100 * image_embeddings @ head.

        ``amp_dtype`` builds it as CLIP_benchmark's ``zero_shot_classifier(amp=True)`` does: one class
        at a time, text tower and ensemble under autocast, so the head is that run's, bit for bit."""
        if amp_dtype is not None:
            columns = []
            with torch.autocast(self.device.type, dtype=amp_dtype):
                for name in classnames:
                    tokens = self.tokenizer([template.format(c=name) for template in templates])
                    embedding = F.normalize(self.model.encode_text(tokens.to(self.device)), dim=-1).mean(
                        dim=0
                    )
                    columns.append(embedding / embedding.norm())
            return torch.stack(columns, dim=1)
        texts = [template.format(c=name) for name in classnames for template in templates]
        embeddings = self.encode_texts(texts).reshape(len(classnames), len(templates), -1)
        return F.normalize(embeddings.mean(dim=1), dim=-1).T.contiguous()


def cached_zero_shot_head(
    teacher: Teacher,
    classnames: Sequence[str],
    templates: Sequence[str],
    cache_dir: str | Path | None,
    label: str = "head",
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The teacher's (D, C) unit-norm zero-shot head, computed once in fp32 per (teacher, classes,
    templates) and kept as ``<cache_dir>/<label>-<key>.safetensors``; evaluate, export and predict
    all take their head from here, so they classify alike. ``cache_dir=None``: not cached.
    ``amp_dtype``: CLIP_benchmark's mixed-precision head instead (its own cache entry; returned in fp32,
    which holds its values exactly)."""
    from safetensors.torch import load_file, save_file

    from synthdistill.fileio import atomic_path, make_readable
    from synthdistill.identity import digest, zero_shot_head_identity

    if cache_dir is None:
        return teacher.build_zero_shot_head(classnames, templates, amp_dtype).float()
    key = zero_shot_head_identity(teacher.name, teacher.pretrained, classnames, templates, label)
    if amp_dtype is not None:  # CLIP_benchmark's mixed-precision head is another entry
        key = digest(key, str(amp_dtype))
    path = Path(cache_dir) / f"{label}-{key}.safetensors"
    if path.is_file():
        head = load_file(str(path))["head"]
    else:
        head = teacher.build_zero_shot_head(classnames, templates, amp_dtype).float().cpu()
        with atomic_path(path) as tmp:
            save_file({"head": head.contiguous()}, str(tmp), metadata={"teacher": teacher.identity})
            make_readable([tmp])
    return head.to(teacher.device)


def _preprocessing_of(model: torch.nn.Module) -> Preprocessing:
    cfg = getattr(getattr(model, "visual", None), "preprocess_cfg", {}) or {}
    size = cfg.get("size", getattr(model.visual, "image_size", 224))
    size = size[0] if isinstance(size, list | tuple) else size
    return Preprocessing(
        image_size=int(size),
        mean=tuple(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
        std=tuple(cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
        interpolation=cfg.get("interpolation", "bicubic"),
        resize_mode=cfg.get("resize_mode", "shortest"),
    )


def _check_known(name: str, pretrained: str | None) -> None:
    import open_clip

    known = open_clip.list_models()
    if name not in known and not Path(name).exists():
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Closest: {', '.join(close)}." if close else ""
        raise SynthdistillError(
            f"Unknown open_clip model '{name}'.{hint} Or use 'tiny' for a tiny random model."
        )
    if pretrained and not Path(pretrained).exists():
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            listed = ", ".join(tags) if tags else "none"
            raise SynthdistillError(
                f"open_clip has no pretrained tag '{pretrained}' for '{name}' (known: {listed}); "
                "pass a known tag or the path of a local checkpoint file."
            )


def teacher_embed_dim(name: str) -> int | None:
    """The teacher's embedding width from its open_clip model config, without loading it (None for
    a model open_clip does not know by name, e.g. a local path): lets the student's settings be
    checked before any model loads."""
    import open_clip

    config = open_clip.get_model_config(register_tiny_clip_config() if is_tiny(name) else name)
    return int(config["embed_dim"]) if config and "embed_dim" in config else None


def load_teacher(
    name: str = "ViT-B-32",
    pretrained: str | None = "datacomp_xl_s13b_b90k",
    device: str | torch.device = "cpu",
) -> Teacher:
    """Load a frozen open_clip teacher by model name and pretrained tag (or local checkpoint file).

    ``name='tiny'`` gives the seeded tiny random CLIP used by tests and the smoke recipe.
    """
    import open_clip

    if is_tiny(name):
        model, _, preprocess_val = create_tiny_clip()
        tokenizer = open_clip.get_tokenizer(register_tiny_clip_config())
        pretrained = None
    else:
        _check_known(name, pretrained)
        try:
            model, _, preprocess_val = open_clip.create_model_and_transforms(name, pretrained=pretrained)
        except RuntimeError as e:
            if "download" not in str(e).lower():
                raise
            raise SynthdistillError(
                f"Could not download the weights '{pretrained}' for teacher '{name}' (no network?); "
                f"run once with network access, or pass a local checkpoint file with "
                f"{setting('distill.teacher_pretrained')}."
            ) from None
        tokenizer = open_clip.get_tokenizer(name)
    model = model.to(device).eval().requires_grad_(False)
    return Teacher(
        model=model,
        tokenizer=tokenizer,
        name=TINY if is_tiny(name) else name,
        pretrained=pretrained,
        preprocess_val=preprocess_val,
        preprocessing=_preprocessing_of(model),
        embed_dim=int(
            model.text_projection.shape[1] if hasattr(model, "text_projection") else model.embed_dim
        ),
    )
