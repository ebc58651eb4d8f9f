"""The one augmentation: crop boxes and flips from (seed, image, view), rendered on uint8 batches;
the decoded store and the worker path give the same tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from synthdistill.data.augment import Augmentation, ViewDataset, augment, collate_views, render_views
from synthdistill.data.decoded import open_or_build_decoded
from synthdistill.identity import shards_folder_identity
from synthdistill.runtime import DistEnv
from synthdistill.shards import ShardSamples, ShardWriter, encode_sample, list_shards, shard_name

PAPER = Augmentation(seed=0, scale=(0.08, 1.0), ratio=(0.75, 1.3333333), interpolation="bilinear", hflip=0.5)


def test_crop_boxes_respect_the_paper_scale_and_ratio_and_cover_them():
    width, height = 256, 192
    areas, ratios = [], []
    for index in range(2000):
        top, left, h, w = PAPER.crop_box(width, height, index, view=index % 3)
        assert 0 <= top <= height - h and 0 <= left <= width - w
        areas.append(h * w / (width * height))
        ratios.append(w / h)
    # rounding a side to whole pixels moves the area and ratio by a little; the fallback crop is central
    assert min(areas) >= 0.08 * 0.9 and max(areas) <= 1.0
    assert min(ratios) >= 0.75 * 0.9 and max(ratios) <= 1.3333333 / 0.9
    assert min(areas) < 0.12 and max(areas) > 0.9  # the whole range is drawn
    assert np.mean(np.log(ratios)) == pytest.approx(0.0, abs=0.05)  # log-uniform around 1


def test_flip_probability_and_mirror():
    flips = [PAPER.view(100, 100, index, view=0)[1] for index in range(4000)]
    assert abs(np.mean(flips) - 0.5) < 4 * math.sqrt(0.25 / len(flips))
    assert not any(Augmentation(seed=0).view(100, 100, i, 0)[1] for i in range(500))  # default: no flip
    # the flip draw comes after the box: turning flips on keeps every box
    no_flip = Augmentation(0, PAPER.scale, PAPER.ratio)
    assert all(PAPER.crop_box(90, 70, i, 1) == no_flip.crop_box(90, 70, i, 1) for i in range(100))

    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (2, 40, 50, 3), dtype=np.uint8))
    boxes = torch.tensor([[3.0, 5.0, 30.0, 40.0], [0.0, 0.0, 40.0, 50.0]], dtype=torch.float64)
    from synthdistill.teacher import Preprocessing

    preprocessing = Preprocessing(24, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    for interpolation in ("bilinear", "bicubic"):
        plain = render_views(images, boxes, torch.tensor([False, False]), preprocessing, interpolation)
        flipped = render_views(images, boxes, torch.tensor([True, False]), preprocessing, interpolation)
        assert torch.allclose(flipped[0], plain[0].flip(-1), atol=1e-4)
        assert torch.equal(flipped[1], plain[1])


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory, make_blob):
    """10 images of three sizes (the store pads them) and one that does not decode."""
    directory = tmp_path_factory.mktemp("mixed") / "shards"
    sizes = [(64, 64), (48, 64), (64, 40)]
    with ShardWriter(directory / shard_name(0)) as writer:
        for i in range(10):
            width, height = sizes[i % 3]
            image = make_blob(i).resize((width, height), Image.BICUBIC)
            writer.write(f"{i:08d}", encode_sample(image, {"class_index": i % 3}))
        writer.write("broken", {"jpg": b"\xff\xd8 broken", "json": b'{"class_index": 0}'})
    return directory


def test_a_view_is_the_same_tensor_from_the_decoded_store_and_from_the_workers(
    tmp_path, mixed_shards, tiny_teacher
):
    samples = ShardSamples(list_shards(mixed_shards))
    store = open_or_build_decoded(
        tmp_path / "decoded", samples, shards_folder_identity(mixed_shards), DistEnv()
    )
    assert store.built and store.images.shape == (11, 64, 64, 3) and store.images.dtype == np.uint8
    assert store.sizes[1].tolist() == [64, 48] and store.sizes[10].tolist() == [0, 0]
    again = open_or_build_decoded(
        tmp_path / "decoded", samples, shards_folder_identity(mixed_shards), DistEnv()
    )
    assert not again.built and not list((tmp_path / "decoded").glob(".*"))  # no temporary or lock left

    dataset = ViewDataset(samples)
    inputs = [tiny_teacher.preprocessing]
    for items in ([(1, 0), (10, 0), (4, 3)], [(2, 1), (5, 1)], [(0, 2), (3, 2), (9, 5), (1, 1)]):
        decoded = store.batch(items, torch.device("cpu"))
        workers = collate_views([dataset[item] for item in items])
        assert decoded.keys == workers.keys and decoded.corrupt_keys == workers.corrupt_keys
        assert torch.equal(decoded.images, workers.images)
        for augmentation in (PAPER, Augmentation(seed=3)):
            (a,) = augment(decoded, augmentation, inputs)
            (b,) = augment(workers, augmentation, inputs)
            assert torch.equal(a, b)
    # a view does not depend on the rest of its batch (here: another canvas size)
    cpu = torch.device("cpu")
    alone = augment(store.batch([(4, 3)], cpu), PAPER, inputs)[0][0]
    beside = augment(store.batch([(4, 3), (2, 0)], cpu), PAPER, inputs)[0][0]
    assert torch.equal(alone, beside)


PAPER_RECIPES = ["aircraft", "cars", "dtd", "flowers102", "food101", "imagenet100", "pets"]


@pytest.mark.parametrize("dataset", PAPER_RECIPES)
def test_the_paper_recipes_use_the_authors_augmentation(dataset):
    from synthdistill.config import load_recipe

    distill = load_recipe(f"configs/{dataset}.yaml").distill
    assert (distill.aug_scale, distill.aug_interpolation, distill.aug_hflip) == ([0.08, 1.0], "bilinear", 0.5)
    assert distill.aug_ratio == pytest.approx([3 / 4, 4 / 3], abs=1e-6)
