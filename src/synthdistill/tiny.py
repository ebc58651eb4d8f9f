"""Tiny random models, built without any download, behind the reserved model name ``tiny``.

The tests and ``configs/smoke.yaml`` run every stage's real code path with these: an open_clip
CLIP from a registered model config (with open_clip's real BPE tokenizer), and a timm ``test_*``
student. Weights are random but seeded, so every process that builds ``tiny`` gets the same model.
"""

from __future__ import annotations

from importlib import resources

import torch

TINY = "tiny"
TINY_SEED = 0
TINY_CLIP_NAME = "synthdistill-tiny-clip"
TINY_STUDENT_TIMM_NAME = "test_efficientnet"
TINY_IMAGE_SIZE = 64

_registered = False


def is_tiny(name: str | None) -> bool:
    return name == TINY


def register_tiny_clip_config() -> str:
    """Make the tiny CLIP config known to open_clip's factory; returns its model name."""
    global _registered
    if not _registered:
        import open_clip

        config = resources.files("synthdistill") / "tiny_configs" / f"{TINY_CLIP_NAME}.json"
        with resources.as_file(config) as path:
            open_clip.add_model_config(path)
        _registered = True
    return TINY_CLIP_NAME


def create_tiny_clip():
    """(model, preprocess_train, preprocess_val) of the seeded tiny CLIP, through open_clip's factory."""
    import open_clip

    name = register_tiny_clip_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return open_clip.create_model_and_transforms(name, pretrained=None)
