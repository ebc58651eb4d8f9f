import numpy as np
import pytest
import torch
from PIL import Image

from synthdistill.augment import Augmentation, ViewDataset, collate_views, prepare_view
from synthdistill.runtime import DistEnv
from synthdistill.shards import ShardSamples, ShardWriter, list_shards, shard_name
from synthdistill.teacher_cache import open_or_build_cache, shards_fingerprint, teacher_features


def test_a_view_is_a_function_of_seed_sample_and_view():
    augmentation = Augmentation(seed=3, scale_min=0.3)
    box = augmentation.crop_box(80, 60, index=5, view=1)
    assert Augmentation(seed=3, scale_min=0.3).crop_box(80, 60, index=5, view=1) == box
    others = {
        Augmentation(seed=4, scale_min=0.3).crop_box(80, 60, 5, 1),
        augmentation.crop_box(80, 60, 6, 1),
        augmentation.crop_box(80, 60, 5, 2),
    }
    assert box not in others


def test_crops_follow_clip_training_scale_and_aspect():
    augmentation = Augmentation(seed=0, scale_min=0.9)
    for index in range(200):
        top, left, height, width = augmentation.crop_box(100, 100, index, view=0)
        assert 0 <= top <= 100 - height and 0 <= left <= 100 - width
        assert 0.88 <= height * width / 100**2 <= 1.0  # (0.9, 1) up to rounding
        assert 3 / 4 - 0.03 <= width / height <= 4 / 3 + 0.03


def test_prepare_view_crops_resizes_and_normalises(tiny_teacher):
    preprocessing = tiny_teacher.preprocessing
    image = Image.new("RGB", (100, 80), (255, 0, 51))
    view = prepare_view(image, (10, 20, 50, 60), preprocessing)
    assert view.shape == (3, preprocessing.image_size, preprocessing.image_size)
    for channel, value in enumerate((1.0, 0.0, 0.2)):
        expected = (value - preprocessing.mean[channel]) / preprocessing.std[channel]
        assert torch.allclose(view[channel], torch.full_like(view[channel], expected), atol=1e-5)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, write_shards):
    return write_shards(tmp_path_factory.mktemp("cache") / "shards", 12, shard_size=8)


def build(cache_dir, teacher, shards, augmentation, views=2):
    samples = ShardSamples(list_shards(shards))
    dataset = ViewDataset(samples, augmentation, [teacher.preprocessing])
    cache = open_or_build_cache(
        cache_dir,
        teacher,
        dataset,
        views,
        "fp32",
        shards_fingerprint(samples.shards),
        env=DistEnv(),
        batch_size=5,
    )
    return cache, dataset


def test_cache_stores_the_teachers_features_of_the_replayed_views(tmp_path, tiny_teacher, shards):
    cache, dataset = build(tmp_path, tiny_teacher, shards, Augmentation(seed=1))
    assert cache.built and cache.embeddings.shape == (2, 12, tiny_teacher.embed_dim)
    assert cache.embeddings.dtype == np.float16
    items = [(index, view) for index in (0, 7, 11) for view in (0, 1)]
    batch = collate_views([dataset[item] for item in items])
    live = teacher_features(tiny_teacher, batch.inputs[0], "fp32")
    cached = cache.lookup(batch.views, batch.indices)
    assert torch.allclose(cached, live, rtol=1e-3, atol=1e-3)  # fp16 storage
    assert not torch.allclose(cached[0], cached[1], atol=1e-2)  # two views of one image differ


def test_cache_is_reused_and_rebuilt_when_its_inputs_change(tmp_path, tiny_teacher, shards, write_shards):
    first, _ = build(tmp_path, tiny_teacher, shards, Augmentation(seed=1))
    again, _ = build(tmp_path, tiny_teacher, shards, Augmentation(seed=1))
    assert not again.built and again.path == first.path
    other_crops, _ = build(tmp_path, tiny_teacher, shards, Augmentation(seed=1, scale_min=0.5))
    assert other_crops.built and other_crops.path != first.path
    more_views, _ = build(tmp_path, tiny_teacher, shards, Augmentation(seed=1), views=3)
    assert more_views.built and more_views.path != first.path

    changed = write_shards(tmp_path / "changed", 12, shard_size=8)
    with ShardWriter(changed / shard_name(1)) as writer:  # same names, other content
        writer.write("00000008", {"jpg": b"not an image", "json": b"{}"})
    other_shards, _ = build(tmp_path, tiny_teacher, changed, Augmentation(seed=1))
    assert other_shards.built and other_shards.path != first.path
    assert sorted(p.name for p in tmp_path.glob("views-*.json")) == sorted(
        p.with_suffix(".json").name
        for p in (first.path, other_crops.path, more_views.path, other_shards.path)
    )
    assert not list(tmp_path.glob(".*partial"))


def test_corrupt_images_are_left_out_of_a_batch_and_named(tmp_path, tiny_teacher, write_shards):
    shards = write_shards(tmp_path / "shards", 3)
    with ShardWriter(shards / shard_name(1)) as writer:
        writer.write("broken", {"jpg": b"\xff\xd8 truncated", "json": b"{}"})
    samples = ShardSamples(list_shards(shards))
    dataset = ViewDataset(samples, Augmentation(seed=0), [tiny_teacher.preprocessing])
    batch = collate_views([dataset[(index, 0)] for index in range(4)])
    assert batch.keys == ["00000000", "00000001", "00000002"] and batch.corrupt_keys == ["broken"]
    assert batch.inputs[0].shape[0] == 3
