"""Shared fixtures: tiny models only, no network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402


@pytest.fixture(scope="session")
def tiny_teacher():
    from synthdistill.teacher import load_teacher

    return load_teacher("tiny")


def random_image(seed: int, size: int = 64) -> Image.Image:
    """A smooth random RGB image (blobs, not white noise), so resizing and JPEG keep its content."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.BICUBIC)


@pytest.fixture
def make_image():
    return random_image
