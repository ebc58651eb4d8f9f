"""Every "same inputs?" key: one function per artefact, so that an output is reused exactly when it
would come out the same.

An artefact's identity is :func:`digest` (stable JSON, sha256) over

- the settings that change the artefact's bytes: every field of its stage config except those marked
  ``hashed=False`` (:func:`synthdistill.config.option`; that mark is the one place a setting is
  declared speed-only: batch sizes that do not change a result, workers, compilation, log and
  checkpoint intervals, cache folders, evaluation precision, which is recorded in the results), and
  except the settings the chosen mode does not read (the LLM's under the template generator, the
  teacher cache's without a teacher cache, ``train_data``'s companions without ``train_data``);
- the identities of its inputs: the upstream artefact's identity (in a run, the upstream stage's
  identity; standalone, the content of the input file, :func:`file_digest` or
  :func:`shards_folder_identity`); a local weights file or folder by content
  (:func:`weights_identity`), a hub name or pretrained tag as the string it is;
- ``precision: auto`` resolved for the device type it runs on, since fp16 on a GPU and fp32 on a
  CPU draw different images.

Changing a speed-only setting changes no identity; changing a result setting changes its artefact's
identity and, through the chain of input identities, every downstream one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from synthdistill.config import DistillConfig, EvaluateConfig, ExportConfig, GenerateConfig, PromptsConfig
from synthdistill.config import hashed_settings as result_settings
from synthdistill.registry import Domain

IDENTITY_VERSION = 1
"""Folded into every identity: bump it when what an identity covers changes."""

LLM_SETTINGS = (
    "llm",
    "llm_batch_size",
    "llm_max_new_tokens",
    "llm_temperature",
    "llm_top_k",
    "llm_top_p",
    "llm_retries",
)
"""Prompt settings only the LLM generators (``llm``, ``paper``) read. ``llm_batch_size`` is a result
setting: batched, left-padded decoding rounds differently per batch, and one flipped token changes
the whole answer."""

LLM_GENERATORS = ("llm", "paper")

CACHE_SETTINGS = ("cache_views", "cache_dtype")
"""Distill settings read only with ``cache_teacher: true``."""

STREAM_SETTINGS = ("train_num_samples", "resampled", "shuffle_buffer", "stream_decode")
"""Distill settings read only with ``train_data``."""

_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def _json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} has no stable identity; pass plain values")


def digest(*parts: Any) -> str:
    """The one hash of the project: a short sha256 of ``parts`` as stable JSON (sorted keys, tuples
    as lists, dataclasses as dicts). Values without a stable text (objects, tensors) are refused."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _safetensors_header(f: Any, file_size: int) -> dict | None:
    """The parsed header of an open safetensors file (positioned after it), or None (and back at
    the start) when the file is not one."""
    size = int.from_bytes(f.read(8), "little")
    if 0 < size <= file_size - 8:
        try:
            header = json.loads(f.read(size))
        except ValueError:
            header = None
        if isinstance(header, dict):
            return header
    f.seek(0)
    return None


def file_digest(path: str | Path) -> str:
    """sha256 of a file's content, computed once per process for each (path, size, mtime): a
    600 MB checkpoint is read once, and a file rewritten under the same name is read again.

    A ``.safetensors`` header is hashed as sorted JSON: safetensors writes its metadata mapping in
    a per-process order, so the same tensors and metadata would otherwise differ from save to save.
    """
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            header = _safetensors_header(f, stat.st_size) if path.suffix == ".safetensors" else None
            if header is not None:
                sha.update(json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8"))
            for block in iter(lambda: f.read(1 << 22), b""):
                sha.update(block)
        _FILE_DIGESTS[key] = sha.hexdigest()
    return _FILE_DIGESTS[key]


def folder_digest(folder: str | Path, names: Sequence[str] | None = None) -> str:
    """The content of a folder's files (``names`` only, when given; all of them, recursively,
    skipping hidden ones, otherwise), by relative path and :func:`file_digest`."""
    folder = Path(folder)
    if names is None:
        files = sorted(
            p
            for p in folder.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        )
    else:
        files = [folder / name for name in names if (folder / name).is_file()]
    return digest([(p.relative_to(folder).as_posix(), file_digest(p)) for p in files])


def weights_identity(name: str | None) -> str | None:
    """Names model weights: a local file or folder by its content (the same name may hold other
    weights tomorrow), anything else (a hub id, an open_clip pretrained tag, ``tiny``) as is."""
    if name is None:
        return None
    path = Path(os.path.expanduser(name))
    if path.is_file():
        return f"file:{file_digest(path)}"
    if path.is_dir():
        return f"folder:{folder_digest(path)}"
    return name


def effective_precision(precision: str, device_type: str, on_gpu: str) -> str:
    """``auto`` as it runs: ``on_gpu`` on CUDA, fp32 elsewhere; any other value unchanged."""
    if precision != "auto":
        return precision
    return on_gpu if device_type == "cuda" else "fp32"


def _settings(config: Any, unread: Sequence[str] = ()) -> dict:
    return {k: v for k, v in result_settings(config).items() if k not in unread}


def _classes(domain: Domain) -> dict:
    """What a domain contributes to prompts and zero-shot heads (its name and title do not)."""
    return {
        "classnames": list(domain.classnames),
        "superclasses": [domain.superclass_of(c) for c in domain.classnames],
        "dimensions": domain.contextual_dimensions,
        "templates": list(domain.templates),
    }


def prompts_identity(domain: Domain, config: PromptsConfig, seed: int, device_type: str) -> str:
    """prompts.jsonl: the classes, their superclasses, dimensions and templates; the prompt count
    (``per_class`` resolved against the domain's); the run seed (image seeds derive from it); every
    prompts setting except the LLM's under the template generator; the LLM's weights by content and
    the device type it decodes on (bf16 on a GPU, fp32 on a CPU)."""
    llm = config.generator in LLM_GENERATORS
    settings = _settings(config, unread=() if llm else LLM_SETTINGS)
    if llm:
        settings["llm"] = weights_identity(config.llm)
        settings["llm_device"] = "cuda" if device_type == "cuda" else "cpu"
    per_class = config.per_class if config.per_class is not None else domain.images_per_class
    wording = {  # what the registry contributes to the prompt text beyond the classes
        "domain_word": domain.domain_word,
        "prompt_template": domain.prompt_template,
        "plain_prompt": domain.plain_prompt,
        "options_per_dimension": domain.options_per_dimension,
        "dimension_questions": domain.dimension_questions,
    }
    return digest(IDENTITY_VERSION, "prompts", _classes(domain), wording, per_class, seed, settings)


def llm_progress_identity(
    domain: Domain, config: PromptsConfig, seed: int, device_type: str, format_version: int
) -> str:
    """The LLM progress file beside prompts.jsonl: the finished answers depend on exactly what the
    prompts do (the shortening to ``max_prompt_tokens`` happens after, but is cheap to include), and
    on the file's own format."""
    return digest(
        IDENTITY_VERSION, "llm_progress", format_version, prompts_identity(domain, config, seed, device_type)
    )


DEFAULT_MODEL_LORAS = {"stabilityai/stable-diffusion-xl-base-1.0": "latent-consistency/lcm-lora-sdxl"}
"""``generate.lora: auto``: the LCM-LoRA of the default SDXL model; any other model gets none."""

FILTER_SETTINGS = ("filter_model", "filter_pretrained", "filter_retries", "filter_keep_failed")
"""Generate settings read only with ``filter: teacher``."""


def effective_lora(model: str, lora: str | None) -> str | None:
    """The LoRA that is fused: ``'auto'`` is the default model's LCM-LoRA (none for other models)."""
    return DEFAULT_MODEL_LORAS.get(model) if lora == "auto" else lora


def shards_settings(config: GenerateConfig, device_type: str) -> dict:
    """Every generate setting the shards' bytes depend on, readable (generate names the changed ones
    when it refuses a folder): all but the speed-only ones (``batch_size``: each image has its own
    generator, so a batch draws the same images up to float rounding; ``compile``); the LoRA as it is
    fused (``auto`` resolved); the diffusion model, LoRA, VAE and filter weights by content when
    local; precision resolved (auto: fp16 on a GPU, fp32 on a CPU); the filter's settings only when
    the filter is on."""
    settings = _settings(config, unread=FILTER_SETTINGS if config.filter == "none" else ())
    settings["lora"] = effective_lora(config.model, config.lora)
    for key in ("model", "lora", "vae", "filter_pretrained"):
        if key in settings:
            settings[key] = weights_identity(settings[key])
    settings["precision"] = effective_precision(config.precision, device_type, on_gpu="fp16")
    return settings


def shards_identity(prompts: str, config: GenerateConfig, device_type: str) -> str:
    """shards/: the prompts' identity and :func:`shards_settings`."""
    return digest(IDENTITY_VERSION, "shards", prompts, shards_settings(config, device_type))


def shards_folder_identity(folder: str | Path) -> str:
    """A shard folder as the input of a standalone stage: the content of its shards (names and
    sha256), so the same shards anywhere are the same input, and a regenerated one is not."""
    from synthdistill.shards import list_shards

    folder = Path(folder)
    return digest([(p.name, file_digest(p)) for p in list_shards(folder)])


def student_identity(
    data: str, config: DistillConfig, seed: int, device_type: str, init: str | None = None
) -> str:
    """student/ (the trained weights): the training data's identity (the shards', or the
    ``train_data`` spec as written), the run seed (initialisation, views, order) and every distill
    setting except the speed-only ones (workers, compile, checkpoint and log intervals) and the
    unread ones; the teacher's weights by content when local; precision resolved (auto: bf16);
    ``init``, the starting weights' identity (:func:`synthdistill.student.init_identity`), in place
    of the ``distill.init`` path, so the same weights anywhere are the same start."""
    unread = [
        *(() if config.cache_teacher else CACHE_SETTINGS),
        *(() if config.train_data else STREAM_SETTINGS),
    ]
    settings = _settings(config, unread)
    settings["teacher_pretrained"] = weights_identity(config.teacher_pretrained)
    settings["precision"] = effective_precision(config.precision, device_type, on_gpu="bf16")
    if config.init is not None:
        settings["init"] = init if init is not None else weights_identity(config.init)
    return digest(IDENTITY_VERSION, "student", data, seed, settings)


def decoded_store_identity(shards: str, store_format: str) -> str:
    """decoded/images-KEY: the shards' identity (:func:`shards_folder_identity`) and the store's
    format; nothing else changes its bytes (every image is stored at its own size, uint8)."""
    return digest(IDENTITY_VERSION, "decoded_store", shards, store_format)


def student_folder_identity(student_dir: str | Path) -> str:
    """A finished student folder as the input of a standalone evaluate or export: its weights and
    its config.json (which names the teacher and the preprocessing), by content."""
    return folder_digest(student_dir, ("model.safetensors", "config.json"))


def checkpoint_identity(student: str, data_split: str) -> str:
    """What a checkpoint must share with a run to be resumed: the student it trains towards
    (:func:`student_identity`) and how the data is split over processes (on the run's shards each
    rank replays its own views, so another process count is another optimisation path)."""
    return digest(IDENTITY_VERSION, "checkpoint", student, data_split)


def teacher_cache_identity(
    *,
    teacher: str,
    teacher_pretrained: str | None,
    preprocessing: dict,
    precision: str,
    augmentation: dict,
    views: int,
    shards: str,
    dtype: str,
) -> str:
    """teacher_cache/views-KEY: the teacher (architecture, weights by content), its preprocessing,
    the autocast dtype it ran under (resolved, e.g. 'torch.bfloat16' or 'fp32'), the augmentation
    (seed and crop settings) and view count, the shards' identity and the storage dtype. Not the
    embedding batch size or workers: each view is embedded on its own."""
    return digest(
        IDENTITY_VERSION,
        "teacher_cache",
        teacher,
        weights_identity(teacher_pretrained),
        preprocessing,
        precision,
        augmentation,
        views,
        shards,
        dtype,
    )


def zero_shot_head_identity(
    teacher: str,
    teacher_pretrained: str | None,
    classnames: Sequence[str],
    templates: Sequence[str],
    label: str,
) -> str:
    """A cached (D, C) zero-shot head: the teacher (weights by content), the class names and
    templates in order, and the label it is stored under. Always built in fp32, so no precision."""
    return digest(
        IDENTITY_VERSION,
        "zero_shot_head",
        teacher,
        weights_identity(teacher_pretrained),
        list(classnames),
        list(templates),
        label,
    )


def teacher_tower_identity(teacher: str, teacher_pretrained: str | None, opset: int) -> str:
    """The teacher's image tower as ONNX (export times it beside the student): the architecture, its
    weights by content and the opset it is written in."""
    return digest(IDENTITY_VERSION, "teacher_tower", teacher, weights_identity(teacher_pretrained), opset)


def evaluation_identity(
    student: str, config: EvaluateConfig, domain: Domain, image_folder: str | None
) -> str:
    """eval/results.*: the student's identity (its teacher is the one it names), the domain's
    classes and templates, and every evaluate setting except the speed-only ones (batch size,
    workers, head cache folder, download, precision, which results.json records). ``image_folder``
    is the identity of the evaluated folder when it is an artefact (the run's own shards); otherwise
    ``config.image_folder`` counts as the path it is."""
    settings = _settings(config)
    if image_folder is not None:
        settings["image_folder"] = image_folder
    return digest(IDENTITY_VERSION, "evaluation", student, domain.name, _classes(domain), settings)


def export_identity(student: str, domain: Domain, config: ExportConfig, evaluation: str | None) -> str:
    """export/: the student's identity, the classes and templates of its zero-shot head, every
    export setting except ``bench_repeats``, and the evaluation it quotes in the model card
    (:func:`evaluation_identity`, or None without one)."""
    return digest(IDENTITY_VERSION, "export", student, _classes(domain), evaluation, _settings(config))
