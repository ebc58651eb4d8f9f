"""Streamed images decoded on the training device (``distill.stream_decode=device``).

Data-loader workers decode nothing: they read each image's bytes and header (its size), draw the
crop box as the worker path draws it, and send the encoded files with their boxes. The training
process decodes a whole batch with ``torchvision.io.decode_jpeg`` on its device (nvjpeg on CUDA,
libjpeg on the CPU), crops each box and resizes it there, so the CPU cores that decoded JPEGs are
free for reading and shuffling. Images ``decode_jpeg`` does not take (PNG, WebP) or refuses are
decoded on the CPU, one by one, with the worker path's decoder; an image that does not decode at
all is dropped, and the caller counts it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from synthdistill.shards import decode_image

JPEG_MAGIC = (0xFF, 0xD8, 0xFF)


def read_header(data: bytes) -> Image.Image | None:
    """Encoded bytes -> the image with only its header read (size and mode, pixels not decoded),
    or None when the bytes are not an image PIL knows."""
    try:
        return Image.open(io.BytesIO(data))
    except Exception:  # PIL raises many types for corrupt data; the caller counts the skip
        return None


@dataclass(frozen=True)
class EncodedImages:
    """A batch of encoded image files and their crop boxes, as the workers send them.

    The files lie end to end in one uint8 tensor, so a batch crosses from a worker in one
    shared-memory block rather than one per image.
    """

    data: torch.Tensor  # (N,) uint8: the B files' bytes, end to end
    ends: torch.Tensor  # (B,) int64: where each file ends in ``data``
    boxes: torch.Tensor  # (B, 4) int64: (top, left, height, width) in the image's pixels

    @classmethod
    def of(cls, files: Sequence[bytes], boxes: Sequence[Sequence[int]]) -> EncodedImages:
        data = torch.frombuffer(bytearray(b"".join(files)), dtype=torch.uint8)
        ends = torch.tensor([len(f) for f in files], dtype=torch.int64).cumsum(0)
        return cls(data, ends, torch.tensor(boxes, dtype=torch.int64).reshape(-1, 4))

    @classmethod
    def cat(cls, parts: Sequence[EncodedImages]) -> EncodedImages:
        offsets = [0, *(int(p.data.numel()) for p in parts)]
        starts = torch.tensor(offsets[:-1]).cumsum(0)
        ends = [p.ends + start for p, start in zip(parts, starts.tolist(), strict=True)]
        return cls(torch.cat([p.data for p in parts]), torch.cat(ends), torch.cat([p.boxes for p in parts]))

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, index: slice) -> EncodedImages:
        first, stop, _ = index.indices(len(self))
        start = int(self.ends[first - 1]) if first > 0 else 0
        end = int(self.ends[stop - 1]) if stop > first else start
        return EncodedImages(self.data[start:end], self.ends[first:stop] - start, self.boxes[first:stop])

    def files(self) -> list[torch.Tensor]:
        """The B files as 1-D uint8 tensors (views of ``data``)."""
        starts = [0, *self.ends.tolist()]
        return [self.data[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]

    def pin_memory(self) -> EncodedImages:
        """As is: the decoders read the files from ordinary host memory."""
        return self


def decode_crops(
    images: EncodedImages, size: int, interpolation: str, device: torch.device
) -> tuple[torch.Tensor, list[int]]:
    """The batch decoded on ``device``, each box cropped and resized to ``size`` (antialiased, as
    PIL resizes) -> (K, 3, size, size) uint8 and the indices of the K images that decoded."""
    decoded = decode_files(images.files(), device)
    kept = [i for i, image in enumerate(decoded) if image is not None]
    crops = torch.empty((len(kept), 3, size, size), dtype=torch.uint8, device=device)
    for slot, i in zip(crops, kept, strict=True):
        top, left, height, width = images.boxes[i].tolist()
        slot.copy_(resize_crop(decoded[i][:, top : top + height, left : left + width], size, interpolation))
    return crops, kept


def decode_files(files: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """1-D uint8 files -> (3, H, W) uint8 RGB images on ``device`` (None: does not decode).

    The JPEGs go to ``decode_jpeg`` in one call; when one bad file makes that call fail, they go one
    by one to find it. What ``decode_jpeg`` does not decode is tried with the worker path's decoder.
    """
    images: list[torch.Tensor | None] = [None] * len(files)
    jpegs = [i for i, f in enumerate(files) if tuple(f[:3].tolist()) == JPEG_MAGIC]
    if jpegs:
        try:
            batch = decode_jpeg([files[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            batch = [_decode_jpeg(files[i], device) for i in jpegs]
        for i, image in zip(jpegs, batch, strict=True):
            images[i] = image
    for i, file in enumerate(files):
        if images[i] is None:
            image = decode_image(file.numpy().tobytes())
            if image is not None:
                images[i] = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).to(device)
    return images


def _decode_jpeg(file: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return decode_jpeg(file, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


def resize_crop(crop: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
    """(3, h, w) uint8 -> (3, size, size) uint8, antialiased: on the CPU straight from uint8 (torch's
    vectorised path, rounded as PIL rounds), on a GPU in float, then rounded."""
    if crop.device.type == "cpu":
        crop = crop[None].contiguous(memory_format=torch.channels_last)
        return F.interpolate(
            crop, size=(size, size), mode=interpolation, antialias=True, align_corners=False
        )[0]
    resized = F.interpolate(
        crop[None].float(), size=(size, size), mode=interpolation, antialias=True, align_corners=False
    )[0]
    return resized.round_().clamp_(0, 255).to(torch.uint8)
