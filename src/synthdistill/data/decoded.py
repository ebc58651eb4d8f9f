"""The run's shards decoded once into one uint8 array, so no epoch decodes a JPEG again.

``images-<key>.npy`` holds (N, H, W, 3) uint8 (memory-mapped), every image at the top left of an
H x W canvas (the largest height and width among the shards; zeros around smaller images; generate
writes one size, so there is no padding); ``images-<key>.json`` holds each image's own size,
label and key, and which images did not decode (size 0 x 0). The key names the shards' content,
so other shards mean another file. Built by rank 0 under a lock file, written to temporary names
and renamed: a store whose ``.json`` exists is complete.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from synthdistill.data.augment import Batch, pad_images
from synthdistill.fileio import (
    atomic_write_json,
    disk_full_is_an_error,
    exclusive_lock,
    read_json,
    remove_stale_temporaries,
    temporary_name,
)
from synthdistill.identity import decoded_store_identity
from synthdistill.progress import progress_iter
from synthdistill.runtime import DistEnv, barrier, waiting_group
from synthdistill.shards import ShardSamples, decode_image

logger = logging.getLogger(__name__)

STORE_FORMAT = "synthdistill.decoded/1"


@dataclass
class DecodedImages:
    """The decoded store: ``images`` (N, H, W, 3) uint8 (a memory map, or a tensor on the device)."""

    path: Path
    images: np.ndarray | torch.Tensor
    sizes: np.ndarray  # (N, 2) each image's (height, width); (0, 0) where it did not decode
    labels: np.ndarray  # (N,) class index, -1 where none
    keys: list[str]
    built: bool

    def __len__(self) -> int:
        return len(self.keys)

    def to_device(self, device: torch.device, margin: float = 0.5) -> None:
        """Move the whole store to ``device`` when it takes at most ``margin`` of its free memory
        (then a batch is one gather there); else batches stay pinned copies from the memory map."""
        if device.type != "cuda":
            return
        free, _ = torch.cuda.mem_get_info(device)
        if self.images.nbytes <= margin * free:
            self.images = torch.from_numpy(np.ascontiguousarray(self.images)).to(device)
            logger.info("decoded images: %.1f GB in device memory", self.images.nbytes / 1e9)

    def batch(self, items: list[tuple[int, int]], device: torch.device) -> Batch:
        """The decodable images of ``items`` (sample index, view index) as a :class:`Batch` on ``device``,
        cut to the batch's largest size (as the worker path pads them)."""
        good = [(i, v) for i, v in items if self.sizes[i, 0] > 0]
        indices = np.array([i for i, _ in good], dtype=np.int64)
        sizes = torch.from_numpy(self.sizes[indices].astype(np.int64)).reshape(-1, 2)
        height, width = (int(v) for v in sizes.max(0).values) if len(good) else (1, 1)
        if isinstance(self.images, torch.Tensor):
            images = self.images[torch.from_numpy(indices).to(self.images.device), :height, :width]
        else:
            images = torch.from_numpy(np.ascontiguousarray(self.images[indices, :height, :width]))
            if device.type == "cuda":
                images = images.pin_memory()
        return Batch(
            indices=torch.from_numpy(indices),
            views=torch.tensor([v for _, v in good], dtype=torch.long),
            labels=torch.from_numpy(self.labels[indices].astype(np.int64)).to(device, non_blocking=True),
            keys=[self.keys[i] for i in indices],
            images=images.to(device, non_blocking=True),
            sizes=sizes,
            corrupt_keys=[self.keys[i] for i, _ in items if self.sizes[i, 0] == 0],
        )


def image_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from the image header alone, or None when it is not a readable image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size[1], image.size[0]
    except Exception:  # PIL raises many types for corrupt data
        return None


def allocated_memmap(path: Path, dtype, shape: tuple[int, ...]) -> np.memmap:
    """A new ``.npy`` memory map (:func:`numpy.lib.format.open_memmap`) whose disk space is reserved
    at once: writes through a map happen at page faults, where a full disk kills the process
    (SIGBUS) instead of raising; reserving raises ENOSPC here, before any row is written."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    if hasattr(os, "posix_fallocate"):
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        finally:
            os.close(fd)
    return array


def open_or_build_decoded(
    store_dir: Path, samples: ShardSamples, shards_id: str, env: DistEnv
) -> DecodedImages:
    """The decoded store of ``samples`` (``shards_id``, their :func:`~synthdistill.identity.
    shards_folder_identity`, names their content): reused, or built by rank 0."""
    key = decoded_store_identity(shards_id, STORE_FORMAT)
    path, meta_path = store_dir / f"images-{key}.npy", store_dir / f"images-{key}.json"
    built = False
    patient = waiting_group(env)  # the other ranks may wait long for a big store: no NCCL timeout
    if env.is_main and not meta_path.is_file():
        with exclusive_lock(store_dir / f".images-{key}.lock", "the decoded images", wait=True):
            remove_stale_temporaries(store_dir, recursive=False)  # what a killed build left
            if not meta_path.is_file():  # another process may have built it while we waited
                build_decoded(path, meta_path, samples)
                built = True
    barrier(env, patient)
    meta = read_json(meta_path)
    return DecodedImages(
        path,
        np.load(path, mmap_mode="r"),
        np.array(meta["sizes"], dtype=np.int64).reshape(-1, 2),
        np.array(meta["labels"], dtype=np.int64),
        meta["keys"],
        built,
    )


def build_decoded(path: Path, meta_path: Path, samples: ShardSamples) -> None:
    """Two passes: image sizes from the headers (the canvas), then decode each image into its row."""
    count = len(samples)
    sizes = np.zeros((count, 2), dtype=np.int64)
    for index in range(count):
        sizes[index] = image_size(samples[index].image) or (0, 0)
    height, width = (int(v) for v in sizes.max(0)) if count else (1, 1)
    tmp = temporary_name(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with disk_full_is_an_error(path.parent):
            images = allocated_memmap(tmp, np.uint8, (count, max(height, 1), max(width, 1), 3))
            labels, keys = [], []
            for index in progress_iter(range(count), count, "decode images", unit="image"):
                sample = samples[index]
                labels.append(int(sample.meta.get("class_index", -1)))
                keys.append(sample.key)
                image = decode_image(sample.image) if sizes[index, 0] else None
                if image is None:
                    sizes[index] = 0
                    continue
                pixels = np.asarray(image)
                sizes[index] = pixels.shape[:2]
                images[index] = pad_images([pixels], height, width)[0]
            images.flush()
            del images
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_json(
        meta_path, {"format": STORE_FORMAT, "sizes": sizes.tolist(), "labels": labels, "keys": keys}
    )
    logger.info("decoded %d images at up to %dx%d -> %s", count, height, width, path)
