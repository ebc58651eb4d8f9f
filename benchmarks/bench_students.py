"""Choosing a student: what each preset costs next to the teacher's image tower, measured in one run.

For every student preset (and any timm name given) and for the teacher's image tower (ViT-B-32's
architecture, random weights: no download), each built exactly as ``synthdistill export`` builds
it (the zero-shot classifier with normalisation inside; the tower as export times it): parameters,
GMACs per image (PyTorch's FlopCounterMode), and ONNX Runtime CPU latency at batch 1 and 32 in
fp32 and in int8 (export's static QDQ quantization, calibrated on random images: the weights are
random too, so only the cost is meaningful). The exports and quantizations run first, in
``--jobs`` processes at once; then each model's latencies are measured alone, one model after
the other. Each latency is the median over a time budget after warm-up; every figure is also
given as the teacher's multiple::

    python benchmarks/bench_students.py                       # every preset, ~10+ minutes on 2 cores
    python benchmarks/bench_students.py --quick               # TinyViT-5M, EfficientNet-B0, teacher; < 2 min
    python benchmarks/bench_students.py --models resnet18 --only --seconds 5

``--quick`` calibrates int8 on one image and exports with torch's older TorchScript-based ONNX
exporter (seconds per model instead of the dynamo exporter's tens of seconds), so its graphs may
differ a little from what export ships.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from synthdistill.deploy.export import TeacherImageTower, write_onnx
from synthdistill.deploy.forms import quantize_int8
from synthdistill.deploy.latency import (
    CPU_PROVIDER,
    LATENCY_BATCHES,
    Timing,
    count_flops,
    describe_machine,
    onnx_session,
    time_calls,
    usable_cpus,
)
from synthdistill.deploy.zero_shot import ZeroShotClassifier
from synthdistill.student import create_student
from synthdistill.teacher import load_teacher

PRESETS = (
    "tiny_vit_5m_224",
    "tiny_vit_11m_224",
    "tiny_vit_21m_224",
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
    "mobilenetv3_large_100",
    "fastvit_mci0",
)
QUICK_PRESETS = ("tiny_vit_5m_224", "efficientnet_b0")
TEACHER = "ViT-B-32"
NUM_CLASSES = 100
FAILURES: list[tuple[str, str]] = []  # (model, why its forward pass failed)
CALIBRATION_IMAGES = 4  # random weights: the ranges do not matter, only the cost; calibration is slow


@dataclass
class Row:
    name: str
    image_size: int
    parameters: int
    macs: int
    latency: dict[tuple[str, int], Timing]


def _encoder(name: str):
    """(module taking RGB in [0, 1], input size, parameter count, ONNX outputs) of a student (built as
    export builds its classifier) or of the teacher tower (``teacher <name>``)."""
    teacher = load_teacher(TEACHER, pretrained=None)
    if name == f"teacher {TEACHER}":
        tower = TeacherImageTower(teacher).eval()
        return (
            tower,
            teacher.preprocessing.image_size,
            sum(p.numel() for p in tower.parameters()),
            ["embedding"],
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        student = create_student(name, teacher.embed_dim, preprocessing=teacher.preprocessing)
    head = torch.nn.functional.normalize(torch.randn(teacher.embed_dim, NUM_CLASSES), dim=0)
    classifier = ZeroShotClassifier(student, head, student.config.preprocessing).eval()
    size = student.config.preprocessing.image_size
    return classifier, size, sum(p.numel() for p in student.parameters()), ["logits", "embedding"]


@dataclass
class Prepared:
    """One model exported to fp32 and int8 ONNX, with its size and cost; or why it could not be."""

    name: str
    image_size: int = 0
    parameters: int = 0
    macs: int = 0
    fp32: Path | None = None
    int8: Path | None = None
    failure: str | None = None
    phases: str = ""


def prepare(name: str, folder: Path, dynamo: bool, calibration_images: int, threads: int) -> Prepared:
    """Build, export (fp32 and int8) and count one model: the part that needs no quiet machine."""
    torch.set_num_threads(threads)
    module, size, parameters, outputs = _encoder(name)
    try:
        with torch.inference_mode():
            module(torch.zeros(1, 3, size, size))
    except RuntimeError as e:  # a student the project cannot build yet: say so, measure the rest
        return Prepared(name, failure=str(e).splitlines()[0])
    phases = {"export": time.perf_counter()}
    fp32 = folder / f"{name.replace(' ', '_')}.onnx"
    write_onnx(module, fp32, size, 18, outputs, name, dynamo=dynamo)
    phases["quantize"] = time.perf_counter()
    int8 = fp32.with_suffix(".int8.onnx")
    calibration = np.random.default_rng(0).random((calibration_images, 3, size, size)).astype(np.float32)
    quantize_int8(fp32, int8, calibration)
    phases["FLOPs"] = time.perf_counter()
    macs = count_flops(module, torch.zeros(1, 3, size, size)) // 2
    ends = [*list(phases.values())[1:], time.perf_counter()]
    spent = ", ".join(
        f"{phase} {end - start:.0f} s" for (phase, start), end in zip(phases.items(), ends, strict=True)
    )
    return Prepared(name, size, parameters, macs, fp32, int8, phases=spent)


def measure(
    names: list[str],
    seconds: float,
    min_runs: int,
    warmup: int,
    threads: int,
    folder: Path,
    dynamo: bool,
    calibration_images: int,
    jobs: int,
) -> list[Row]:
    """Prepare every model (``jobs`` processes at once), then time each alone, one after the other."""
    names = [*names, f"teacher {TEACHER}"]
    if jobs > 1:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=context) as pool:
            futures = {  # the teacher, the slowest to quantize, first
                name: pool.submit(prepare, name, folder, dynamo, calibration_images, max(1, threads // jobs))
                for name in [names[-1], *names[:-1]]
            }
            prepared = [futures[name].result() for name in names]
    else:
        prepared = [prepare(name, folder, dynamo, calibration_images, threads) for name in names]
    torch.set_num_threads(threads)
    rows = []
    for model in prepared:
        if model.failure:
            FAILURES.append((model.name, model.failure))
            print(f"  not measured {model.name}: {model.failure}", flush=True)
            continue
        started = time.perf_counter()
        latency = {}
        for precision, path in (("fp32", model.fp32), ("int8", model.int8)):
            session = onnx_session(path, CPU_PROVIDER, threads)
            for batch in LATENCY_BATCHES:
                feed = {
                    "images": np.random.default_rng(batch)
                    .random((batch, 3, model.image_size, model.image_size))
                    .astype(np.float32)
                }
                latency[precision, batch] = time_calls(
                    lambda s=session, f=feed: s.run(None, f), seconds, min_runs, warmup
                )
        rows.append(Row(model.name, model.image_size, model.parameters, model.macs, latency))
        print(
            f"  measured {model.name}: {model.phases}, latency {time.perf_counter() - started:.0f} s",
            flush=True,
        )
    return rows


def render(rows: list[Row], header: str) -> str:
    """A markdown table: each cost, and in brackets the teacher tower's multiple of it (speed-up)."""
    teacher = rows[-1]
    columns = [(p, b) for b in LATENCY_BATCHES for p in ("fp32", "int8")]
    lines = [
        header,
        "",
        "| model | input | parameters (M) | GMACs | "
        + " | ".join(f"{p} batch {b}: ms (speed-up)" for p, b in columns)
        + " | images/s fp32 batch 32 |",
        "|---|---:|---:|---:|" + "---:|" * len(columns) + "---:|",
    ]
    for row in rows:
        ms = {key: row.latency[key].median_ms for key in columns}
        cells = [f"{ms[key]:.1f} ({teacher.latency[key].median_ms / ms[key]:.1f}x)" for key in columns]
        rate = 1000.0 * 32 / row.latency["fp32", 32].median_ms
        lines.append(
            f"| {row.name} | {row.image_size} | {row.parameters / 1e6:.1f} "
            f"({row.parameters / teacher.parameters:.0%}) | {row.macs / 1e9:.2f} "
            f"({row.macs / teacher.macs:.0%}) | " + " | ".join(cells) + f" | {rate:.0f} |"
        )
    lines += [f"\nNot measured: {name} (its forward pass fails: {why})." for name, why in FAILURES]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="TinyViT-5M, EfficientNet-B0 and the teacher, short budgets."
    )
    parser.add_argument("--models", nargs="*", default=[], help="More timm model names to measure.")
    parser.add_argument("--only", action="store_true", help="Measure only --models (and the teacher).")
    parser.add_argument("--seconds", type=float, help="Time budget per measurement (default 3, quick 0.3).")
    parser.add_argument("--min-runs", type=int, help="Timed runs at least (default 5, quick 1).")
    parser.add_argument(
        "--warmup", type=int, help="Untimed runs before each measurement (default 3, quick 1)."
    )
    parser.add_argument(
        "--threads", type=int, default=usable_cpus(), help="Intra-op threads (default: all usable)."
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(2, usable_cpus()),
        help="Processes that export and quantize the models at once (default 2); latency is then "
        "measured one model at a time, with nothing else running.",
    )
    parser.add_argument("--json", metavar="FILE", help="Also write the measurements as JSON.")
    args = parser.parse_args()
    presets = [] if args.only else list(QUICK_PRESETS if args.quick else PRESETS)
    names = list(dict.fromkeys(presets + args.models))
    seconds = args.seconds or (0.3 if args.quick else 3.0)
    min_runs = args.min_runs or (1 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as folder:
        rows = measure(
            names,
            seconds,
            min_runs,
            warmup,
            args.threads,
            Path(folder),
            dynamo=not args.quick,
            calibration_images=1 if args.quick else CALIBRATION_IMAGES,
            jobs=args.jobs,
        )
    header = (
        f"ONNX Runtime, CPUExecutionProvider, {args.threads} intra-op threads; median over a {seconds:g} s "
        f"budget per figure (at least {min_runs} runs, after {warmup} warm-up); random weights and input; "
        f"{'TorchScript-based' if args.quick else 'dynamo'} ONNX exporter. "
        f"Machine: {describe_machine()}."
    )
    print(render(rows, header))
    print(
        f"\n{len(rows)} models in {time.perf_counter() - started:.0f} s wall, "
        f"{time.process_time() - cpu_started:.0f} s CPU time of this process (not its export processes)."
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                [
                    {
                        "model": r.name,
                        "image_size": r.image_size,
                        "parameters": r.parameters,
                        "macs": r.macs,
                        "latency": {f"{p} batch {b}": t.to_dict() for (p, b), t in r.latency.items()},
                    }
                    for r in rows
                ],
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
