"""The teacher filter (generate.filter=teacher) with the tiny teacher: counts, recorded seeds, determinism."""

import types

import numpy as np
import pytest
import torch

from synthdistill.config import GenerateConfig
from synthdistill.generate import generate_images, read_prompts
from synthdistill.identity import shards_settings
from synthdistill.runtime import derive_seed
from synthdistill.shards import ShardSamples, list_shards, read_index

# The tiny random teacher calls nearly every image a "dog"; "class 2" wins for some: so "dog" images
# mostly pass at once, and "class 2" images are redrawn, a few of them until they pass.
CLASSES = ["dog", "class 2"]
NUM_PROMPTS = 12


def image_settings(config):
    """The shards' settings as generate records them on a CPU."""
    return shards_settings(config, "cpu")


class BlobPainter:
    """A stand-in text-to-image pipeline: smooth random colours from each generator's seed, so
    an image is a function of its seed alone (as with a real pipeline) and draws are instant."""

    def __call__(self, prompt, generator, **kwargs):
        images = []
        for g in generator:
            rng = np.random.default_rng(g.initial_seed() % 2**32)
            coarse = torch.tensor(rng.random((1, 3, 4, 4)), dtype=torch.float32)
            images.append(torch.nn.functional.interpolate(coarse, size=32, mode="bilinear")[0])
        return types.SimpleNamespace(images=torch.stack(images))


def write_prompts(path):
    import json

    lines = [
        {
            "class_index": i % 2,
            "class_name": CLASSES[i % 2],
            "prompt": f"a photo of a {CLASSES[i % 2]}",
            "seed": 7 + i,
        }
        for i in range(NUM_PROMPTS)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def filter_config(**overrides):
    settings = {
        "model": "tiny",
        "lora": None,
        "shard_size": 5,
        "batch_size": 4,
        "filter": "teacher",
        "filter_model": "tiny",
        "filter_retries": 3,
        **overrides,
    }
    return GenerateConfig(**settings)


@pytest.mark.parametrize("keep_failed", [True, False])
def test_filter_counts_add_up_and_redraws_follow_the_recorded_seeds(tmp_path, keep_failed):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    config = filter_config(filter_keep_failed=keep_failed)
    summary = generate_images(prompts, tmp_path / "shards", config, device="cpu", pipeline=BlobPainter())
    counts = summary.filter
    assert counts["kept_first_time"] > 0 and counts["kept_after_redraw"] > 0
    assert (counts["kept_failed"] > 0) == keep_failed and (counts["dropped"] > 0) != keep_failed
    kept = counts["kept_first_time"] + counts["kept_after_redraw"] + counts["kept_failed"]
    assert kept + counts["dropped"] == NUM_PROMPTS
    assert counts["redrawn"] == counts["kept_after_redraw"] + counts["kept_failed"] + counts["dropped"]
    index = read_index(tmp_path / "shards")
    assert index["filter"] == counts and index["total"] == kept == summary.images_written

    seeds = {p.key: p.seed for p in read_prompts(prompts).prompts}
    samples = ShardSamples(list_shards(tmp_path / "shards"))
    metas = {samples.key(i): samples[i].meta for i in range(len(samples))}
    for key, meta in metas.items():
        k = meta["filter_redraws"]
        assert meta["seed"] == (derive_seed(seeds[key], "filter", k) if k else seeds[key])
    failed = [m for m in metas.values() if not m["filter_passed"]]
    assert len(failed) == counts["kept_failed"]
    assert all(m["filter_redraws"] == config.filter_retries for m in failed)
    # every rejected image's redraws: those kept record theirs, each dropped one used all retries
    redraws = sum(m["filter_redraws"] for m in metas.values()) + counts["dropped"] * config.filter_retries
    assert redraws == counts["redraws"]


def test_filtered_generation_is_deterministic(tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    runs = [
        generate_images(prompts, tmp_path / name, filter_config(), device="cpu", pipeline=BlobPainter())
        for name in ("a", "b")
    ]
    assert runs[0].filter == runs[1].filter
    a, b = (list_shards(tmp_path / name) for name in ("a", "b"))
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_filter_settings_are_part_of_the_shards_identity():
    plain = image_settings(GenerateConfig())
    assert image_settings(GenerateConfig(filter_model="RN50")) == plain  # the filter is off
    on = image_settings(GenerateConfig(filter="teacher"))
    assert on != plain
    for change in ({"filter_model": "RN50"}, {"filter_retries": 1}, {"filter_keep_failed": False}):
        assert image_settings(GenerateConfig(filter="teacher", **change)) != on
