"""Images/s of stage 3, side by side in one run: the data loader alone, the student's step alone,
training with the teacher in the loop, and training from the teacher cache::

    python benchmarks/bench_distill.py                  # tiny teacher -> tiny student on the CPU
    python benchmarks/bench_distill.py --device cuda    # ViT-B-32 -> tiny_vit_5m_224

Both training runs see the same views (``--epochs`` <= the cache's views), so they do the same
work but for the teacher. With the cache, training should run close to the student-step bound.
On a GPU the teacher is ViT-B-32 with the paper's DataComp XL weights when they are in the local
cache, else with random weights: the same architecture, so the same speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from synthdistill.augment import Augmentation, ViewDataset
from synthdistill.config import DistillConfig
from synthdistill.distill import (
    Distiller,
    ShardViewSource,
    build_student,
    distill,
    make_optimizer,
    open_shards,
)
from synthdistill.errors import SynthdistillError
from synthdistill.losses import LossSettings, WeightedLoss
from synthdistill.runtime import DistEnv, autocast, resolve_device
from synthdistill.shards import ShardWriter, encode_sample, shard_name, write_index
from synthdistill.teacher import load_teacher


def write_images(directory: Path, count: int, size: int) -> Path:
    """Smooth random colour images (JPEG, as generate writes them) in shards of 1000."""
    rng = np.random.default_rng(0)
    for number, start in enumerate(range(0, count, 1000)):
        with ShardWriter(directory / shard_name(number)) as writer:
            for i in range(start, min(start + 1000, count)):
                coarse = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
                image = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
                writer.write(f"{i:08d}", encode_sample(image, {"class_index": i % 10}))
    write_index(directory, {"source": "bench_distill"})
    return directory


def loader_images_per_second(shards: Path, config: DistillConfig, device: torch.device) -> float:
    """One epoch of the training loader (decode, crop, resize, normalise, collate), nothing else."""
    teacher = load_teacher(config.teacher, config.teacher_pretrained, "cpu")
    student = build_student(config, teacher, seed=0)
    dataset = ViewDataset(
        open_shards(shards), Augmentation(0, config.aug_scale_min), [student.config.preprocessing]
    )
    source = ShardViewSource(
        dataset, config.batch_size, 0, views=1, env=DistEnv(), workers=config.workers,
        pin_memory=device.type == "cuda",
    )  # fmt: skip
    started, images = time.perf_counter(), 0
    for batch in source.loader(0):
        images += len(batch.inputs[0].to(device, non_blocking=True))
    return images / (time.perf_counter() - started)


def student_step_images_per_second(config: DistillConfig, device: torch.device, steps: int = 20) -> float:
    """The bound: forward, backward and AdamW step on a batch already on the device."""
    teacher = load_teacher(config.teacher, config.teacher_pretrained, device)
    student = build_student(config, teacher, seed=0)
    distiller = Distiller(student, WeightedLoss("fd", LossSettings()), None).to(device).train()
    model = torch.compile(distiller) if config.compile else distiller
    optimizer = make_optimizer(distiller, config, device)
    size = student.config.preprocessing.image_size
    images = torch.randn(config.batch_size, 3, size, size, device=device)
    targets = torch.randn(config.batch_size, teacher.embed_dim, device=device)
    labels = torch.zeros(config.batch_size, dtype=torch.long, device=device)
    del teacher
    for step in range(steps + 3):  # 3 warm-up steps
        if step == 3:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
        with autocast(device, config.precision):
            loss, _ = model(images, targets, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * config.batch_size / (time.perf_counter() - started)


def paper_teacher_or_random(config: DistillConfig) -> DistillConfig:
    """The paper's teacher weights when they are available offline, else the same model with random ones."""
    try:
        load_teacher(config.teacher, config.teacher_pretrained, "cpu")
        return config
    except SynthdistillError as error:
        print(f"note: {error} Timing {config.teacher} with random weights instead (same speed).")
        return dataclasses.replace(config, teacher_pretrained=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--images", type=int, help="Synthetic images (default: 512 on CPU, 8192 on GPU).")
    parser.add_argument("--epochs", type=int, default=2, help="Training epochs per run (= cached views).")
    parser.add_argument("--batch-size", type=int, help="Batch size (default: 32 on CPU, 256 on GPU).")
    parser.add_argument("--workers", type=int, help="Data-loader workers (default: 0 on CPU, 8 on GPU).")
    parser.add_argument("--teacher", help="Teacher (default: tiny on CPU, ViT-B-32 on GPU).")
    parser.add_argument("--student", help="Student (default: tiny on CPU, tiny_vit_5m_224 on GPU).")
    parser.add_argument("--compile", action="store_true", help="torch.compile the student.")
    args = parser.parse_args()

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    config = DistillConfig(
        teacher=args.teacher or ("ViT-B-32" if gpu else "tiny"),
        student=args.student or ("tiny_vit_5m_224" if gpu else "tiny"),
        epochs=args.epochs,
        batch_size=args.batch_size or (256 if gpu else 32),
        workers=args.workers if args.workers is not None else (8 if gpu else 0),
        cache_views=args.epochs,
        compile=args.compile,
        checkpoint_every=10**9,
        log_every=10**9,
    )
    if config.teacher == "tiny":
        config = dataclasses.replace(config, teacher_pretrained=None)
    else:
        config = paper_teacher_or_random(config)
    count, size = args.images or (8192 if gpu else 512), 256 if gpu else 64

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        shards = write_images(root / "shards", count, size)
        rows = {
            "data loader alone": loader_images_per_second(shards, config, device),
            "student step alone (no data)": student_step_images_per_second(config, device),
        }
        live = distill(
            shards,
            root / "live" / "student",
            dataclasses.replace(config, cache_teacher=False),
            device=str(device),
        )
        cached = distill(shards, root / "cached" / "student", config, device=str(device))
        rows["train, live teacher"] = live.images_per_second
        rows["train, teacher cache"] = cached.images_per_second

    teacher = f"{config.teacher}/{config.teacher_pretrained or 'random'}"
    print(
        f"\nstage 3 throughput: {teacher} -> {config.student} on {device}, {count} images of {size} px, "
        f"batch {config.batch_size}, {config.workers} workers, {config.epochs} epochs"
    )
    width = max(map(len, rows))
    print(f"{'':{width}}  {'images/s':>10}  {'vs live teacher':>15}")
    for name, value in rows.items():
        print(f"{name:{width}}  {value:10.0f}  {value / rows['train, live teacher']:14.2f}x")
    print(
        f"teacher cache: {count} images x {config.cache_views} views embedded once in "
        f"{cached.cache_seconds:.1f} s (reused by every later run on these shards)"
    )


if __name__ == "__main__":
    main()
