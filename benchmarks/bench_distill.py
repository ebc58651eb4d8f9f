"""Images/s of stage 3, side by side in one run on the same images::

    python benchmarks/bench_distill.py                  # tiny teacher -> tiny student on the CPU
    python benchmarks/bench_distill.py --device cuda    # ViT-B-32 -> tiny_vit_5m_224, bf16

1. The input pipeline alone, to the student's normalised input on the device: the worker loader
   (JPEG decoded per sample, every epoch) against the decoded pipeline (the shards decoded once
   into a uint8 store, a batch gathered from it); both crop, flip, resize and normalise with the
   same augmentation (``data/augment.py: render_views``) on the device. Same cores: ``--workers``
   processes decode for the worker loader (0: the main process), the decoded pipeline uses the
   main process only.
2. Full training with each input (teacher cache on, built beforehand).
3. The live teacher against the cache at equal views (``--epochs`` = cached views), the cache's
   build time included.
On CUDA, the student step's MFU: FLOPs of one step (``torch.utils.flop_counter.FlopCounterMode``
on the real architectures) x images/s / the device's dense bf16 peak. The last line is the input
pipeline's speed-up. With ``--json PATH`` the figures are also written there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from synthdistill.config import DistillConfig, load_recipe
from synthdistill.data.augment import Augmentation, augment
from synthdistill.data.decoded import open_or_build_decoded
from synthdistill.errors import SynthdistillError
from synthdistill.identity import shards_folder_identity
from synthdistill.losses import LossSettings, WeightedLoss
from synthdistill.runtime import DistEnv, autocast, resolve_device
from synthdistill.shards import ShardWriter, encode_sample, shard_name, write_index
from synthdistill.teacher import Preprocessing, load_teacher
from synthdistill.train import distill_student
from synthdistill.train.loop import Distiller, build_student
from synthdistill.train.optim import make_optimizer
from synthdistill.train.sources import DecodedBatches, ShardViewSource, WorkerImages, open_shards

# Dense bf16 tensor-core peaks (FLOP/s) by device name, from the vendors' data sheets.
BF16_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}
# the images stage 3 reads in the paper recipes (generate.store_size of configs/<dataset>.yaml)
PAPER_STORE_SIZE = load_recipe(Path(__file__).parents[1] / "configs" / "pets.yaml").generate.store_size
CLIP_INPUT = Preprocessing(224, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


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


def input_images_per_second(images, count: int, batch: int, device: torch.device) -> float:
    """One epoch of ``images`` (worker or decoded source) to normalised, augmented inputs on the device."""
    order = ShardViewSource(count, batch, seed=0, views=1, env=DistEnv())
    augmentation = Augmentation(0, (0.08, 1.0), interpolation="bilinear", hflip=0.5)
    started, seen = time.perf_counter(), 0
    for loaded in images.batches(order.batches(0), device):
        (views,) = augment(loaded, augmentation, [CLIP_INPUT])
        seen += len(views)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return seen / (time.perf_counter() - started)


def student_step(config: DistillConfig, device: torch.device, steps: int = 20) -> tuple[float, float]:
    """The bound: forward, backward and AdamW step on a batch already on the device.
    -> (images/s, FLOPs per image of one step)."""
    from torch.utils.flop_counter import FlopCounterMode

    teacher = load_teacher(config.teacher, config.teacher_pretrained, device)
    student = build_student(config, teacher, seed=0)
    distiller = Distiller(student, WeightedLoss("fd", LossSettings()), None).to(device).train()
    model = torch.compile(distiller) if config.compile else distiller
    optimizer = make_optimizer(distiller, config.lr, config.weight_decay, config.betas, config.eps, device)
    size = student.config.preprocessing.image_size
    images = torch.randn(config.batch_size, 3, size, size, device=device)
    targets = torch.randn(config.batch_size, teacher.embed_dim, device=device)
    labels = torch.zeros(config.batch_size, dtype=torch.long, device=device)
    del teacher
    with FlopCounterMode(display=False) as counter:
        with autocast(device, config.precision):
            loss, _ = distiller(images, targets, labels)
        loss.backward()
    flops = counter.get_total_flops() / config.batch_size
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
    return steps * config.batch_size / (time.perf_counter() - started), flops


def bf16_peak(device: torch.device) -> tuple[str, float | None]:
    name = torch.cuda.get_device_name(device)
    return name, next((peak for key, peak in BF16_PEAKS.items() if key in name), None)


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
    parser.add_argument(
        "--size",
        type=int,
        default=PAPER_STORE_SIZE,
        help=f"Stored image side (generate.store_size; default {PAPER_STORE_SIZE}, the paper recipes').",
    )
    parser.add_argument("--epochs", type=int, default=2, help="Training epochs per run (= cached views).")
    parser.add_argument("--batch-size", type=int, help="Batch size (default: 32 on CPU, 256 on GPU).")
    parser.add_argument("--workers", type=int, help="Data-loader workers (default: 0 on CPU, 8 on GPU).")
    parser.add_argument("--teacher", help="Teacher (default: tiny on CPU, ViT-B-32 on GPU).")
    parser.add_argument("--student", help="Student (default: tiny on CPU, tiny_vit_5m_224 on GPU).")
    parser.add_argument("--compile", action="store_true", help="torch.compile the student.")
    parser.add_argument("--json", type=Path, help="Also write the figures to this file.")
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
        precision="bf16" if gpu else "fp32",
        checkpoint_every=10**9,
        log_every=10**9,
    )
    if config.teacher == "tiny":
        config = dataclasses.replace(config, teacher_pretrained=None)
    else:
        config = paper_teacher_or_random(config)
    count = args.images or (8192 if gpu else 512)

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        shards = write_images(root / "run" / "shards", count, args.size)
        samples = open_shards(shards)
        started = time.perf_counter()
        store = open_or_build_decoded(
            root / "run" / "decoded", samples, shards_folder_identity(shards), DistEnv()
        )
        decode_seconds = time.perf_counter() - started
        store.to_device(device)
        workers = WorkerImages(samples, config.workers, pin_memory=gpu)
        pipeline = {
            "worker loader (JPEG)": input_images_per_second(workers, count, config.batch_size, device),
            "decoded pipeline": input_images_per_second(
                DecodedBatches(store), count, config.batch_size, device
            ),
        }
        step_rate, step_flops = student_step(config, device)

        runs = {}
        for name, overrides in {
            "train, workers, cache": {"input": "workers"},
            "train, decoded, cache": {"input": "decoded"},
            "train, decoded, live teacher": {"input": "decoded", "cache_teacher": False},
        }.items():
            cache_dir = root / "cache" / name.replace(", ", "-").replace(" ", "_")
            run_config = dataclasses.replace(config, **overrides)
            out = root / name.replace(", ", "-").replace(" ", "_") / "student"
            runs[name] = distill_student(shards, out, run_config, device=str(device), cache_dir=cache_dir)
        cached = runs["train, decoded, cache"]
        trained = count * config.epochs
        with_build = trained / (trained / cached.images_per_second + cached.cache_seconds)

    teacher = f"{config.teacher}/{config.teacher_pretrained or 'random'}"
    print(
        f"\nstage 3 throughput: {teacher} -> {config.student} on {device}, {count} images of {args.size} px, "
        f"batch {config.batch_size}, {config.workers} workers, {config.epochs} epochs, {config.precision}; "
        f"{torch.get_num_threads()} torch threads"
    )
    rows = {
        **{f"input: {k}": v for k, v in pipeline.items()},
        "student step alone (no data)": step_rate,
        **{name: run.images_per_second for name, run in runs.items()},
        "train, decoded, cache incl. its build": with_build,
    }
    width = max(map(len, rows))
    print(f"{'':{width}}  {'images/s':>10}")
    for name, value in rows.items():
        print(f"{name:{width}}  {value:10.0f}")
    print(
        f"decoding the shards once: {decode_seconds:.1f} s; teacher cache build: {cached.cache_seconds:.1f} s"
    )
    live = runs["train, decoded, live teacher"].images_per_second
    print(f"cache incl. its build vs live teacher: {with_build / live:.2f}x")
    figures = {"rows": rows, "decode_seconds": decode_seconds, "cache_seconds": cached.cache_seconds}
    if gpu:
        name, peak = bf16_peak(device)
        step_mfu = step_flops * step_rate / peak if peak else None
        loop_mfu = step_flops * cached.images_per_second / peak if peak else None
        shown = f"{step_mfu:.1%} (student step), {loop_mfu:.1%} (training loop)" if peak else "unknown peak"
        print(f"MFU on {name}, dense bf16 peak {peak or 0:.3g} FLOP/s: {shown}")
        figures.update(device=name, bf16_peak=peak, step_mfu=step_mfu, loop_mfu=loop_mfu)
        figures["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    speedup = pipeline["decoded pipeline"] / pipeline["worker loader (JPEG)"]
    figures["input_speedup"] = speedup
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    print(f"input pipeline speed-up (decoded vs workers): {speedup:.2f}x")


if __name__ == "__main__":
    main()
