"""Configuration: one dataclass per stage, one recipe that holds them, YAML in and out.

A recipe is a YAML file with top-level run settings and one section per stage::

    name: pets
    dataset: pets
    prompts: {generator: template}
    distill: {student: tiny_vit_5m_224, lr: 5.0e-4}

``--set distill.lr=1e-4`` overrides any field. Unknown keys and values of the wrong type are
refused before any work starts, with the valid keys named (closest first).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from synthdistill.errors import SynthdistillError

STAGES = ("prompts", "generate", "distill", "evaluate", "export")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def option(
    default: Any,
    help: str,
    hashed: bool = True,
    choices: tuple[str, ...] | None = None,
    bounds: str | None = None,
    multiple_of: int | None = None,
    ordered_pair: bool = False,
) -> Any:
    """A dataclass field with a default and a one-line help text (shown by ``--help`` and docs).

    ``hashed=False`` marks a setting that changes how fast a stage runs but not what it produces
    (workers, logging, compilation): changing it never invalidates outputs or checkpoints (see
    :mod:`synthdistill.identity`, the one reader of this mark).
    ``choices`` lists the accepted strings; ``bounds`` is an interval such as ``"(0, inf)"``,
    ``"[0, inf)"`` or ``"[1, 100]"`` that every number (and every item of a list) must lie in;
    ``multiple_of`` asks every number to be a multiple of it; ``ordered_pair`` makes a list a range
    ``[low, high]``: two numbers, ``low <= high``. All are checked by :func:`validate` before any
    model loads.
    """
    metadata = {
        "help": help,
        "hashed": hashed,
        "choices": choices,
        "bounds": bounds,
        "multiple_of": multiple_of,
        "ordered_pair": ordered_pair,
    }
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _parse_bounds(bounds: str) -> tuple[float, float, bool, bool]:
    """'(0, 1]' -> (0.0, 1.0, low_open=True, high_open=False)."""
    match = re.fullmatch(r"\s*([\[(])\s*([^,]+?)\s*,\s*([^,]+?)\s*([\])])\s*", bounds)
    if not match:
        raise ValueError(f"bad bounds {bounds!r}")
    low_bracket, low, high, high_bracket = match.groups()
    return float(low), float(high), low_bracket == "(", high_bracket == ")"


def check_bounds(key: str, value: Any, bounds: str) -> None:
    """Refuse a number outside ``bounds`` (and NaN or infinity), naming the key and the interval."""
    low, high, low_open, high_open = _parse_bounds(bounds)
    for number in value if isinstance(value, list | tuple) else [value]:
        if number is None:
            continue
        inside = math.isfinite(number) and (number > low if low_open else number >= low)
        inside = inside and (number < high if high_open else number <= high)
        if not inside:
            raise ConfigError(f"'{key}' must be in {bounds} (finite); got {value}.")


def check_field(key: str, value: Any, metadata: Any) -> None:
    """Refuse ``value`` for the field ``key`` unless it meets what the field declares (:func:`option`)."""
    if value is None:
        return
    items = value if isinstance(value, list | tuple) else [value]
    choices = metadata.get("choices")
    if choices:
        for item in items:
            if item not in choices:
                raise ConfigError(f"'{key}' must be one of {', '.join(choices)}; got '{item}'.")
    if metadata.get("bounds"):
        check_bounds(key, value, metadata["bounds"])
    multiple = metadata.get("multiple_of")
    if multiple and any(item % multiple for item in items):
        raise ConfigError(f"'{key}' must be a multiple of {multiple}; got {value}.")
    if metadata.get("ordered_pair") and not (len(items) == 2 and items[0] <= items[1]):
        raise ConfigError(f"'{key}' must be a range [low, high] with low <= high; got {value}.")


@dataclass
class PromptsConfig:
    """Stage 1: class names become text prompts."""

    generator: str = option(
        "template",
        "'paper' (LLM superclass and options per class, PAPER.md), 'template' (the paper's templates with "
        "the registry's options, no model), 'plain' ('a photo of a <class>', no diversity) or 'llm' "
        "(ours: LLM scene sentences).",
        choices=("paper", "template", "plain", "llm"),
    )
    design: str = option(
        "allpairs",
        "Option combinations: 'allpairs' (every pair of options of two dimensions once or more; the "
        "prompt count per class is the design's size) or 'random' (per_class random combinations).",
        choices=("allpairs", "random"),
    )
    per_class: int | None = option(
        None,
        "Prompts (= images) per class with design=random or generator=plain; default: the dataset's count.",
        bounds="[1, inf)",
    )
    options_per_dimension: int | None = option(
        None,
        "Options per contextual dimension (15 -> 265 all-pairs prompts, 30 -> 1011); default: the dataset's.",
        bounds="[1, inf)",
    )
    llm: str = option(
        "meta-llama/Llama-2-7b-chat-hf", "Instruction-tuned LLM: hub id, local folder or 'tiny'."
    )
    llm_batch_size: int = option(8, "Conversations generated at once by the LLM.", bounds="[1, inf)")
    llm_max_new_tokens: int | None = option(
        None,
        "Longest LLM answer in tokens; default: 128 (paper: option lists; its superclass: 32), 256 (llm).",
        bounds="[1, inf)",
    )
    llm_temperature: float | None = option(
        None, "LLM sampling temperature (0: greedy); default: 0.7 for paper, 0 for llm.", bounds="[0, inf)"
    )
    llm_top_k: int | None = option(
        None, "Top-k sampling (0: off); default: 50 for paper, off for llm.", bounds="[0, inf)"
    )
    llm_top_p: float | None = option(None, "Top-p sampling; default: 0.95.", bounds="(0, 1]")
    llm_retries: int = option(
        5,
        "paper: how often an answer that does not parse is asked again before the registry fills in.",
        bounds="[0, inf)",
    )
    weight_whole_phrases: bool = option(
        False,
        "Ours: weight a multi-word class or option as a phrase, '(Pit Bull Terrier)++++'; false: as the "
        "authors' templates, where Compel up-weights the last word only.",
    )
    max_prompt_tokens: int = option(
        77,
        "Prompts longer than this (text-encoder tokens, weighting syntax not counted) are shortened.",
        bounds="[8, 77]",
    )


@dataclass
class GenerateConfig:
    """Stage 2: prompts become images in WebDataset shards."""

    model: str = option(
        "stabilityai/stable-diffusion-xl-base-1.0", "Diffusers model id, local folder or 'tiny'."
    )
    lora: str | None = option(
        "auto",
        "LoRA fused into the UNet: hub id, folder or .safetensors file; 'auto': the LCM-LoRA for the "
        "default SDXL model, none for any other model; null: none.",
    )
    scheduler: str = option(
        "lcm", "Scheduler: 'lcm' or 'default' (the pipeline's own).", choices=("lcm", "default")
    )
    steps: int = option(4, "Denoising steps.", bounds="[1, inf)")
    guidance: float = option(1.0, "Classifier-free guidance scale (LCM-LoRA: 1.0-2.0).", bounds="[0, inf)")
    resolution: int | None = option(
        None, "Generated image side in pixels; default: the model's.", bounds="[8, inf)", multiple_of=8
    )
    negative_prompt: str = option("", "Negative prompt (ignored at guidance <= 1).")
    store_size: int | None = option(
        256, "Short side of stored images in pixels; null keeps full size.", bounds="[1, inf)"
    )
    jpeg_quality: int = option(95, "JPEG quality of stored images.", bounds="[1, 100]")
    batch_size: int = option(
        8, "Images generated at once per GPU (each image has its own seed).", hashed=False, bounds="[1, inf)"
    )
    shard_size: int = option(1000, "Images per output shard.", bounds="[1, inf)")
    precision: str = option(
        "auto", "auto (fp16 on GPU, fp32 on CPU), fp32, fp16 or bf16.", choices=PRECISIONS
    )
    vae: str | None = option(None, "Replacement VAE (e.g. madebyollin/sdxl-vae-fp16-fix); null: the model's.")
    compile: bool = option(False, "torch.compile the UNet.", hashed=False)
    safety_checker: bool = option(False, "Keep the pipeline's safety checker (off by default).")
    prompt_weighting: str = option(
        "auto",
        "Compel prompt weighting ('cat++', '(a cat)1.2'): auto (for prompts with weighting syntax), "
        "compel (every prompt) or none (raw text).",
        choices=("auto", "compel", "none"),
    )
    filter: str = option(
        "none",
        "teacher: redraw images the filter model does not classify (zero-shot) as their class; "
        "none: keep all.",
        choices=("none", "teacher"),
    )
    filter_model: str = option("ViT-B-32", "open_clip model of the teacher filter, or 'tiny'.")
    filter_pretrained: str | None = option("openai", "Its open_clip pretrained tag or local checkpoint file.")
    filter_retries: int = option(
        3, "Redraws (each with a new recorded seed) of an image the filter rejects.", bounds="[0, inf)"
    )
    filter_keep_failed: bool = option(
        True, "Keep an image the filter still rejects after the retries (false: drop it)."
    )


@dataclass
class DistillConfig:
    """Stage 3: the teacher's image embeddings are distilled into a student."""

    teacher: str = option("ViT-B-32", "open_clip model name, or 'tiny'.")
    teacher_pretrained: str | None = option(
        "datacomp_xl_s13b_b90k", "open_clip pretrained tag or local file."
    )
    student: str = option("tiny_vit_5m_224", "timm model name, or 'tiny'.")
    student_pretrained: bool | str = option(
        False,
        "Start the student from timm's weights: true (timm's default tag), a tag of the student's "
        "architecture (dist_in22k or tiny_vit_11m_224.dist_in22k), or a local weights file.",
    )
    head: str = option(
        "linear",
        "Projection head to the teacher's embedding size: 'linear' or 'mlp'.",
        choices=("linear", "mlp"),
    )
    loss: str = option("fd", "Loss name (fd, vl, mpc, i2i) or weighted sum such as 'fd:0.5,vl:0.5'.")
    fd_variant: str = option(
        "distance",
        "Feature distillation: distance (||s - t|| of normalised embeddings, the authors'), squared "
        "(2 - 2 cos; l2 is its old name), cosine or mse (unnormalised).",
        choices=("distance", "squared", "cosine", "mse", "l2"),
    )
    learnable_temperature: bool = option(False, "vl/mpc: learn the temperature instead of the teacher's.")
    epochs: int = option(96, "Passes over the synthetic images.", bounds="[1, inf)")
    batch_size: int = option(256, "Global batch size (split across ranks).", bounds="[1, inf)")
    lr: float = option(5e-4, "AdamW learning rate.", bounds="(0, inf)")
    weight_decay: float = option(0.1, "AdamW weight decay.", bounds="[0, inf)")
    schedule: str = option(
        "constant", "Learning-rate schedule: constant or cosine.", choices=("constant", "cosine")
    )
    warmup_steps: int = option(0, "Linear warm-up steps.", bounds="[0, inf)")
    grad_clip: float | None = option(1.0, "Gradient-norm clipping; null disables.", bounds="(0, inf)")
    precision: str = option(
        "auto",
        "auto (bf16 on GPU, fp32 on CPU), fp32, bf16, or fp16 (autocast with a gradient scaler).",
        choices=PRECISIONS,
    )
    compile: bool = option(False, "torch.compile the student.", hashed=False)
    workers: int = option(4, "Data-loader worker processes per rank.", hashed=False, bounds="[0, inf)")
    aug_scale: list[float] = option(
        [0.9, 1.0],
        "RandomResizedCrop area range [low, high] (CLIP training: [0.9, 1]; the paper: [0.08, 1]).",
        bounds="(0, 1]",
        ordered_pair=True,
    )
    aug_ratio: list[float] = option(
        [0.75, 1.3333333],
        "RandomResizedCrop aspect-ratio range [low, high].",
        bounds="(0, inf)",
        ordered_pair=True,
    )
    aug_interpolation: str = option(
        "bicubic", "Resize of the crops: bicubic or bilinear (the paper).", choices=("bicubic", "bilinear")
    )
    aug_hflip: float = option(0.0, "Probability of a horizontal flip (the paper: 0.5).", bounds="[0, 1]")
    input: str = option(
        "auto",
        "How images reach the device: decoded (the shards decoded once into a uint8 store), workers "
        "(decoded by data-loader workers each epoch), or auto (decoded for the run's shards, workers for "
        "train_data). Both give the same views.",
        hashed=False,
        choices=("auto", "decoded", "workers"),
    )
    stream_decode: str = option(
        "workers",
        "train_data: where the images are decoded: workers (PIL decodes, crops and resizes in the "
        "data-loader workers) or device (the workers read only the bytes and draw the same crop boxes; "
        "the training device decodes the JPEGs in batches, nvjpeg on CUDA, and crops and resizes there). "
        "A result setting: torch's resize differs from PIL's by a grey level or two inside a crop, more "
        "along its border (PIL's filter also reads the pixels just outside the box).",
        choices=("workers", "device"),
    )
    cache_teacher: bool = option(
        True, "Embed fixed augmented views once with the teacher and replay them (not for train_data)."
    )
    cache_views: int = option(8, "Augmented views per image in the teacher cache.", bounds="[1, inf)")
    cache_dtype: str = option(
        "fp16",
        "Storage of cached teacher features: fp16 (half the disk) or fp32 (exact).",
        choices=("fp16", "fp32"),
    )
    checkpoint_every: int = option(500, "Steps between checkpoints.", hashed=False, bounds="[1, inf)")
    log_every: int = option(10, "Steps between log lines.", hashed=False, bounds="[1, inf)")
    image_size: int | None = option(None, "Student input size; default: the timm model's.", bounds="[1, inf)")
    train_data: str | None = option(
        None, "Train on other data than the run's shards: WebDataset URLs, a shard folder or imagenet:DIR."
    )
    train_num_samples: int | None = option(
        None, "Samples per epoch of train_data (all ranks together).", bounds="[1, inf)"
    )
    resampled: bool = option(False, "train_data: draw shards with replacement (epoch = train_num_samples).")
    shuffle_buffer: int = option(
        5000,
        "train_data: samples in each data-loader worker's shuffle buffer (it sets the sample order).",
        bounds="[0, inf)",
    )
    logit_scale: float | None = option(
        None,
        "vl/mpc/i2i: 1/temperature (the start value if learnable); null: the teacher's (the authors' "
        "ablation: 1.0).",
        bounds="(0, 100]",
    )
    init: str | None = option(
        None,
        "Start the student (backbone and head) from a student folder (runs/<name>/student) or a "
        "checkpoint folder (runs/<name>/checkpoints/step-N); null: random or student_pretrained.",
    )
    # validation during training, checkpoints kept, numerics and head of the paper's recipes
    validate_every: int | None = option(
        None,
        "Zero-shot top-1 of the student on the real test sets (evaluate.datasets, else the recipe's "
        "dataset) every N epochs and after the last; null: off. Logged as 'validation' records.",
        hashed=False,
        bounds="[1, inf)",
    )
    validate_protocol: str = option(
        "paper",
        "Protocol of the validation: paper (one template, shared crop, fp32, top-1: the authors') or "
        "clip_benchmark.",
        hashed=False,
        choices=("paper", "clip_benchmark"),
    )
    keep_checkpoints: str = option(
        "last",
        "last: only the newest checkpoint; all: also every epoch's end checkpoint, in checkpoints/epoch-E "
        "(the authors keep them all).",
        hashed=False,
        choices=("last", "all"),
    )
    tf32: bool = option(
        True, "On CUDA: TF32 matmuls and convolutions in fp32 (the authors'); false: full fp32 matmuls."
    )
    head_bias: bool = option(
        False,
        "A bias in the head's last linear layer (the authors'); false: open_clip's timm-tower layout.",
    )
    betas: list[float] = option(
        [0.9, 0.999], "AdamW betas [beta1, beta2], each in [0, 1) (the paper: [0.9, 0.98]).", bounds="[0, 1)"
    )
    eps: float = option(1.0e-8, "AdamW epsilon (the paper: 1e-6).", bounds="(0, inf)")


@dataclass
class EvaluateConfig:
    """Stage 4: zero-shot accuracy on real test sets, student and teacher side by side."""

    datasets: list[str] = option([], "Registry datasets to evaluate on; default: the recipe's dataset.")
    data_root: str = option("data", "Folder holding the real test sets (see README for the layout).")
    protocols: list[str] = option(
        ["clip_benchmark"],
        "Zero-shot protocols, each reported: clip_benchmark (published tables: template ensemble, each "
        "model's own preprocessing, DataComp headline) and/or paper (the authors': one template, one "
        "shared bilinear crop, fp32, top-1).",
        choices=("clip_benchmark", "paper"),
    )
    image_folder: str | None = option(None, "An ImageFolder-style test set instead of registry datasets.")
    batch_size: int = option(128, "Images per batch.", hashed=False, bounds="[1, inf)")
    workers: int = option(4, "Data-loader worker processes.", hashed=False, bounds="[0, inf)")
    download: bool = option(False, "Let torchvision download missing test sets.", hashed=False)
    precision: str = option(
        "auto",
        "auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16: autocast over CLIP_benchmark's scope in the "
        "clip_benchmark protocol (the paper protocol is always fp32); recorded in results.json.",
        hashed=False,
        choices=PRECISIONS,
    )
    with_teacher: bool = option(True, "Also evaluate the teacher on the same images.")
    max_images: int | None = option(
        None, "Evaluate at most this many images per dataset (quick checks).", bounds="[1, inf)"
    )
    head_cache: str | None = option(
        None, "Folder caching zero-shot heads; default <out>/zero_shot_heads.", hashed=False
    )


@dataclass
class ExportConfig:
    """Stage 5: the student plus its zero-shot head as one deployable model."""

    formats: list[str] = option(
        ["onnx"], "Any of onnx, torchscript, open_clip.", choices=("onnx", "torchscript", "open_clip")
    )
    opset: int = option(18, "ONNX opset (>= 18, what torch's ONNX exporter writes).", bounds="[18, inf)")
    atol: float = option(
        1e-4, "Largest allowed difference between exported and PyTorch outputs.", bounds="(0, inf)"
    )
    precision: list[str] = option(
        ["fp32"],
        "ONNX forms to write: any of fp32 (model.onnx), fp16 (model.fp16.onnx, for GPU runtimes), "
        "int8 (model.int8.onnx, static quantization calibrated on synthetic images).",
        choices=("fp32", "fp16", "int8"),
    )
    min_agreement: float = option(
        0.99,
        "An fp16/int8 form is written only if its top-1 agreement with fp32 reaches this on held-out "
        "synthetic images and on the real test sets evaluate ran on.",
        bounds="(0, 1]",
    )
    sample_images: str | None = option(
        None,
        "Images that calibrate int8 and check fp16/int8 (shard folder, image folder or glob); "
        "default <out>/../shards, the run's synthetic images.",
    )
    calibration_images: int = option(128, "Images int8 quantization is calibrated on.", bounds="[1, inf)")
    agreement_images: int = option(
        500,
        "Held-out synthetic images (not calibration ones), and images per real test set, each fp16/int8 "
        "form is checked on.",
        bounds="[1, inf)",
    )
    bench: bool = option(True, "Measure ONNX Runtime latency of the student and the teacher's image tower.")
    bench_seconds: float = option(
        2.0,
        "Time budget per latency measurement (model, precision, batch size).",
        hashed=False,
        bounds="(0, inf)",
    )
    bench_repeats: int = option(
        5,
        "At least this many timed runs per latency measurement (the median is reported).",
        hashed=False,
        bounds="[1, inf)",
    )
    bench_threads: int | None = option(
        None,
        "ONNX Runtime intra-op threads for latency; default: every CPU this process may use.",
        hashed=False,
        bounds="[1, inf)",
    )
    cache_dir: str | None = option(
        None,
        "Folder caching zero-shot heads and the teacher image tower's ONNX; "
        "default <out>/../eval/zero_shot_heads (evaluate's head cache in a run).",
        hashed=False,
    )


@dataclass
class RecipeConfig:
    """A whole run: where it lives, what domain it serves, and every stage's settings."""

    name: str = option("run", "Run name; the run lives in runs/<name> unless run_dir is set.")
    run_dir: str | None = option(None, "Run directory; default runs/<name>.")
    dataset: str | None = option("pets", "Registry dataset that names the classes (see `datasets list`).")
    classes_file: str | None = option(None, "A user class list (one per line) instead of a registry dataset.")
    superclass: str | None = option(None, "Superclass word for a user class list (e.g. 'bird').")
    seed: int = option(0, "Run seed; every image seed and data order derives from it.", bounds="[0, inf)")
    device: str = option("auto", "auto, cpu, cuda or cuda:N.")
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name


class ConfigError(SynthdistillError):
    """A recipe or override that cannot be used."""


def valid_keys(cls: type = RecipeConfig, prefix: str = "") -> list[str]:
    """Every dotted key a recipe or ``--set`` accepts."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(valid_keys(hints[f.name], f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _unknown_key(key: str, where: str) -> ConfigError:
    keys = valid_keys()
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
    rest = [k for k in keys if k not in close]
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return ConfigError(f"Unknown key '{key}' in {where}; {hint}valid keys: {', '.join(close + rest)}.")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotated type ``tp``; convert only where lossless (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"'{key}' must be a list, got {value!r}.")
        return [coerce(v, item, key) for v in value]
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}.")
        return {coerce(k, key_tp, key): coerce(v, value_tp, key) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"'{key}' must be of type {_type_name(tp)}, got {value!r}.")


def _apply_mapping(obj: Any, mapping: dict, where: str, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in mapping.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise _unknown_key(key, where)
        if dataclasses.is_dataclass(hints[name]):
            if not isinstance(value, dict):
                raise ConfigError(f"'{key}' in {where} must be a section (a mapping of keys), got {value!r}.")
            _apply_mapping(getattr(obj, name), value, where, f"{key}.")
        else:
            setattr(obj, name, coerce(value, hints[name], key))


def parse_override(text: str) -> tuple[str, Any]:
    """'distill.lr=1e-4' -> ('distill.lr', 1e-4), the value read as YAML."""
    if "=" not in text:
        raise ConfigError(f"Override '{text}' must look like key=value, e.g. distill.lr=1e-4.")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_overrides(recipe: RecipeConfig, overrides: list[str] | dict[str, Any]) -> RecipeConfig:
    """Set dotted keys on a recipe, checking each key and type."""
    pairs = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides)
    for key, value in pairs:
        if key not in valid_keys():
            raise _unknown_key(key, "--set")
        *sections, name = key.split(".")
        nested: dict[str, Any] = {name: value}
        for section in reversed(sections):
            nested = {section: nested}
        _apply_mapping(recipe, nested, "--set")
    validate(recipe)
    return recipe


def load_recipe(
    paths: str | Path | list[str | Path] | None = None, overrides: list[str] | dict[str, Any] = ()
) -> RecipeConfig:
    """Read recipe YAML files (later ones override earlier ones), apply overrides, validate.

    Without a ``name`` in any file, the run is named after the files' stems joined by '-', so
    ``configs/pets.yaml configs/students/efficientnet_b0.yaml`` becomes run 'pets-efficientnet_b0';
    an unnamed overlay on a named recipe adds its stem too (``smoke.yaml`` + that overlay:
    'smoke-efficientnet_b0').
    """
    recipe = RecipeConfig()
    if paths is None:
        paths = []
    elif isinstance(paths, str | Path):
        paths = [paths]
    name_parts: list[str] = []  # a named file's name, then the stems of the overlays after it
    for path in map(Path, paths):
        if not path.is_file():
            raise ConfigError(f"Recipe file '{path}' does not exist.")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"Recipe '{path}' is not valid YAML: {e}".splitlines()[0]) from None
        if not isinstance(data, dict):
            raise ConfigError(f"Recipe '{path}' must be a mapping of keys at the top level.")
        _apply_mapping(recipe, data, f"recipe '{path}'")
        beside = path.parent / str(data.get("classes_file", ""))
        if data.get("classes_file") and not Path(data["classes_file"]).is_absolute() and beside.is_file():
            recipe.classes_file = str(beside)  # a class file named by a recipe lives beside it
        if data.get("classes_file") and "dataset" not in data:
            recipe.dataset = None  # a recipe's own classes replace the default registry dataset
        if "name" in data or "run_dir" in data:
            name_parts = [recipe.name]
        else:
            name_parts.append(path.stem)
    if name_parts:
        recipe.name = "-".join(name_parts)
    return apply_overrides(recipe, overrides)


def validate(recipe: RecipeConfig) -> None:
    """Every key's choices and range (from its field's metadata), then cross-field checks.

    Runs before any model loads, so a bad value never costs a model download or a teacher cache.
    """
    sections = {"": recipe} | {f"{section}.": getattr(recipe, section) for section in STAGES}
    for prefix, config in sections.items():
        for f in dataclasses.fields(config):
            if f.name not in STAGES:
                check_field(f"{prefix}{f.name}", getattr(config, f.name), f.metadata)
    if recipe.distill.train_data and recipe.distill.input == "decoded":
        raise ConfigError(
            "distill.input=decoded is for the run's shards; streamed distill.train_data uses workers "
            "(set distill.input=auto)."
        )
    if recipe.classes_file is None and recipe.dataset is None:
        raise ConfigError("A recipe needs a 'dataset' from the registry or a 'classes_file'.")
    if not recipe.evaluate.protocols:
        raise ConfigError("'evaluate.protocols' needs at least one of clip_benchmark, paper.")
    distill = recipe.distill
    if distill.init is not None and distill.student_pretrained is not False:
        raise ConfigError(
            "distill.init and distill.student_pretrained both choose the student's start weights; "
            "set distill.student_pretrained=false to start from distill.init, or distill.init=null."
        )
    if distill.validate_every is not None and not (recipe.evaluate.datasets or recipe.classes_file is None):
        raise ConfigError(
            "distill.validate_every validates on registry test sets, and a recipe with its own classes_file "
            "has none: name them in evaluate.datasets or set distill.validate_every=null."
        )
    if len(distill.betas) != 2:
        raise ConfigError(
            f"'distill.betas' must be two numbers [beta1, beta2], each in [0, 1); got {distill.betas}."
        )
    if distill.resampled and not (distill.train_data and distill.train_num_samples):
        raise ConfigError(
            "'distill.resampled' draws shards of 'distill.train_data' until 'distill.train_num_samples' "
            "samples make an epoch; set both, or resampled=false."
        )
    if distill.stream_decode == "device" and not distill.train_data:
        raise ConfigError(
            "distill.stream_decode=device decodes streamed distill.train_data on the device, and the run's "
            "shards are decoded by distill.input instead; set distill.train_data, or "
            "distill.stream_decode=workers."
        )


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def dump_recipe(recipe: RecipeConfig) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False, allow_unicode=True)


def hashed_settings(config: Any) -> dict:
    """A stage config's result settings: the fields not marked ``hashed=False`` (speed-only).
    :mod:`synthdistill.identity` builds every output's identity from these."""
    return {
        f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.metadata.get("hashed", True)
    }


def config_hash(*parts: Any) -> str:
    """A short stable hash of configs (dataclasses or plain values): :func:`synthdistill.identity.digest`."""
    from synthdistill.identity import digest

    return digest(*parts)
