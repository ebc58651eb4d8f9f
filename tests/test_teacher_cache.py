import numpy as np
import pytest
import torch

from synthdistill.data.augment import Augmentation, ViewDataset, augment, collate_views, render_views
from synthdistill.identity import shards_folder_identity
from synthdistill.runtime import DistEnv
from synthdistill.shards import ShardSamples, ShardWriter, list_shards, shard_name
from synthdistill.train.sources import WorkerImages
from synthdistill.train.teacher_cache import open_or_build_cache, teacher_features


def test_a_view_is_a_function_of_seed_sample_and_view():
    augmentation = Augmentation(seed=3, scale=(0.3, 1.0))
    box = augmentation.crop_box(80, 60, index=5, view=1)
    assert Augmentation(seed=3, scale=(0.3, 1.0)).crop_box(80, 60, index=5, view=1) == box
    others = {
        Augmentation(seed=4, scale=(0.3, 1.0)).crop_box(80, 60, 5, 1),
        augmentation.crop_box(80, 60, 6, 1),
        augmentation.crop_box(80, 60, 5, 2),
    }
    assert box not in others


def test_crops_follow_clip_training_scale_and_aspect():
    augmentation = Augmentation(seed=0, scale=(0.9, 1.0))
    for index in range(200):
        top, left, height, width = augmentation.crop_box(100, 100, index, view=0)
        assert 0 <= top <= 100 - height and 0 <= left <= 100 - width
        assert 0.88 <= height * width / 100**2 <= 1.0  # (0.9, 1) up to rounding
        assert 3 / 4 - 0.03 <= width / height <= 4 / 3 + 0.03


def test_augment_crops_resizes_and_normalises(tiny_teacher):
    preprocessing = tiny_teacher.preprocessing
    image = np.full((80, 100, 3), (255, 0, 51), dtype=np.uint8)
    batch = collate_views([(0, 0, "a", 0, image)])
    boxes = torch.tensor([[10.0, 20.0, 50.0, 60.0]], dtype=torch.float64)
    for interpolation in ("bilinear", "bicubic"):
        view = render_views(batch.images, boxes, torch.tensor([False]), preprocessing, interpolation)[0]
        assert view.shape == (3, preprocessing.image_size, preprocessing.image_size)
        for channel, value in enumerate((1.0, 0.0, 0.2)):
            expected = (value - preprocessing.mean[channel]) / preprocessing.std[channel]
            assert torch.allclose(view[channel], torch.full_like(view[channel], expected), atol=1e-5)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, write_shards):
    return write_shards(tmp_path_factory.mktemp("cache") / "shards", 12, shard_size=8)


def build(cache_dir, teacher, shards, augmentation, views=2):
    samples = ShardSamples(list_shards(shards))
    cache = open_or_build_cache(
        cache_dir,
        teacher,
        WorkerImages(samples, workers=0, pin_memory=False),
        len(samples),
        augmentation,
        views,
        "fp32",
        shards_folder_identity(shards),
        env=DistEnv(),
        batch_size=5,
    )
    return cache, ViewDataset(samples)


def test_cache_stores_the_teachers_features_of_the_replayed_views(tmp_path, tiny_teacher, shards):
    cache, dataset = build(tmp_path, tiny_teacher, shards, Augmentation(seed=1))
    assert cache.built and cache.embeddings.shape == (2, 12, tiny_teacher.embed_dim)
    assert cache.embeddings.dtype == np.float16
    items = [(index, view) for index in (0, 7, 11) for view in (0, 1)]
    batch = collate_views([dataset[item] for item in items])
    (inputs,) = augment(batch, Augmentation(seed=1), [tiny_teacher.preprocessing])
    live = teacher_features(tiny_teacher, inputs, "fp32")
    cached = cache.lookup(batch.views, batch.indices)
    assert torch.allclose(cached, live, rtol=1e-3, atol=1e-3)  # fp16 storage
    assert not torch.allclose(cached[0], cached[1], atol=1e-2)  # two views of one image differ


def test_cache_is_reused_and_rebuilt_when_its_inputs_change(tmp_path, tiny_teacher, shards, write_shards):
    first, _ = build(tmp_path, tiny_teacher, shards, Augmentation(seed=1))
    again, _ = build(tmp_path, tiny_teacher, shards, Augmentation(seed=1))
    assert not again.built and again.path == first.path
    other_crops, _ = build(tmp_path, tiny_teacher, shards, Augmentation(seed=1, scale=(0.5, 1.0)))
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
    assert not list(tmp_path.glob(".*tmp-*")) and not list(tmp_path.glob(".*lock"))


def test_corrupt_images_are_left_out_of_a_batch_and_named(tmp_path, tiny_teacher, write_shards):
    shards = write_shards(tmp_path / "shards", 3)
    with ShardWriter(shards / shard_name(1)) as writer:
        writer.write("broken", {"jpg": b"\xff\xd8 truncated", "json": b"{}"})
    samples = ShardSamples(list_shards(shards))
    dataset = ViewDataset(samples)
    batch = collate_views([dataset[(index, 0)] for index in range(4)])
    assert batch.keys == ["00000000", "00000001", "00000002"] and batch.corrupt_keys == ["broken"]
    assert batch.images.shape[0] == 3
