"""Replayable augmented views: view ``v`` of sample ``i`` is a pure function of (seed, i, v).

The teacher cache stores the teacher's embedding of view v of sample i; the student's loader later
rebuilds exactly that view, so training on cached targets is the same optimisation problem as
training with the teacher in the loop. A view is a crop box in the original image's pixels, resized
to each model's own input size, so teacher and student see the same content at their resolutions.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torchvision.transforms.functional as TF
from PIL import Image

from synthdistill.runtime import derive_seed
from synthdistill.shards import ShardSamples, decode_image
from synthdistill.teacher import Preprocessing

INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


@dataclass(frozen=True)
class Augmentation:
    """open_clip's training crop: RandomResizedCrop at area scale (scale_min, 1), aspect 3/4..4/3."""

    seed: int
    scale_min: float = 0.9
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def crop_box(self, width: int, height: int, index: int, view: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) of view ``view`` of sample ``index``.

        torchvision's ``RandomResizedCrop.get_params``, drawing from a generator seeded by
        (seed, index, view) instead of the global RNG.
        """
        rng = random.Random(derive_seed(self.seed, "view", index, view))
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(self.scale_min, 1.0)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        aspect = min(max(width / height, self.ratio[0]), self.ratio[1])  # fallback: central crop
        w, h = (
            (width, round(width / aspect)) if width / height <= aspect else (round(height * aspect), height)
        )
        return (height - h) // 2, (width - w) // 2, h, w


def prepare_view(
    image: Image.Image, box: tuple[int, int, int, int], preprocessing: Preprocessing
) -> torch.Tensor:
    """Crop ``box`` out of ``image`` and resize it to the model's square input: (3, S, S), normalised."""
    top, left, height, width = box
    size = preprocessing.image_size
    crop = image.resize(
        (size, size), INTERPOLATIONS[preprocessing.interpolation], box=(left, top, left + width, top + height)
    )
    return TF.normalize(TF.to_tensor(crop), preprocessing.mean, preprocessing.std)


@dataclass
class Batch:
    """Collated views. ``inputs[k]`` is (B, 3, S_k, S_k), prepared for the k-th model input."""

    indices: torch.Tensor  # (B,) sample indices
    views: torch.Tensor  # (B,) view indices
    labels: torch.Tensor  # (B,) class indices, -1 where the sample has none
    keys: list[str]
    inputs: list[torch.Tensor]
    corrupt_keys: list[str]  # samples of this batch dropped because their image did not decode

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> Batch:
        self.inputs = [x.pin_memory() for x in self.inputs]
        return self


class ViewDataset(torch.utils.data.Dataset):
    """(sample index, view index) -> that view, prepared once per model input in ``preprocessings``."""

    def __init__(
        self, samples: ShardSamples, augmentation: Augmentation, preprocessings: Sequence[Preprocessing]
    ):
        self.samples = samples
        self.augmentation = augmentation
        self.preprocessings = list(preprocessings)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]) -> tuple:
        index, view = item
        sample = self.samples[index]
        label = int(sample.meta.get("class_index", -1))
        image = decode_image(sample.image)
        if image is None:
            return index, view, sample.key, label, None
        box = self.augmentation.crop_box(*image.size, index, view)
        return index, view, sample.key, label, [prepare_view(image, box, p) for p in self.preprocessings]


def collate_views(items: list[tuple]) -> Batch:
    """Stack decodable views; name the samples whose image could not be decoded."""
    good = [item for item in items if item[4] is not None]
    return Batch(
        indices=torch.tensor([item[0] for item in good], dtype=torch.long),
        views=torch.tensor([item[1] for item in good], dtype=torch.long),
        labels=torch.tensor([item[3] for item in good], dtype=torch.long),
        keys=[item[2] for item in good],
        inputs=[torch.stack(tensors) for tensors in zip(*(item[4] for item in good), strict=True)],
        corrupt_keys=[item[2] for item in items if item[4] is None],
    )


def view_loader(
    dataset: ViewDataset, batches: Sequence[Sequence[tuple[int, int]]], workers: int, pin_memory: bool = False
) -> torch.utils.data.DataLoader:
    """A loader over given batches of (sample index, view index): the order is the caller's."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate_views,
        pin_memory=pin_memory,
    )
