"""Stage 5, export: the student plus its zero-shot head as one deployable classifier.

Formats: ONNX (float RGB in [0, 1] in, normalisation inside, logits and embedding out), TorchScript,
and an open_clip model whose image tower is the student and whose text tower is the teacher's.
Every file is checked against PyTorch before it is renamed into place; a model card records what
the student costs next to the teacher (parameters, FLOPs, CPU latency).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from synthdistill.config import ExportConfig
from synthdistill.errors import SynthdistillError
from synthdistill.fileio import atomic_path, atomic_write_json, atomic_write_text, read_json, temporary_name
from synthdistill.predict import LABELS_NAME, LOGIT_SCALE, ONNX_NAME, ModelInfo, require_export_extra
from synthdistill.registry import Domain
from synthdistill.student import Student, load_student
from synthdistill.teacher import Preprocessing, Teacher, load_teacher
from synthdistill.tiny import is_tiny, register_tiny_clip_config

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript", "open_clip")
TORCHSCRIPT_NAME = "model.torchscript.pt"
TORCHSCRIPT_INFO = "synthdistill.json"
OPEN_CLIP_DIR = "open_clip"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"
CARD_NAME = "MODEL_CARD.md"
MIN_OPSET = 18
LATENCY_BATCHES = (1, 32)
_VERIFY_SEED = 0


class ZeroShotClassifier(nn.Module):
    """(B, 3, S, S) RGB in [0, 1] -> logits (B, C) = 100 * embedding @ head, embedding (B, D) L2-normalised.

    Normalisation with the student's mean/std happens inside, so a deployment only resizes and crops.
    """

    def __init__(self, student: Student, head: torch.Tensor, preprocessing: Preprocessing):
        super().__init__()
        self.student = student
        self.register_buffer("head", head.float().cpu().contiguous())
        self.register_buffer("mean", torch.tensor(preprocessing.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preprocessing.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.student((images - self.mean) / self.std)
        return LOGIT_SCALE * embedding @ self.head, embedding


def build_classifier(
    student_dir: Path, domain: Domain, device: str | torch.device = "cpu"
) -> tuple[ZeroShotClassifier, Teacher, ModelInfo]:
    """A student folder + classes -> the CPU classifier, the teacher named in its config, and its ModelInfo.

    The head is the teacher's CLIP template ensemble over ``domain`` (computed on ``device``).
    """
    student = load_student(student_dir)
    config = student.config
    if config.teacher is None or config.preprocessing is None:
        raise SynthdistillError(
            f"'{Path(student_dir) / 'config.json'}' does not name its teacher and preprocessing; "
            "it was not written by `synthdistill distill`, train the student again."
        )
    teacher = load_teacher(config.teacher, config.teacher_pretrained, device=device)
    if teacher.embed_dim != config.embed_dim:
        raise SynthdistillError(
            f"The student embeds to {config.embed_dim} dimensions but its teacher '{teacher.identity}' to "
            f"{teacher.embed_dim}; the student folder does not belong to this teacher."
        )
    head = teacher.build_zero_shot_head(domain.classnames, domain.templates)
    classifier = ZeroShotClassifier(student, head, config.preprocessing).eval()
    pre = config.preprocessing
    info = ModelInfo(
        classnames=tuple(domain.classnames),
        image_size=pre.image_size,
        mean=tuple(pre.mean),
        std=tuple(pre.std),
        interpolation=pre.interpolation,
        resize_mode=pre.resize_mode,
        domain=domain.name,
        teacher=teacher.identity,
        student=config.timm_name,
        embed_dim=config.embed_dim,
    )
    return classifier, teacher, info


@dataclass
class LatencyRow:
    """Median CPU time of one forward pass of an image encoder at one batch size."""

    model: str
    batch_size: int
    milliseconds: float

    @property
    def images_per_second(self) -> float:
        return 1000.0 * self.batch_size / self.milliseconds


@dataclass
class ExportSummary:
    """What the export wrote and measured (the pipeline records it in the manifest)."""

    out_dir: Path
    files: dict[str, Path]
    num_classes: int
    student_parameters: int
    teacher_parameters: int
    student_flops: int
    teacher_flops: int
    max_difference: dict[str, float] = field(default_factory=dict)
    latency: list[LatencyRow] = field(default_factory=list)
    machine: str | None = None

    def to_dict(self) -> dict:
        return {
            "out_dir": str(self.out_dir),
            "files": {name: str(path) for name, path in self.files.items()},
            "num_classes": self.num_classes,
            "student_parameters": self.student_parameters,
            "teacher_parameters": self.teacher_parameters,
            "student_flops": self.student_flops,
            "teacher_flops": self.teacher_flops,
            "max_difference": self.max_difference,
            "latency_ms": {
                f"{row.model}@{row.batch_size}": round(row.milliseconds, 3) for row in self.latency
            },
            "machine": self.machine,
        }


def _check_config(config: ExportConfig) -> None:
    unknown = sorted(set(config.formats) - set(FORMATS))
    if unknown or not config.formats:
        raise SynthdistillError(
            f"Export formats {unknown or '[]'} are not known; use any of {', '.join(FORMATS)}."
        )
    if config.opset < MIN_OPSET:
        raise SynthdistillError(
            f"export.opset {config.opset} is too old: torch's ONNX exporter writes opset {MIN_OPSET} "
            "and newer; set export.opset to 18 or more."
        )
    if config.atol < 0 or config.bench_repeats < 1:
        raise SynthdistillError("export.atol must be >= 0 and export.bench_repeats >= 1.")


def _random_images(batch_size: int, size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch_size, 3, size, size, generator=generator)


def _verify(
    classifier: ZeroShotClassifier,
    run_exported: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    what: str,
    atol: float,
) -> float:
    """Largest difference between the exported model and PyTorch on random batches of 1 and 3 images.

    Logits are compared on the cosine scale (divided by 100), so one tolerance fits both outputs.
    """
    size = int(classifier.student.config.preprocessing.image_size)
    worst = 0.0
    for batch_size in (1, 3):
        images = _random_images(batch_size, size, _VERIFY_SEED + batch_size)
        with torch.inference_mode():
            expected = classifier(images)
        got = run_exported(images)
        for name, want, have in zip(("logits", "embedding"), expected, got, strict=True):
            if tuple(have.shape) != tuple(want.shape):
                raise SynthdistillError(
                    f"The exported {what} model returns {name} of shape {tuple(have.shape)} for a batch of "
                    f"{batch_size}, PyTorch {tuple(want.shape)}; it was not written."
                )
            scale = LOGIT_SCALE if name == "logits" else 1.0
            difference = float(((have.float() - want) / scale).abs().max())
            worst = max(worst, difference if difference == difference else float("inf"))
    if worst > atol:
        raise SynthdistillError(
            f"The exported {what} model differs from PyTorch by {worst:.2e} "
            f"(more than export.atol={atol:g}); it was not written."
        )
    return worst


def export_onnx(classifier: ZeroShotClassifier, info: ModelInfo, path: Path, config: ExportConfig) -> float:
    """Write ``path`` (opset ``config.opset``, dynamic batch, metadata); returns the verified difference."""
    onnx, ort = require_export_extra()
    size = info.image_size
    with atomic_path(path) as tmp:
        try:
            torch.onnx.export(
                classifier,
                (_random_images(2, size, _VERIFY_SEED),),
                str(tmp),
                input_names=["images"],
                output_names=["logits", "embedding"],
                opset_version=config.opset,
                dynamo=True,
                external_data=False,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                verbose=False,
            )
        except torch.onnx.errors.OnnxExporterError as e:
            raise SynthdistillError(
                f"torch.onnx cannot export student '{info.student}' ({str(e).splitlines()[0]}); "
                "export it with --format torchscript or open_clip instead."
            ) from None
        model = onnx.load(str(tmp))
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        if opset != config.opset:
            raise SynthdistillError(
                f"torch.onnx wrote opset {opset} instead of export.opset={config.opset}; "
                f"set export.opset={opset}."
            )
        for key, value in info.to_metadata().items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        model.doc_string = f"synthdistill zero-shot classifier: {info.student} distilled from {info.teacher}"
        onnx.save(model, str(tmp))
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])

        def run(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits, embedding = session.run(["logits", "embedding"], {"images": images.numpy()})
            return torch.from_numpy(logits), torch.from_numpy(embedding)

        return _verify(classifier, run, "ONNX", config.atol)


def export_torchscript(
    classifier: ZeroShotClassifier, info: ModelInfo, path: Path, config: ExportConfig
) -> float:
    """Write a traced TorchScript module with the ModelInfo as the extra file ``synthdistill.json``.

    PyTorch deprecates TorchScript (its warnings are silenced here, as are tracer warnings about
    shape-dependent branches: the input size is fixed and the result is verified at two batch sizes);
    the format stays for runtimes that still load it, such as LibTorch in C++.
    """
    with atomic_path(path) as tmp:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=FutureWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # shapes are fixed; verified
            traced = torch.jit.trace(classifier, _random_images(2, info.image_size, _VERIFY_SEED))
            torch.jit.save(traced, str(tmp), _extra_files={TORCHSCRIPT_INFO: json.dumps(info.to_json())})
            loaded = torch.jit.load(str(tmp))

        def run(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.inference_mode():
                return loaded(images)

        return _verify(classifier, run, "TorchScript", config.atol)


def open_clip_model_config(student: Student, teacher: Teacher) -> dict:
    """An open_clip model config: the teacher's (text tower, embed_dim, ...), the student as timm tower."""
    import open_clip

    name = register_tiny_clip_config() if is_tiny(teacher.name) else teacher.name
    teacher_config = open_clip.get_model_config(name)
    if teacher_config is None:
        raise SynthdistillError(
            f"open_clip has no model config for the teacher '{teacher.name}', so its text tower cannot be "
            "rebuilt; export onnx or torchscript instead."
        )
    config = student.config
    vision_cfg = {
        "timm_model_name": config.timm_name,
        "timm_model_pretrained": False,
        "timm_pool": "avg",
        "timm_proj": config.head,
        "timm_proj_bias": config.head_bias,
        "image_size": config.preprocessing.image_size,
    }
    return {**teacher_config, "embed_dim": config.embed_dim, "vision_cfg": vision_cfg}


def open_clip_model_name(student: Student, teacher: Teacher) -> str:
    return f"synthdistill-{student.config.timm_name}-{teacher.name}".replace("/", "-")


def export_open_clip(
    classifier: ZeroShotClassifier, teacher: Teacher, folder: Path, config: ExportConfig
) -> float:
    """Write ``folder`` with ``<name>.json`` (for ``open_clip.add_model_config``), ``open_clip_config.json``
    (model and preprocessing, for ``local-dir:``/``hf-hub:``) and ``open_clip_model.safetensors``.

    Returns the largest difference of its image embeddings from the student's and of its text
    embeddings from the teacher's, measured after loading it back through open_clip's factory.
    """
    import open_clip
    from safetensors.torch import save_file

    student = classifier.student
    model_config = open_clip_model_config(student, teacher)
    name = open_clip_model_name(student, teacher)
    pre = student.config.preprocessing
    state = {f"visual.{k}": v for k, v in student.state_dict().items()}
    state.update({k: v for k, v in teacher.model.state_dict().items() if not k.startswith("visual.")})
    tmp = temporary_name(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / OPEN_CLIP_WEIGHTS))
        atomic_write_json(tmp / f"{name}.json", model_config)
        preprocess_cfg = {
            "mean": list(pre.mean),
            "std": list(pre.std),
            "interpolation": pre.interpolation,
            "resize_mode": pre.resize_mode,
        }
        atomic_write_json(
            tmp / OPEN_CLIP_CONFIG, {"model_cfg": model_config, "preprocess_cfg": preprocess_cfg}
        )
        try:
            clip, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp}")
        except RuntimeError as e:
            raise SynthdistillError(
                f"open_clip's timm tower for '{student.config.timm_name}' does not match the student's "
                f"layers ({str(e).splitlines()[0][:200]}); export onnx or torchscript instead."
            ) from None
        clip.eval()
        difference = _verify_open_clip(clip, classifier, teacher)
        if difference > config.atol:
            raise SynthdistillError(
                f"The open_clip export differs from the student/teacher by {difference:.2e} "
                f"(more than export.atol={config.atol:g}); it was not written."
            )
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return difference


def _verify_open_clip(clip: nn.Module, classifier: ZeroShotClassifier, teacher: Teacher) -> float:
    size = int(classifier.student.config.preprocessing.image_size)
    images = (_random_images(3, size, _VERIFY_SEED) - classifier.mean) / classifier.std
    texts = ["a photo of a cat.", "a photo of a dog.", "a diagram."]
    tokens = teacher.tokenizer(texts)
    with torch.inference_mode():
        image_difference = (
            (clip.encode_image(images, normalize=True) - classifier.student(images)).abs().max()
        )
        text_difference = (
            (clip.encode_text(tokens, normalize=True) - teacher.encode_texts(texts).cpu()).abs().max()
        )
    return float(max(image_difference, text_difference))


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> int:
    """FLOPs of one call, counted by PyTorch's own FlopCounterMode (a multiply-add counts 2).

    Two gaps of the counter on CPU are closed: nn.MultiheadAttention's fused inference path (no
    formula: open_clip's attention would count as zero) is switched off while counting, and CPU
    flash attention gets the formula the GPU kernels have.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(
        display=False,
        custom_mapping={torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops},
    )
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.inference_mode(), counter:
            fn(images)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return int(counter.get_total_flops())


def measure_latency(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, repeats: int) -> float:
    """Median wall time of ``fn(images)`` in milliseconds, after one warm-up call."""
    times = []
    with torch.inference_mode():
        fn(images)
        for _ in range(repeats):
            start = time.perf_counter()
            fn(images)
            times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def benchmark_latency(
    encoders: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]], repeats: int
) -> list[LatencyRow]:
    """Each named (encoder, input size) timed on random images at every batch size of LATENCY_BATCHES."""
    return [
        LatencyRow(name, batch_size, measure_latency(encoder, _random_images(batch_size, size, 0), repeats))
        for name, (encoder, size) in encoders.items()
        for batch_size in LATENCY_BATCHES
    ]


def describe_machine() -> str:
    """CPU model, cores and PyTorch threads: what the latency numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{cpu} ({platform.machine()}), {os.cpu_count()} logical CPUs, {platform.system()} "
        f"{platform.release()}, torch {torch.__version__} with {torch.get_num_threads()} threads"
    )


def _evaluation_rows(data: object) -> tuple[list[str], list[tuple[str, dict[str, float]]]]:
    """Metric rows from an evaluation results file, whatever its nesting: every mapping that holds
    numeric metrics (directly or under 'metrics') becomes a row labelled by its path and name fields."""
    known = ("headline", "top1", "top5", "mean_per_class_recall", "accuracy", "agreement")
    rows: list[tuple[str, dict[str, float]]] = []

    def numeric(mapping: dict) -> dict[str, float]:
        return {
            k: float(v)
            for k, v in mapping.items()
            if isinstance(v, int | float)
            and not isinstance(v, bool)
            and any(word in k for word in ("headline", "top", "acc", "recall", "agreement"))
        }

    def walk(node: object, labels: list[str]) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item, labels)
        elif isinstance(node, dict):
            own = [str(node[k]) for k in ("dataset", "model", "name") if isinstance(node.get(k), str)]
            metrics = numeric(node.get("metrics", {})) if isinstance(node.get("metrics"), dict) else {}
            metrics.update(numeric(node))
            if metrics:
                rows.append((" / ".join(labels + own), metrics))
            for key, value in node.items():
                if key != "metrics" and isinstance(value, dict | list):
                    walk(value, labels + own + ([key] if isinstance(value, dict) else []))

    walk(data, [])
    seen = {k for _, metrics in rows for k in metrics}
    columns = [k for k in known if k in seen] + sorted(seen - set(known))
    return columns, rows


def render_model_card(
    info: ModelInfo,
    summary: ExportSummary,
    teacher_image_size: int,
    open_clip_name: str | None,
    eval_results: tuple[str, object] | None,
) -> str:
    """MODEL_CARD.md: what the model is, how it scores and what it costs next to its teacher.

    ``eval_results`` is (file name, parsed JSON) of the evaluation stage's results, if any.
    """
    lines = [
        f"# {info.student} distilled from {info.teacher}: zero-shot classifier for {info.domain}",
        "",
        f"Exported by synthdistill {info.synthdistill_version} (export format {info.format_version}).",
        "",
        "## Model",
        "",
        f"- Teacher: `{info.teacher}` (open_clip); its text tower built the zero-shot head.",
        f"- Student: timm `{info.student}` + projection to {info.embed_dim} dimensions.",
        f"- Input: RGB in [0, 1] at {info.image_size}x{info.image_size} px ({info.resize_mode} side "
        f"resize, {info.interpolation}, centre crop); mean {list(info.mean)} and std {list(info.std)} "
        "applied inside.",
        f"- Output: `logits` = {LOGIT_SCALE:g} x cosine to each class (softmax gives probabilities), "
        "`embedding` (L2-normalised).",
        f"- Classes ({len(info.classnames)}): {', '.join(info.classnames)}",
        "",
        "## Files",
        "",
    ]
    usage = {
        "onnx": f"`{ONNX_NAME}` + `{LABELS_NAME}`: `synthdistill predict --model {ONNX_NAME} photo.jpg` "
        "or onnxruntime directly",
        "torchscript": f"`{TORCHSCRIPT_NAME}`: `torch.jit.load(...)`; class names in its extra file "
        f"`{TORCHSCRIPT_INFO}`",
        "open_clip": f"`{OPEN_CLIP_DIR}/`: "
        f"`open_clip.create_model_and_transforms('local-dir:{OPEN_CLIP_DIR}')`, "
        f"or `open_clip.add_model_config('{OPEN_CLIP_DIR}/{open_clip_name}.json')` then "
        f"`create_model_and_transforms('{open_clip_name}', pretrained='{OPEN_CLIP_DIR}/{OPEN_CLIP_WEIGHTS}', "
        f"image_mean={tuple(info.mean)}, image_std={tuple(info.std)})`",
    }
    lines += [f"- {usage[name]}" for name in summary.files if name in usage]
    lines += ["", "## Evaluation", ""]
    if eval_results is None:
        lines.append("No evaluation results were given (run `synthdistill evaluate`).")
    else:
        source, data = eval_results
        columns, rows = _evaluation_rows(data)
        if rows:
            lines.append(f"Zero-shot results from `{source}`:")
            lines += ["", "| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
            for label, metrics in rows:
                cells = [f"{metrics[c]:.4g}" if c in metrics else "" for c in columns]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
        else:
            lines.append(f"`{source}` holds no metrics.")
    lines += [
        "",
        "## Size and compute",
        "",
        "FLOPs per image counted by `torch.utils.flop_counter.FlopCounterMode` (a multiply-add is 2 FLOPs).",
        "",
        "| image encoder | parameters | input | GFLOPs per image |",
        "|---|---|---|---|",
        f"| student `{info.student}` | {summary.student_parameters:,} | {info.image_size} px | "
        f"{summary.student_flops / 1e9:.4g} |",
        f"| teacher `{info.teacher}` | {summary.teacher_parameters:,} | {teacher_image_size} px | "
        f"{summary.teacher_flops / 1e9:.4g} |",
        "",
        f"The student has {summary.student_parameters / summary.teacher_parameters:.1%} of the teacher image "
        f"encoder's parameters and needs {summary.student_flops / summary.teacher_flops:.1%} of its FLOPs.",
        "",
        "## Latency",
        "",
    ]
    if summary.latency:
        by_key = {(row.model, row.batch_size): row for row in summary.latency}
        lines += [
            f"PyTorch eager, fp32, CPU, median of the timed runs; measured on {summary.machine}.",
            "",
            "| image encoder | " + " | ".join(f"batch {b}: ms (images/s)" for b in LATENCY_BATCHES) + " |",
            "|---" * (len(LATENCY_BATCHES) + 1) + "|",
        ]
        for model in ("student", "teacher"):
            cells = [
                f"{by_key[model, b].milliseconds:.2f} ({by_key[model, b].images_per_second:.1f})"
                for b in LATENCY_BATCHES
            ]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        speedups = [
            by_key["teacher", b].milliseconds / by_key["student", b].milliseconds for b in LATENCY_BATCHES
        ]
        lines += [
            "",
            "Student speed-up over the teacher: "
            + ", ".join(f"{s:.2f}x at batch {b}" for s, b in zip(speedups, LATENCY_BATCHES, strict=True))
            + ".",
        ]
    else:
        lines.append("Not measured (export.bench is off).")
    verified = ", ".join(f"{name} {difference:.1e}" for name, difference in summary.max_difference.items())
    lines += ["", "## Verification", "", f"Largest difference from PyTorch at export: {verified}.", ""]
    return "\n".join(lines)


def _read_eval_results(path: Path | None) -> tuple[str, object] | None:
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise SynthdistillError(
            f"Evaluation results '{path}' do not exist; run `synthdistill evaluate` or leave them out."
        )
    try:
        return path.name, read_json(path)
    except ValueError:
        raise SynthdistillError(f"Evaluation results '{path}' are not valid JSON.") from None


def export_student(
    student_dir: Path,
    domain: Domain,
    out_dir: Path,
    config: ExportConfig,
    *,
    eval_results: Path | None = None,
    device: str = "cpu",
) -> ExportSummary:
    """Export a student folder as a zero-shot classifier over ``domain`` into ``out_dir``.

    Writes the formats in ``config.formats`` (each verified against PyTorch, within ``config.atol``),
    ``labels.json`` and ``MODEL_CARD.md``. ``device`` only serves the teacher's text embeddings for
    the head; exports, FLOP counts and latency run on the CPU.
    """
    from tqdm import tqdm

    from synthdistill.runtime import resolve_device

    _check_config(config)
    evaluation = _read_eval_results(eval_results)
    out_dir = Path(out_dir)
    classifier, teacher, info = build_classifier(Path(student_dir), domain, resolve_device(device))
    teacher.model.cpu()
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    differences: dict[str, float] = {}
    open_clip_name = None
    formats = list(dict.fromkeys(config.formats))
    with tqdm(total=len(formats) + 1, desc="export", unit="step", disable=None) as progress:
        for name in formats:
            progress.set_postfix_str(name)
            if name == "onnx":
                files[name] = out_dir / ONNX_NAME
                differences[name] = export_onnx(classifier, info, files[name], config)
            elif name == "torchscript":
                files[name] = out_dir / TORCHSCRIPT_NAME
                differences[name] = export_torchscript(classifier, info, files[name], config)
            else:
                files[name] = out_dir / OPEN_CLIP_DIR
                differences[name] = export_open_clip(classifier, teacher, files[name], config)
                open_clip_name = open_clip_model_name(classifier.student, teacher)
            log.info("exported %s to %s (max difference %.1e)", name, files[name], differences[name])
            progress.update()
        atomic_write_json(out_dir / LABELS_NAME, info.to_json())
        progress.set_postfix_str("FLOPs and CPU latency" if config.bench else "FLOPs")

        student_encoder, teacher_encoder = classifier.student, teacher.model.encode_image
        teacher_size = teacher.preprocessing.image_size
        summary = ExportSummary(
            out_dir=out_dir,
            files=files,
            num_classes=domain.num_classes,
            student_parameters=sum(p.numel() for p in student_encoder.parameters()),
            teacher_parameters=sum(p.numel() for p in teacher.model.visual.parameters()),
            student_flops=count_flops(student_encoder, torch.zeros(1, 3, info.image_size, info.image_size)),
            teacher_flops=count_flops(teacher_encoder, torch.zeros(1, 3, teacher_size, teacher_size)),
            max_difference=differences,
        )
        if config.bench:
            encoders = {
                "student": (student_encoder, info.image_size),
                "teacher": (teacher_encoder, teacher_size),
            }
            summary.latency = benchmark_latency(encoders, config.bench_repeats)
            summary.machine = describe_machine()
        progress.update()
    card = render_model_card(info, summary, teacher_size, open_clip_name, evaluation)
    atomic_write_text(out_dir / CARD_NAME, card)
    files.update(labels=out_dir / LABELS_NAME, model_card=out_dir / CARD_NAME)
    return summary
