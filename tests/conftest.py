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


TINY_EXPORT_CLASSES = ["cat", "dog", "bird", "fish", "car"]


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """A saved tiny student (teacher 'tiny') in a run-like folder with synthetic shards, and its export in
    every format plus the int8 form, latency on a tiny time budget.

    Returns a namespace: root, student_dir, domain, out_dir, summary, eval_results, config.
    """
    import dataclasses
    from types import SimpleNamespace

    import torch

    from synthdistill.config import ExportConfig
    from synthdistill.deploy.export import export_student
    from synthdistill.evaluate.results import Entry, EvaluationResults, write_results
    from synthdistill.registry import domain_from_classes
    from synthdistill.student import create_student, save_student
    from synthdistill.teacher import load_teacher

    root = tmp_path_factory.mktemp("tiny_export")
    teacher = load_teacher("tiny")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        student = create_student(
            "tiny", teacher.embed_dim, preprocessing=teacher.preprocessing, teacher="tiny"
        )
    student_dir = save_student(student, root / "student")
    domain = domain_from_classes(TINY_EXPORT_CLASSES, superclass="thing", name="things")
    write_blob_shards(root / "shards", 96, classes=tuple(TINY_EXPORT_CLASSES), shard_size=48)
    common = {
        "dataset": "things", "teacher": "tiny", "student": "test_efficientnet", "source": "test",
        "num_classes": 5, "templates": ["a {c}."], "precision": "fp32", "n_images": 64,
        "skipped_images": 0, "headline_metric": "top1", "protocol": "clip_benchmark",
        "preprocessing": dataclasses.asdict(teacher.preprocessing),
    }  # fmt: skip
    results = EvaluationResults(teacher="tiny", student="test_efficientnet", precision="fp32", device="cpu")
    results.entries = [
        Entry(**common, model="student", model_id="test_efficientnet", top1=0.8125, top5=0.96875,
              mean_per_class_recall=0.8, headline=0.8125, agreement_with_teacher=0.875),
        Entry(**common, model="teacher", model_id="tiny", top1=0.90625, top5=1.0,
              mean_per_class_recall=0.9, headline=0.90625),
    ]  # fmt: skip
    write_results(results, root / "eval")
    config = ExportConfig(
        formats=["onnx", "torchscript", "open_clip"],
        precision=["fp32", "int8"],
        min_agreement=0.5,
        calibration_images=32,
        agreement_images=64,
        bench_repeats=1,
        bench_seconds=0.01,
    )
    out_dir = root / "export"
    eval_results = root / "eval" / "results.json"
    summary = export_student(student_dir, domain, out_dir, config, eval_results=eval_results)
    return SimpleNamespace(
        root=root,
        student_dir=student_dir,
        domain=domain,
        out_dir=out_dir,
        summary=summary,
        eval_results=eval_results,
        config=config,
    )


def blob_image(seed: int, size: int = 64) -> Image.Image:
    """One random ellipse or rectangle of random colour on a random background: varied, yet simple
    enough that a tiny student can learn a tiny teacher's embedding of it."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
    x, y = (int(v) for v in rng.integers(0, size * 3 // 4, 2))
    side = int(rng.integers(size // 5, size * 5 // 8))
    shape = ImageDraw.Draw(image).ellipse if rng.random() < 0.5 else ImageDraw.Draw(image).rectangle
    shape([x, y, x + side, y + side], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image


def write_blob_shards(
    directory, count: int, *, first_seed: int = 0, classes=("a", "b", "c"), shard_size: int = 64
):
    """``count`` blob images in shards + index.json, with generate's metadata (class index, name, prompt)."""
    from synthdistill.shards import ShardWriter, encode_sample, shard_name, write_index

    for number, start in enumerate(range(0, count, shard_size)):
        with ShardWriter(directory / shard_name(number)) as writer:
            for i in range(start, min(start + shard_size, count)):
                label = i % len(classes)
                meta = {
                    "class_index": label,
                    "class_name": classes[label],
                    "prompt": f"a photo of a {classes[label]}",
                }
                writer.write(f"{i:08d}", encode_sample(blob_image(first_seed + i), meta))
    write_index(directory, {"source": "test"})
    return directory


@pytest.fixture(scope="session")
def write_shards():
    return write_blob_shards


@pytest.fixture(scope="session")
def make_blob():
    return blob_image
