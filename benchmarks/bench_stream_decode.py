"""Images/s of streamed training data (``distill.train_data``), side by side in one run on the same shards::

    python benchmarks/bench_stream_decode.py                  # the CPU as the training device
    python benchmarks/bench_stream_decode.py --device cuda    # nvjpeg

From WebDataset shards of JPEGs to the (B, 3, S, S) uint8 crops on the training device:
``distill.stream_decode=workers`` (PIL decodes, crops and resizes in ``--workers`` data-loader
workers) against ``device`` (the workers read the files and draw the boxes; the main process
decodes the batch with ``torchvision.io.decode_jpeg`` on the device and crops there). The last
line is the ratio. With ``--json PATH`` the figures are also written there.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from synthdistill.data.encoded import EncodedImages, decode_crops
from synthdistill.data.stream import build_train_source
from synthdistill.runtime import resolve_device
from synthdistill.shards import ShardWriter, encode_sample, shard_name
from synthdistill.train.sources import RandomCrop


def write_shards(directory: Path, count: int, size: int, per_shard: int) -> str:
    """Smooth random colour JPEGs in shards of ``per_shard``; returns the shards' spec."""
    rng = np.random.default_rng(0)
    shards = 0
    for number, start in enumerate(range(0, count, per_shard)):
        with ShardWriter(directory / shard_name(number)) as writer:
            for i in range(start, min(start + per_shard, count)):
                coarse = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
                image = Image.fromarray(coarse).resize((size, size * 3 // 4), Image.BICUBIC)
                writer.write(f"{i:08d}", encode_sample(image, {}))
        shards = number + 1
    return str(directory / f"shard-{{000000..{shards - 1:06d}}}.tar")


def images_per_second(spec: str, crop: RandomCrop, decode: str, args, device: torch.device) -> float:
    """Crops per second on ``device`` over one epoch of ``spec`` (the loader's start included)."""
    on_device = decode == "device"
    source = build_train_source(
        spec,
        batch_size=args.batch_size,
        transform=crop.box if on_device else crop,
        num_workers=args.workers,
        shuffle_buffer=args.batch_size,
        pin_memory=device.type == "cuda",
        encoded=on_device,
    )
    count = 0
    started = time.perf_counter()
    for batch in source.epoch(0):
        if isinstance(batch.images, EncodedImages):
            images, _ = decode_crops(batch.images, crop.size, crop.interpolation, device)
        else:
            images = batch.images.to(device, non_blocking=True)
        count += len(images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--images", type=int, default=1024, help="Images in the shards.")
    parser.add_argument("--size", type=int, default=512, help="Image width (height: 3/4 of it).")
    parser.add_argument("--crop", type=int, default=224, help="Crop side (the models' input size).")
    parser.add_argument("--batch-size", type=int, default=128, help="Batch size.")
    parser.add_argument("--workers", type=int, default=2, help="Data-loader workers (both paths).")
    parser.add_argument("--json", type=Path, help="Also write the figures to this file.")
    args = parser.parse_args()
    device = resolve_device(args.device)
    crop = RandomCrop(args.crop, (0.9, 1.0), (3 / 4, 4 / 3), "bicubic")
    with tempfile.TemporaryDirectory() as tmp:
        spec = write_shards(
            Path(tmp), args.images, args.size, max(1, args.images // (4 * max(1, args.workers)))
        )
        images_per_second(spec, crop, "device", args, device)  # warm-up: decoder and kernels
        rates = {
            decode: images_per_second(spec, crop, decode, args, device) for decode in ("workers", "device")
        }
    print(f"{args.images} JPEGs of {args.size} x {args.size * 3 // 4} -> {args.crop} px crops on {device}, "
          f"batch {args.batch_size}, {args.workers} workers")  # fmt: skip
    for decode, rate in rates.items():
        print(f"  stream_decode={decode:8s} {rate:9.1f} images/s")
    ratio = rates["device"] / rates["workers"]
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        figures = {"device": str(device), "settings": settings, "images_per_s": rates, "ratio": ratio}
        args.json.write_text(json.dumps(figures, indent=1))
    print(f"stream decode speed-up (device vs workers): {ratio:.2f}x")


if __name__ == "__main__":
    main()
