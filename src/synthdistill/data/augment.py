"""Replayable augmented views: view ``v`` of sample ``i`` is a pure function of (seed, i, v).

The teacher cache stores the teacher's embedding of view v of sample i; the student's loader later
rebuilds exactly that view, so training on cached targets is the same optimisation problem as
training with the teacher in the loop. A view is a crop box in the original image's pixels and a
horizontal flip, drawn from a generator seeded by (seed, i, v); it is resized to each model's own
input size, so teacher and student see the same content at their resolutions.

One implementation serves every path: images arrive as uint8 (B, H, W, 3) batches (decoded once
into :mod:`synthdistill.data.decoded`, or decoded by data-loader workers) and :func:`render_views`
crops, resizes, flips and normalises them on the device. Same image, same box: the same tensor,
whichever path or batch it came from.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from synthdistill.runtime import derive_seed
from synthdistill.shards import ShardSamples, decode_image
from synthdistill.teacher import Preprocessing

INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass(frozen=True)
class Augmentation:
    """RandomResizedCrop at area ``scale`` and aspect ``ratio``, resized with ``interpolation``, and
    a horizontal flip with probability ``hflip``. Defaults: open_clip's training crop (0.9, 1),
    bicubic, no flip; the paper's recipes use (0.08, 1), bilinear, flip 0.5."""

    seed: int
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    hflip: float = 0.0

    def view(self, width: int, height: int, index: int, view: int) -> tuple[tuple[int, int, int, int], bool]:
        """((top, left, height, width), flipped) of view ``view`` of sample ``index``.

        torchvision's ``RandomResizedCrop.get_params``, drawing from a generator seeded by
        (seed, index, view) instead of the global RNG; the flip is the generator's next draw.
        """
        rng = random.Random(derive_seed(self.seed, "view", index, view))
        return self._box(rng, width, height), rng.random() < self.hflip

    def crop_box(self, width: int, height: int, index: int, view: int) -> tuple[int, int, int, int]:
        return self.view(width, height, index, view)[0]

    def _box(self, rng: random.Random, width: int, height: int) -> tuple[int, int, int, int]:
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
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


@dataclass
class Batch:
    """A batch of decoded images and which views of them to train on (on the CPU, or the device)."""

    indices: torch.Tensor  # (B,) sample indices
    views: torch.Tensor  # (B,) view indices
    labels: torch.Tensor  # (B,) class indices, -1 where the sample has none
    keys: list[str]
    images: torch.Tensor  # (B, H, W, 3) uint8, each image at the top left, padded to (H, W)
    sizes: torch.Tensor  # (B, 2) each image's (height, width)
    corrupt_keys: list[str]  # samples of this batch dropped because their image did not decode

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> Batch:
        self.images = self.images.pin_memory()
        return self

    def to(self, device: torch.device) -> Batch:
        move = {"non_blocking": True}
        return Batch(
            self.indices, self.views, self.labels.to(device, **move), self.keys,
            self.images.to(device, **move), self.sizes, self.corrupt_keys,
        )  # fmt: skip


def view_boxes(
    augmentation: Augmentation, sizes: torch.Tensor, indices: torch.Tensor, views: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 4) float64 boxes (top, left, height, width) and (B,) bool flips of the batch's views."""
    params = [
        augmentation.view(int(w), int(h), int(i), int(v))
        for (h, w), i, v in zip(sizes.tolist(), indices.tolist(), views.tolist(), strict=True)
    ]
    boxes = torch.tensor([box for box, _ in params], dtype=torch.float64).reshape(-1, 4)
    return boxes, torch.tensor([flip for _, flip in params], dtype=torch.bool)


def render_views(
    images: torch.Tensor,
    boxes: torch.Tensor,
    flips: torch.Tensor,
    preprocessing: Preprocessing,
    interpolation: str,
) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, S, S) float in channels-last memory: crop each box, resize,
    flip, normalise.

    Each crop is resized with antialiasing, as PIL resizes (on the CPU straight from uint8, torch's
    vectorised path, rounded to uint8 as PIL's output is; on a GPU in float, then rounded), so a view
    depends on its image and box alone, not on the rest of the batch. The batch stays channels-last
    throughout (the layout of the images and of torch's fast resize; convolutional students prefer
    it): a transpose to (B, 3, S, S) memory would cost as much as the resize.
    """
    size = preprocessing.image_size
    device = images.device
    on_cpu = device.type == "cpu"
    dtype = torch.uint8 if on_cpu else torch.float32
    batch = torch.empty(
        (len(images), 3, size, size), dtype=dtype, device=device, memory_format=torch.channels_last
    )
    for slot, image, (top, left, height, width), flip in zip(
        batch, images, boxes.tolist(), flips.tolist(), strict=True
    ):
        crop = image[int(top) : int(top + height), int(left) : int(left + width)].permute(2, 0, 1)[None]
        # uint8 channels-last contiguous: torch's vectorised antialiased path (a strided crop is
        # resized to the same values, at twice the cost)
        crop = crop.contiguous(memory_format=torch.channels_last) if on_cpu else crop.float()
        view = F.interpolate(
            crop, size=(size, size), mode=interpolation, antialias=True, align_corners=False
        )[0]
        slot.copy_(view.flip(-1) if flip else view)
    if not on_cpu:
        batch = batch.round_().clamp_(0, 255)
    std = torch.tensor(preprocessing.std, dtype=torch.float32, device=device)
    scale = 1 / (255 * std)
    shift = -torch.tensor(preprocessing.mean, dtype=torch.float32, device=device) / std
    inputs = batch.float()  # channels-last, as the batch
    # one multiply-add over rows of (pixels x channels) with the three channel factors tiled along
    # the row: vectorised, where broadcasting (1, 3, 1, 1) over channels-last memory is not
    rows = inputs.permute(0, 2, 3, 1).view(-1, size * 3)
    torch.addcmul(shift.repeat(size), rows, scale.repeat(size), out=rows)
    return inputs


def augment(
    batch: Batch, augmentation: Augmentation, preprocessings: Sequence[Preprocessing]
) -> list[torch.Tensor]:
    """The batch's views prepared for each model input (same boxes, each model's size), on its device."""
    boxes, flips = view_boxes(augmentation, batch.sizes, batch.indices, batch.views)
    return [render_views(batch.images, boxes, flips, p, augmentation.interpolation) for p in preprocessings]


def pad_images(images: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """(h, w, 3) uint8 images -> (B, height, width, 3), each at the top left, zeros around it (no
    crop box reaches the padding)."""
    out = np.zeros((len(images), height, width, 3), dtype=np.uint8)
    for slot, image in zip(out, images, strict=True):
        slot[: image.shape[0], : image.shape[1]] = image
    return out


class ViewDataset(torch.utils.data.Dataset):
    """(sample index, view index) -> the decoded uint8 image (the worker path's unit of work)."""

    def __init__(self, samples: ShardSamples):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]) -> tuple:
        index, view = item
        sample = self.samples[index]
        label = int(sample.meta.get("class_index", -1))
        image = decode_image(sample.image)
        return index, view, sample.key, label, None if image is None else np.asarray(image)


def collate_views(items: list[tuple]) -> Batch:
    """Stack decodable images, padded to the batch's largest size; name those that did not decode."""
    good = [item for item in items if item[4] is not None]
    sizes = torch.tensor([item[4].shape[:2] for item in good], dtype=torch.long).reshape(-1, 2)
    height, width = (int(v) for v in sizes.max(0).values) if len(good) else (1, 1)
    return Batch(
        indices=torch.tensor([item[0] for item in good], dtype=torch.long),
        views=torch.tensor([item[1] for item in good], dtype=torch.long),
        labels=torch.tensor([item[3] for item in good], dtype=torch.long),
        keys=[item[2] for item in good],
        images=torch.from_numpy(pad_images([item[4] for item in good], height, width)),
        sizes=sizes,
        corrupt_keys=[item[2] for item in items if item[4] is None],
    )


class EpochBatches:
    """A batch sampler whose batches the caller sets before each epoch: one persistent loader
    (and its workers) serves every epoch."""

    def __init__(self):
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def view_loader(
    dataset: ViewDataset, sampler: EpochBatches, workers: int, pin_memory: bool = False
) -> torch.utils.data.DataLoader:
    """A loader over the batches of (sample index, view index) that ``sampler`` holds, in its order."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate_views,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
    )
