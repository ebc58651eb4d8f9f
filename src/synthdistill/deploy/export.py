"""Stage 5, export: the student plus its zero-shot head as one deployable classifier.

Formats: ONNX (float RGB in [0, 1] in, normalisation inside, logits and embedding out) in fp32 and,
on request, fp16 (for GPU runtimes) and int8 (static QDQ quantization calibrated on the run's own
synthetic images); TorchScript; and an open_clip model whose image tower is the student and whose
text tower is the teacher's. Every fp32 file is checked against PyTorch before it is renamed into
place; an fp16 or int8 form is checked against the fp32 model instead, by top-1 agreement on
held-out synthetic images, and is not written below ``export.min_agreement``. The model card
records what the student costs next to the teacher's image tower, both measured in ONNX Runtime.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from synthdistill.config import ExportConfig
from synthdistill.deploy.forms import (
    FormResult,
    export_form,
    read_sample_images,
    save_with_metadata,
    test_set_images,
)
from synthdistill.deploy.latency import (
    LATENCY_BATCHES,
    WARMUP_RUNS,
    LatencyRow,
    count_flops,
    describe_machine,
    latency_providers,
    measure_onnx_latency,
    onnx_session,
    usable_cpus,
)
from synthdistill.deploy.predict import (
    LABELS_NAME,
    LOGIT_SCALE,
    ONNX_NAME,
    PRECISIONS,
    ModelInfo,
    onnx_name,
    require_export_extra,
)
from synthdistill.deploy.zero_shot import ZeroShotClassifier, classifier_for_domain, run_head_cache
from synthdistill.errors import SynthdistillError
from synthdistill.evaluate import Entry, EvaluationResults
from synthdistill.evaluate.test_sets import TestSet
from synthdistill.fileio import (
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    make_readable,
    read_json,
    temporary_name,
)
from synthdistill.identity import teacher_tower_identity
from synthdistill.registry import Domain
from synthdistill.shards import list_shards
from synthdistill.student import Student
from synthdistill.teacher import Teacher
from synthdistill.tiny import is_tiny, register_tiny_clip_config

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript", "open_clip")
TORCHSCRIPT_NAME = "model.torchscript.pt"
TORCHSCRIPT_INFO = "synthdistill.json"
OPEN_CLIP_DIR = "open_clip"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"
CARD_NAME = "MODEL_CARD.md"
TEACHER_TOWER = "teacher-image-tower"
MIN_OPSET = 18
_VERIFY_SEED = 0


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
    forms: list[FormResult] = field(default_factory=list)
    latency: list[LatencyRow] = field(default_factory=list)
    machine: str | None = None
    bench_seconds: float = 0.0
    bench_min_runs: int = 0

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
            "forms": {form.precision: form.to_dict() for form in self.forms},
            "latency_ms": {
                f"{row.model} {row.precision} {row.provider.removesuffix('ExecutionProvider')} "
                f"batch {row.batch_size}": round(row.milliseconds, 3)
                for row in self.latency
            },
            "machine": self.machine,
        }


def _check_config(config: ExportConfig) -> None:
    """What validate() checks for recipes, for callers that build an ExportConfig themselves."""
    unknown = sorted(set(config.formats) - set(FORMATS))
    if unknown or not config.formats:
        raise SynthdistillError(
            f"Export formats {unknown or '[]'} are not known; use any of {', '.join(FORMATS)}."
        )
    unknown = sorted(set(config.precision) - set(PRECISIONS))
    if unknown or not config.precision:
        raise SynthdistillError(
            f"Export precisions {unknown or '[]'} are not known; use any of {', '.join(PRECISIONS)}."
        )
    if set(config.precision) != {"fp32"} and "onnx" not in config.formats:
        raise SynthdistillError(
            f"export.precision {config.precision} names ONNX forms; add onnx to export.formats."
        )
    if config.opset < MIN_OPSET:
        raise SynthdistillError(
            f"export.opset {config.opset} is too old: torch's ONNX exporter writes opset {MIN_OPSET} "
            "and newer; set export.opset to 18 or more."
        )
    if config.atol < 0 or config.bench_repeats < 1 or config.bench_seconds <= 0:
        raise SynthdistillError("export.atol must be >= 0, export.bench_repeats >= 1 and bench_seconds > 0.")
    if not 0 < config.min_agreement <= 1:
        raise SynthdistillError(f"export.min_agreement must be in (0, 1]; got {config.min_agreement}.")


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


def write_onnx(
    module: nn.Module,
    path: Path,
    image_size: int,
    opset: int,
    output_names: list[str],
    what: str,
    dynamo: bool = True,
):
    """torch.onnx export of ``module`` to ``path``: input ``images`` (N, 3, S, S), dynamic batch,
    exactly ``opset``; returns the loaded onnx.ModelProto. ``dynamo=False`` takes torch's older
    TorchScript-based exporter (ten times faster, deprecated; only the student benchmark's --quick)."""
    onnx, _ = require_export_extra()
    if dynamo:
        options = {
            "dynamo": True,
            "external_data": False,
            "dynamic_shapes": ({0: torch.export.Dim("batch")},),
        }
    else:
        options = {"dynamo": False, "dynamic_axes": {"images": {0: "batch"}}}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(fastpath and dynamo)  # the older exporter has no fused attention
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                module,
                (_random_images(2, image_size, _VERIFY_SEED),),
                str(path),
                input_names=["images"],
                output_names=output_names,
                opset_version=opset,
                verbose=False,
                **options,
            )
    except torch.onnx.errors.OnnxExporterError as e:
        raise SynthdistillError(
            f"torch.onnx cannot export {what} ({str(e).splitlines()[0]}); "
            "export it with --format torchscript or open_clip instead."
        ) from None
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    model = onnx.load(str(path))
    written = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if written != opset:
        raise SynthdistillError(
            f"torch.onnx wrote opset {written} instead of export.opset={opset}; set export.opset={written}."
        )
    return model


def export_onnx(classifier: ZeroShotClassifier, info: ModelInfo, path: Path, config: ExportConfig) -> float:
    """Write ``path`` (opset ``config.opset``, dynamic batch, metadata); returns the verified difference."""
    with atomic_path(path) as tmp:
        model = write_onnx(
            classifier,
            tmp,
            info.image_size,
            config.opset,
            ["logits", "embedding"],
            f"student '{info.student}'",
        )
        save_with_metadata(model, tmp, info)
        session = onnx_session(tmp)

        def run(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits, embedding = session.run(["logits", "embedding"], {"images": images.numpy()})
            return torch.from_numpy(logits), torch.from_numpy(embedding)

        return _verify(classifier, run, "ONNX", config.atol)


class TeacherImageTower(nn.Module):
    """(B, 3, S, S) RGB in [0, 1] -> (B, D) L2-normalised: the teacher's image encoder, as the student."""

    def __init__(self, teacher: Teacher):
        super().__init__()
        pre = teacher.preprocessing
        self.visual = teacher.model.visual
        self.register_buffer("mean", torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual((images - self.mean) / self.std), dim=-1)


def teacher_tower_onnx(teacher: Teacher, cache_dir: Path, opset: int, atol: float) -> Path:
    """The teacher's image tower as fp32 ONNX, exported once per teacher (its weights' identity) and
    opset into ``cache_dir`` and reused by every later export; verified against PyTorch."""
    key = teacher_tower_identity(teacher.name, teacher.pretrained, opset)
    path = Path(cache_dir) / f"{TEACHER_TOWER}-{key}.onnx"
    if path.is_file():
        return path
    tower = TeacherImageTower(teacher).eval()
    size = teacher.preprocessing.image_size
    with atomic_path(path) as tmp:
        write_onnx(tower, tmp, size, opset, ["embedding"], f"the teacher's image tower '{teacher.identity}'")
        images = _random_images(2, size, _VERIFY_SEED)
        (got,) = onnx_session(tmp).run(["embedding"], {"images": images.numpy()})
        with torch.inference_mode():
            difference = float((torch.from_numpy(got) - tower(images)).abs().max())
        if not difference <= atol:
            raise SynthdistillError(
                f"The teacher's image tower exported to ONNX differs from PyTorch by {difference:.2e} "
                f"(more than export.atol={atol:g}); run with --no-bench to skip the latency comparison."
            )
    return path


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


def read_evaluation(path: Path) -> EvaluationResults:
    """evaluate's results.json as its own type (unknown keys of newer versions are ignored)."""
    path = Path(path)
    if not path.is_file():
        raise SynthdistillError(
            f"Evaluation results '{path}' do not exist; run `synthdistill evaluate` or leave them out."
        )
    try:
        data = read_json(path)
    except ValueError:
        raise SynthdistillError(f"Evaluation results '{path}' are not valid JSON.") from None
    entry_keys = {f.name for f in dataclasses.fields(Entry)}
    result_keys = {f.name for f in dataclasses.fields(EvaluationResults)} - {"entries"}
    try:
        entries = [Entry(**{k: v for k, v in e.items() if k in entry_keys}) for e in data["entries"]]
        return EvaluationResults(**{k: v for k, v in data.items() if k in result_keys}, entries=entries)
    except (KeyError, TypeError, AttributeError):
        raise SynthdistillError(
            f"'{path}' is not a results.json written by `synthdistill evaluate`; "
            "evaluate again or leave it out."
        ) from None


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def _evaluation_lines(evaluation: EvaluationResults | None, source: str | None) -> list[str]:
    if evaluation is None:
        return ["No evaluation results were given (run `synthdistill evaluate`)."]
    if not evaluation.entries:
        return [f"`{source}` holds no results. {evaluation.note}".strip()]
    lines = [
        f"Zero-shot results from `{source}` ({evaluation.precision} on {evaluation.device}), in percent:",
        "",
        "| dataset | model | images | top-1 | top-5 | mean per-class recall | headline "
        "| agreement with teacher |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for e in evaluation.entries:
        lines.append(
            f"| {e.dataset} | {e.model} | {e.n_images} | {_percent(e.top1)} | {_percent(e.top5)} "
            f"| {_percent(e.mean_per_class_recall)} | {_percent(e.headline)} "
            f"| {_percent(e.agreement_with_teacher)} |"
        )
    return lines


def _latency_lines(info: ModelInfo, summary: ExportSummary, teacher: str) -> list[str]:
    """One table per execution provider: every form of the student and the teacher's image tower."""
    if not summary.latency:
        return []
    agreement = {form.precision: form for form in summary.forms if form.written}
    lines: list[str] = []
    for provider in dict.fromkeys(row.provider for row in summary.latency):
        rows = {(r.model, r.precision, r.batch_size): r for r in summary.latency if r.provider == provider}
        threads = next(r.threads for r in rows.values())
        lines += [
            f"ONNX Runtime, {provider}, {threads} intra-op threads (1 inter-op), on {summary.machine}. "
            f"Each figure: the median over a {summary.bench_seconds:g} s budget (at least "
            f"{summary.bench_min_runs} timed runs, after {WARMUP_RUNS} warm-up runs), interquartile range "
            "and number of runs in brackets; random input at each model's own size.",
            "",
            "| image encoder | precision | "
            + " | ".join(f"batch {b}: ms [IQR, runs] | batch {b}: images/s" for b in LATENCY_BATCHES)
            + " | speed-up over the teacher | top-1 agreement with fp32 |",
            "|---|---" + "|---:|---:" * len(LATENCY_BATCHES) + "|---:|---:|",
        ]
        for model, precision in dict.fromkeys((m, p) for m, p, _ in rows):
            cells = []
            for b in LATENCY_BATCHES:
                t = rows[model, precision, b].timing
                cells += [
                    f"{t.median_ms:.2f} [{t.q1_ms:.2f}-{t.q3_ms:.2f}, {t.runs}]",
                    f"{rows[model, precision, b].images_per_second:.1f}",
                ]
            speedup = " / ".join(
                f"{rows['teacher', 'fp32', b].milliseconds / rows[model, precision, b].milliseconds:.2f}x"
                for b in LATENCY_BATCHES
            )
            name = f"student `{info.student}`" if model == "student" else f"teacher `{teacher}`"
            form = agreement.get(precision) if model == "student" else None
            agrees = _agreement_cell(form) if form else ""
            if model == "student" and precision == "fp32":
                agrees = "reference"
            lines.append(f"| {name} | {precision} | " + " | ".join(cells) + f" | {speedup} | {agrees} |")
        fp32 = [
            rows["teacher", "fp32", b].milliseconds / rows["student", "fp32", b].milliseconds
            for b in LATENCY_BATCHES
        ]
        lines += [
            "",
            f"fp32 student speed-up over the teacher's image tower on {provider}: "
            + ", ".join(f"{s:.2f}x at batch {b}" for s, b in zip(fp32, LATENCY_BATCHES, strict=True))
            + ".",
            "",
        ]
    return lines[:-1]


def _agreement_cell(form: FormResult) -> str:
    """'99.2% (500 images)', then the agreement on each real test set it was checked on."""
    tests = "".join(f"; {t.test_set}: {t.agreement:.1%} ({t.images})" for t in form.test_agreements)
    return f"{form.agreement:.1%} ({form.held_out_images} images){tests}"


def _forms_lines(summary: ExportSummary) -> list[str]:
    lines = []
    fp32 = summary.max_difference.get("onnx")
    if "onnx" in summary.files:
        lines.append(
            f"- fp32 `{ONNX_NAME}`: the reference, verified against PyTorch (max difference {fp32:.1e})."
        )
    for form in summary.forms:
        how = (
            f"static QDQ quantization (per-channel int8 weights, uint8 activations) calibrated on "
            f"{form.calibration_images} synthetic images; "
            if form.precision == "int8"
            else "fp16 weights and arithmetic, fp32 input and outputs (for GPU runtimes); "
        )
        if form.written:
            on_tests = "".join(
                f", {t.agreement:.1%} on {t.images} images of the {t.test_set} test set"
                for t in form.test_agreements
            )
            lines.append(
                f"- {form.precision} `{form.path.name}`: {how}top-1 agreement with fp32 "
                f"{form.agreement:.1%} on {form.held_out_images} held-out synthetic images{on_tests} "
                f"(threshold {form.min_agreement:.0%})."
            )
        else:
            lines.append(f"- {form.precision}: {form.refusal()}")
    return lines


ONNX_SNIPPET = """\
import json

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

labels = json.load(open("labels.json"))
size = labels["preprocessing"]["image_size"]
image = ImageOps.fit(Image.open("photo.jpg").convert("RGB"), (size, size), Image.BICUBIC)
images = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)[None] / 255  # RGB in [0, 1]
logits, embedding = ort.InferenceSession("model.onnx").run(None, {"images": images})
print(labels["classnames"][int(logits[0].argmax())])
"""
"""Classifies one image with onnxruntime alone: the card's example, run by a test."""


def training_lines(student_dir: Path) -> list[str]:
    """What the student was trained on, read from its run directory when it sits in one
    (``<run>/student``: the shards' index.json, the prompts' generator, config.yaml)."""
    import json

    run = Path(student_dir).parent
    index, prompts, recipe = run / "shards" / "index.json", run / "prompts.jsonl", run / "config.yaml"
    if not index.is_file():
        return ["Not recorded: the student folder is not in a run directory (`<run>/student`)."]
    shards = read_json(index)
    settings = shards.get("settings", {})
    lines = [
        f"- {shards.get('total', '?'):,} synthetic images (no real image) drawn by `{settings.get('model')}`"
        + (f" with LoRA `{settings['lora']}`" if settings.get("lora") else "")
        + f", {settings.get('steps')} steps, guidance {settings.get('guidance')}."
    ]
    if prompts.is_file():
        with prompts.open(encoding="utf-8") as handle:
            first = json.loads(handle.readline() or "{}")
        lines.append(f"- Prompts: the `{first.get('generator', '?')}` generator.")
    if recipe.is_file():
        lines += [
            "",
            "The recipe (`config.yaml`):",
            "",
            "```yaml",
            recipe.read_text(encoding="utf-8").rstrip(),
            "```",
        ]
    return lines


def limitation_lines(info: ModelInfo, evaluation: EvaluationResults | None) -> list[str]:
    """What the model cannot do, in plain words."""
    lines = [
        "- It knows only these classes: any image gets one of them, there is no 'none of these'.",
        f"- It copies its teacher `{info.teacher}` on synthetic images: it inherits the teacher's errors "
        "and biases and is not meant to beat it.",
        f"- It sees one {info.image_size} px centre crop: small or off-centre objects lose detail.",
    ]
    if evaluation is not None and any(e.dataset.endswith("(synthetic)") for e in evaluation.entries):
        lines.append(
            "- The evaluation above used the training run's own synthetic images (no real test set): it "
            "says how well the student copies the teacher, not how well it classifies real photos."
        )
    if "tiny" in (info.teacher, info.student) or info.student == "test_efficientnet":
        lines.append("- Built from tiny random test models: its numbers mean nothing.")
    return lines


def render_model_card(
    info: ModelInfo,
    summary: ExportSummary,
    teacher_image_size: int,
    open_clip_name: str | None,
    evaluation: EvaluationResults | None,
    evaluation_source: str | None = None,
    student_dir: Path | None = None,
) -> str:
    """MODEL_CARD.md: what the model is, what it was trained on, how it scores, what it cannot do and
    what it costs next to its teacher."""
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
        f"- Zero-shot templates ({len(info.templates)}): {' | '.join(info.templates)}",
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
    lines += [
        f"- `{form.path.name}`: the {form.precision} form; `synthdistill predict --model {form.path.name}`"
        for form in summary.forms
        if form.written
    ]
    if "onnx" in summary.files:
        lines += [
            "",
            "Classify one image with onnxruntime alone:",
            "",
            "```python",
            ONNX_SNIPPET.rstrip(),
            "```",
        ]
    if student_dir is not None:
        lines += ["", "## Training data", ""] + training_lines(student_dir)
    lines += ["", "## Evaluation", ""] + _evaluation_lines(evaluation, evaluation_source)
    lines += ["", "## Limitations", ""] + limitation_lines(info, evaluation)
    if summary.forms or "onnx" in summary.files:
        lines += ["", "## Precision forms", ""] + _forms_lines(summary)
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
        lines += _latency_lines(info, summary, info.teacher)
    elif "onnx" not in summary.files:
        lines.append("Not measured: latency is measured on the ONNX model (add onnx to export.formats).")
    else:
        lines.append("Not measured (export.bench is off).")
    verified = ", ".join(f"{name} {difference:.1e}" for name, difference in summary.max_difference.items())
    lines += ["", "## Verification", "", f"Largest difference from PyTorch at export: {verified}.", ""]
    return "\n".join(lines)


def _sample_source(config: ExportConfig, out_dir: Path) -> Path:
    """Where the fp16/int8 forms take their images: export.sample_images, else the run's shards."""
    source = Path(config.sample_images).expanduser() if config.sample_images else out_dir.parent / "shards"
    if config.sample_images is None and not list_shards(source):
        raise SynthdistillError(
            f"export.precision {config.precision} needs synthetic images to calibrate and check the "
            f"fp16/int8 forms, and '{source}' holds no shards; set export.sample_images to a shard or "
            "image folder."
        )
    if config.sample_images is not None and not (source.exists() or any(c in str(source) for c in "*?[")):
        raise SynthdistillError(
            f"export.sample_images '{source}' does not exist; name a shard or image folder."
        )
    return source


def export_student(
    student_dir: Path,
    domain: Domain,
    out_dir: Path,
    config: ExportConfig,
    *,
    eval_results: Path | None = None,
    test_sets: Sequence[TestSet] = (),
    device: str = "cpu",
) -> ExportSummary:
    """Export a student folder as a zero-shot classifier over ``domain`` into ``out_dir``.

    Writes the formats in ``config.formats`` (each verified against PyTorch, within ``config.atol``),
    the ONNX forms in ``config.precision`` (fp16/int8 each kept only if it agrees with fp32 on
    ``config.min_agreement`` of held-out synthetic images and of up to ``config.agreement_images``
    images of each of ``test_sets``, the real test sets evaluate ran on), ``labels.json`` and
    ``MODEL_CARD.md``.
    ``device`` only serves the teacher's text embeddings for the head; exports, FLOP counts and
    latency run on the CPU (latency on CUDA too when onnxruntime has it).
    """
    from synthdistill.progress import progress_bar
    from synthdistill.runtime import resolve_device

    _check_config(config)
    out_dir = Path(out_dir)
    evaluation = read_evaluation(eval_results) if eval_results is not None else None
    extra_forms = [p for p in PRECISIONS if p in config.precision and p != "fp32"]
    sample_source = _sample_source(config, out_dir) if extra_forms else None
    cache_dir = Path(config.cache_dir).expanduser() if config.cache_dir else run_head_cache(out_dir.parent)
    classifier, teacher, info = classifier_for_domain(
        Path(student_dir), domain, cache_dir, resolve_device(device)
    )
    teacher.model.cpu()
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    differences: dict[str, float] = {}
    forms: list[FormResult] = []
    open_clip_name = None
    formats = list(dict.fromkeys(config.formats))
    keep_fp32 = "fp32" in config.precision
    reference = out_dir / ONNX_NAME if keep_fp32 else temporary_name(out_dir / f"reference-{ONNX_NAME}")
    try:
        with progress_bar(len(formats) + len(extra_forms) + 1, "export", unit="step") as progress:
            for name in formats:
                progress.set_postfix_str(name)
                if name == "onnx":
                    differences[name] = export_onnx(classifier, info, reference, config)
                    if keep_fp32:
                        files[name] = reference
                elif name == "torchscript":
                    files[name] = out_dir / TORCHSCRIPT_NAME
                    differences[name] = export_torchscript(classifier, info, files[name], config)
                else:
                    files[name] = out_dir / OPEN_CLIP_DIR
                    differences[name] = export_open_clip(classifier, teacher, files[name], config)
                    open_clip_name = open_clip_model_name(classifier.student, teacher)
                log.info("exported %s (max difference from PyTorch %.1e)", name, differences[name])
                progress.update()
            if extra_forms:
                samples = read_sample_images(
                    sample_source, info, config.calibration_images, config.agreement_images
                )
                test_images = {t.name: test_set_images(t, info, config.agreement_images) for t in test_sets}
            for precision in extra_forms:
                progress.set_postfix_str(f"onnx {precision}")
                form = export_form(
                    precision,
                    reference,
                    out_dir / onnx_name(precision),
                    info,
                    samples,
                    config.min_agreement,
                    test_images,
                )
                forms.append(form)
                if form.written:
                    files[f"onnx-{precision}"] = form.path
                    log.info(
                        "exported %s (top-1 agreement with fp32 %.2f%%)", form.path, 100 * form.agreement
                    )
                else:
                    log.warning(form.refusal())
                progress.update()
            atomic_write_json(out_dir / LABELS_NAME, info.to_json())
            progress.set_postfix_str("FLOPs and ONNX Runtime latency" if config.bench else "FLOPs")
            teacher_size = teacher.preprocessing.image_size
            summary = ExportSummary(
                out_dir=out_dir,
                files=files,
                num_classes=domain.num_classes,
                student_parameters=sum(p.numel() for p in classifier.student.parameters()),
                teacher_parameters=sum(p.numel() for p in teacher.model.visual.parameters()),
                student_flops=count_flops(
                    classifier.student, torch.zeros(1, 3, info.image_size, info.image_size)
                ),
                teacher_flops=count_flops(
                    teacher.model.encode_image, torch.zeros(1, 3, teacher_size, teacher_size)
                ),
                max_difference=differences,
                forms=forms,
            )
            if config.bench and "onnx" in formats:
                summary.latency = _measure_latency(summary, reference, info, teacher, cache_dir, config)
                summary.machine = describe_machine()
                summary.bench_seconds, summary.bench_min_runs = config.bench_seconds, config.bench_repeats
            progress.update()
    finally:
        if not keep_fp32:
            reference.unlink(missing_ok=True)
    card = render_model_card(
        info,
        summary,
        teacher_size,
        open_clip_name,
        evaluation,
        eval_results.name if eval_results else None,
        Path(student_dir),
    )
    atomic_write_text(out_dir / CARD_NAME, card)
    files.update(labels=out_dir / LABELS_NAME, model_card=out_dir / CARD_NAME)
    make_readable(list(files.values()))
    return summary


def _measure_latency(
    summary: ExportSummary,
    reference: Path,
    info: ModelInfo,
    teacher: Teacher,
    cache_dir: Path,
    config: ExportConfig,
) -> list[LatencyRow]:
    """Every ONNX form of the student and the teacher's (cached) image tower, in the same runtime."""
    tower = teacher_tower_onnx(teacher, cache_dir, config.opset, config.atol)
    measured = [("student", "fp32", reference, info.image_size)]
    measured += [("student", f.precision, f.path, info.image_size) for f in summary.forms if f.written]
    measured.append(("teacher", "fp32", tower, teacher.preprocessing.image_size))
    threads = config.bench_threads or usable_cpus()
    rows = []
    for model, precision, path, size in measured:
        rows += measure_onnx_latency(
            path,
            model,
            precision,
            size,
            providers=latency_providers(),
            threads=threads,
            budget_s=config.bench_seconds,
            min_runs=config.bench_repeats,
        )
    return rows
