"""Stage 2: prompts become images, written as WebDataset shards, resumable and spread over processes.

Prompt ``i`` of prompts.jsonl (its 0-based line) becomes sample ``f"{i:08d}"`` of shard
``i // shard_size``. Process ``part`` of ``parts`` (torchrun rank and/or ``--shard-index``) writes
the shards ``s`` with ``s % parts == part``; a lock file per shard keeps a second process launched on
the same part off a shard that is being written. A shard file exists only once complete, and is
checked against the record written beside it, so a restart skips finished shards and redraws the
ones in flight, cut short or corrupt. Each image gets its own ``torch.Generator`` seeded from its
prompt's seed, so it depends on (model, prompt, seed, settings), not on its batch, rank or restart.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from synthdistill.config import GenerateConfig
from synthdistill.errors import SynthdistillError, setting
from synthdistill.fileio import exclusive_lock
from synthdistill.identity import effective_lora, shards_settings
from synthdistill.progress import progress_bar
from synthdistill.runtime import DistEnv, derive_seed, dist_env, resolve_device
from synthdistill.shards import (
    DISK_FULL,
    INDEX_NAME,
    ShardWriter,
    check_shard,
    encode_sample,
    list_shards,
    read_index,
    read_record,
    record_path,
    shard_name,
    write_index,
)
from synthdistill.tiny import TINY_DIFFUSION_NAMES, create_tiny_diffusion_pipeline

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from synthdistill.teacher import Teacher

BLACK_LEVEL = 2 / 255
"""An image with no pixel brighter than this is black: the safety checker's blank or a failed decode."""

FILTER_TEMPLATE = "a photo of a {c}"
"""The teacher filter's single zero-shot template (PAPER.md, Stage 2)."""


@dataclass(frozen=True)
class Prompt:
    """One line of prompts.jsonl; ``index`` is its 0-based line number."""

    index: int
    class_index: int
    class_name: str
    prompt: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.index:08d}"


@dataclass(frozen=True)
class PromptsFile:
    path: Path
    sha256: str
    prompts: list[Prompt]


FILTER_COUNTS = ("kept_first_time", "kept_after_redraw", "kept_failed", "dropped", "redrawn", "redraws")
"""The teacher filter's counts: images kept at once, kept after one or more redraws, kept although the
filter never accepted them, dropped; images redrawn at least once, and redraws in all."""


@dataclass
class GenerateSummary:
    """What one process did. ``complete`` is about the whole prompts file: every shard exists.

    ``filter`` holds the teacher filter's counts (:data:`FILTER_COUNTS`) over this process's
    shards, None when the filter is off; ``index.json`` sums them over every shard.
    """

    out_dir: Path
    num_prompts: int
    shards_total: int
    shards_written: int
    shards_skipped: int
    images_written: int
    images_retried: int
    images_failed: int
    seconds: float
    images_per_second: float
    peak_gpu_memory_gib: float | None
    complete: bool
    shards_redrawn: int = 0
    shards_busy: int = 0
    filter: dict | None = None


@dataclass
class _Drawn:
    prompt: Prompt
    seed: int
    pixels: np.ndarray | None
    retried: bool
    weighted: bool
    filter_redraws: int = 0
    filter_passed: bool | None = None


@dataclass
class _Tally:
    written: int = 0
    retried: int = 0
    failed: int = 0
    filter: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FILTER_COUNTS, 0))

    def record(self) -> dict:
        return {"images_retried": self.retried, "images_failed": self.failed, "filter": dict(self.filter)}

    def add(self, other: _Tally) -> None:
        self.written += other.written
        self.retried += other.retried
        self.failed += other.failed
        for name, value in other.filter.items():
            self.filter[name] += value


_FIELDS = (("class_index", int), ("class_name", str), ("prompt", str), ("seed", int))


def _parse_prompt(line: str, index: int) -> Prompt:
    """One JSON line -> Prompt; raises ValueError naming what is wrong."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    for name, kind in _FIELDS:
        value = record.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"'{name}' is missing or not {'an integer' if kind is int else 'a string'}")
    if not record["prompt"].strip():
        raise ValueError("'prompt' is empty")
    return Prompt(index, record["class_index"], record["class_name"], record["prompt"], record["seed"])


def read_prompts(path: str | Path) -> PromptsFile:
    """Read and check prompts.jsonl; a bad line (not UTF-8, not JSON, a field missing) is refused
    with its line number, before any model loads."""
    path = Path(path)
    if not path.is_file():
        raise SynthdistillError(
            f"Prompts file '{path}' does not exist; write it with `synthdistill prompts`."
        )
    data = path.read_bytes()
    raw_lines = data.split(b"\n")
    while raw_lines and not raw_lines[-1].strip():
        raw_lines.pop()
    if not raw_lines:
        raise SynthdistillError(
            f"Prompts file '{path}' holds no prompts; write it with `synthdistill prompts`."
        )
    prompts = []
    for index, raw in enumerate(raw_lines):
        try:
            try:
                line = raw.decode("utf-8").removesuffix("\r")
            except UnicodeDecodeError as e:
                raise ValueError(f"not valid UTF-8 at byte {e.start + 1}") from None
            prompts.append(_parse_prompt(line, index))
        except ValueError as e:
            raise SynthdistillError(
                f"Line {index + 1} of '{path}' is not a valid prompt ({e}); fix it or rewrite the file "
                "with `synthdistill prompts`."
            ) from None
    return PromptsFile(path, hashlib.sha256(data).hexdigest(), prompts)


def pipeline_dtype(precision: str, device: torch.device) -> torch.dtype:
    """'auto' is fp16 on GPU (SDXL's VAE is then decoded in fp32, or replaced) and fp32 on CPU."""
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision not in table:
        raise SynthdistillError(f"Unknown generate.precision '{precision}'; use auto, fp32, fp16 or bf16.")
    return table[precision]


@contextmanager
def _loading(key: str, name: str, local: str = "a local folder") -> Iterator[None]:
    """Turn a failed download or load into one sentence that names the option to change."""
    try:
        with warnings.catch_warnings():  # diffusers passes huggingface_hub a retired argument
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            yield
    except (OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")
        raise SynthdistillError(
            f"Cannot load {key} '{name}' ({reason}); pass {local} with {setting(key)}, "
            "or allow network access so it can be downloaded."
        ) from None


def load_text2image_pipeline(config: GenerateConfig, device: torch.device) -> DiffusionPipeline:
    """The diffusers pipeline for ``config.model`` on ``device``, ready to draw.

    Any model AutoPipelineForText2Image supports (hub id or local folder), or 'tiny'/'tiny-sdxl'.
    The LoRA is fused into the weights, the safety checker stays off unless asked for, and SDXL's
    VAE is decoded in fp32 under fp16 (diffusers' ``force_upcast``) unless ``config.vae`` replaces it.
    """
    from diffusers import AutoencoderKL, AutoPipelineForText2Image, DiffusionPipeline, LCMScheduler

    dtype = pipeline_dtype(config.precision, device)
    if config.model in TINY_DIFFUSION_NAMES:
        pipe = create_tiny_diffusion_pipeline(config.model)
    else:
        with _loading("generate.model", config.model):
            components = DiffusionPipeline.load_config(config.model)
            no_checker = {}
            if "safety_checker" in components and not config.safety_checker:
                no_checker = {"safety_checker": None, "requires_safety_checker": False}
            pipe = AutoPipelineForText2Image.from_pretrained(config.model, torch_dtype=dtype, **no_checker)
    if config.vae:
        with _loading("generate.vae", config.vae):
            pipe.vae = AutoencoderKL.from_pretrained(config.vae, torch_dtype=dtype)
    pipe.to(device)
    if pipe.dtype != dtype:  # the tiny pipelines are built in fp32
        pipe.to(dtype=dtype)
    lora = effective_lora(config.model, config.lora)
    if lora:
        with _loading("generate.lora", lora, "a local folder or .safetensors file (null: no LoRA)"):
            if Path(lora).is_file():
                pipe.load_lora_weights(str(Path(lora).parent), weight_name=Path(lora).name)
            else:
                pipe.load_lora_weights(lora)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    if config.scheduler == "lcm":
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    if device.type == "cuda":
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if config.compile:
        pipe.unet = torch.compile(pipe.unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def has_weighting_syntax(text: str) -> bool:
    """Whether compel reads ``text`` as anything but itself: weights (``cat++``, ``(a cat)1.2``),
    blends, conjunctions, or brackets and quotes that it strips."""
    from compel import Compel
    from compel.prompt_parser import FlattenedPrompt

    conjunction = Compel.parse_prompt_string(text)
    if len(conjunction.prompts) != 1 or conjunction.weights != [1.0]:
        return True
    prompt = conjunction.prompts[0]
    if type(prompt) is not FlattenedPrompt or prompt.wants_cross_attention_control:
        return True
    fragments = prompt.children
    return not (len(fragments) == 1 and fragments[0].weight == 1.0 and fragments[0].text == text)


class PromptEncoder:
    """A batch's text inputs for the pipeline: the raw prompts, or compel's weighted embeddings.

    ``mode`` is ``generate.prompt_weighting``: 'compel' weights every prompt, 'auto' those with
    weighting syntax (the others get the pipeline's own encoding), 'none' passes raw text.
    SD 1.x/2.x: compel on the text encoder's last hidden states, as the pipeline takes them. SDXL:
    compel on both encoders' penultimate hidden states (not normalised), concatenated, and the
    pooled output of the second, which compel computes from the raw prompt string, syntax
    characters included (PAPER.md: the authors' images were made so). Prompts are cut at 77 tokens,
    as the pipeline itself cuts them.
    """

    def __init__(self, pipe: DiffusionPipeline, mode: str):
        self.pipe, self.mode = pipe, mode
        self._compel: tuple | None = None

    def weighted(self, text: str) -> bool:
        return self.mode == "compel" or (self.mode == "auto" and has_weighting_syntax(text))

    def _encoders(self) -> tuple:
        if self._compel is None:
            from compel import Compel, ReturnedEmbeddingsType

            if getattr(self.pipe, "text_encoder_2", None) is not None:
                kind = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
                self._compel = (
                    Compel(
                        tokenizer=self.pipe.tokenizer,
                        text_encoder=self.pipe.text_encoder,
                        returned_embeddings_type=kind,
                    ),
                    Compel(
                        tokenizer=self.pipe.tokenizer_2,
                        text_encoder=self.pipe.text_encoder_2,
                        returned_embeddings_type=kind,
                        requires_pooled=True,
                    ),
                )
            elif getattr(self.pipe, "text_encoder", None) is not None and hasattr(self.pipe, "tokenizer"):
                self._compel = (Compel(tokenizer=self.pipe.tokenizer, text_encoder=self.pipe.text_encoder),)
            else:
                raise SynthdistillError(
                    "Prompt weighting works with SD 1.x/2.x and SDXL pipelines, not "
                    f"{type(self.pipe).__name__}; set generate.prompt_weighting=none."
                )
        return self._compel

    @torch.no_grad()
    def _embed(self, text: str, weighted: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(1, T, D) sequence embeddings and (1, P) pooled ones (SDXL; None otherwise) of one prompt."""
        encoders = self._encoders()
        sdxl = len(encoders) == 2
        if not weighted:  # the pipeline's own encoding, exactly as for raw text
            device = self.pipe.text_encoder.device
            if sdxl:
                embeds, _, pooled, _ = self.pipe.encode_prompt(
                    text, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
                )
                return embeds, pooled
            return self.pipe.encode_prompt(text, device, 1, False)[0], None
        if sdxl:
            first, (second, pooled) = encoders[0](text), encoders[1](text)
            return torch.cat([first, second], dim=-1), pooled
        return encoders[0](text), None

    def inputs(self, texts: list[str]) -> list[tuple[list[int], dict]]:
        """(positions in ``texts``, pipeline keyword arguments) groups that together cover the batch.

        Without weighting: one group, the raw prompts. With it: one group per conditioning length
        (compel's ``.and()`` gives 154 tokens): padding a prompt's conditioning to a longer
        batch-mate's would change its image, so each image stays a function of its own prompt.
        """
        weighted = [self.weighted(text) for text in texts]
        if not any(weighted):
            return [(list(range(len(texts))), {"prompt": list(texts)})]
        embedded = [self._embed(text, w) for text, w in zip(texts, weighted, strict=True)]
        groups: dict[int, list[int]] = {}
        for position, (embeds, _) in enumerate(embedded):
            groups.setdefault(embeds.shape[1], []).append(position)
        result = []
        for positions in groups.values():
            inputs = {"prompt_embeds": torch.cat([embedded[i][0] for i in positions])}
            if embedded[0][1] is not None:
                inputs["pooled_prompt_embeds"] = torch.cat([embedded[i][1] for i in positions])
            result.append((positions, inputs))
        return result


def unusable(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B,) bool: NaN anywhere (fp16 overflow) or black (the safety
    checker's blank)."""
    flat = images.flatten(1)
    return ~torch.isfinite(flat).all(dim=1) | (flat.amax(dim=1) <= BLACK_LEVEL)


def to_stored_pixels(images: torch.Tensor, store_size: int | None) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, h, w, 3) uint8 on the CPU, shrunk (never enlarged) so the short
    side is ``store_size``. Resized on the images' device, so a GPU run moves small images only."""
    height, width = images.shape[-2:]
    if store_size and min(height, width) > store_size:
        scale = store_size / min(height, width)
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        images = F.interpolate(images.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    return images.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _draw(
    pipe: DiffusionPipeline,
    encoder: PromptEncoder,
    texts: list[str],
    seeds: list[int],
    config: GenerateConfig,
) -> torch.Tensor:
    """(B, 3, H, W) images in [0, 1] on the pipeline's device (NaN kept), one CPU generator per image.

    CPU generators make the noise, and so the image, the same on any device and in any batch.
    """
    extra: dict[str, Any] = {}
    if config.resolution:
        extra["height"] = extra["width"] = config.resolution
    images: list[torch.Tensor | None] = [None] * len(texts)
    for positions, inputs in encoder.inputs(texts):
        if config.negative_prompt and config.guidance > 1:
            inputs["negative_prompt"] = [config.negative_prompt] * len(positions)
        drawn = pipe(
            **inputs,
            num_inference_steps=config.steps,
            guidance_scale=config.guidance,
            generator=[torch.Generator().manual_seed(seeds[i]) for i in positions],
            output_type="pt",
            **extra,
        ).images
        for position, image in zip(positions, drawn, strict=True):
            images[position] = image
    return torch.stack(images)


def _draw_batch(
    pipe: DiffusionPipeline,
    encoder: PromptEncoder,
    batch: list[Prompt],
    seeds: list[int],
    config: GenerateConfig,
) -> list[_Drawn]:
    """Draw a batch; a NaN/black image is drawn once more with a derived seed, then given up (None)."""
    texts = [p.prompt for p in batch]
    images = _draw(pipe, encoder, texts, seeds, config)
    seeds, retried = list(seeds), [False] * len(batch)
    redraw = unusable(images).nonzero().flatten().tolist()
    for i in redraw:
        seeds[i], retried[i] = derive_seed(seeds[i], "retry"), True
    if redraw:
        images[redraw] = _draw(pipe, encoder, [texts[i] for i in redraw], [seeds[i] for i in redraw], config)
    failed = unusable(images).tolist()
    pixels = to_stored_pixels(images, config.store_size)
    return [
        _Drawn(prompt, seed, None if bad else image, again, encoder.weighted(prompt.prompt))
        for prompt, seed, image, again, bad in zip(batch, seeds, pixels, retried, failed, strict=True)
    ]


class TeacherFilter:
    """Judges drawn images with a CLIP model: zero-shot over the run's classes with one template,
    an image passes when its top class is its own (PAPER.md, Stage 2: the optional teacher filter).

    One image-tower pass per image, batch by batch on the generating device.
    """

    def __init__(self, teacher: Teacher, classnames: dict[int, str]):
        from synthdistill.teacher import cached_zero_shot_head

        self.teacher = teacher
        indices = sorted(classnames)
        self.column = {class_index: column for column, class_index in enumerate(indices)}
        self.head = cached_zero_shot_head(teacher, [classnames[i] for i in indices], [FILTER_TEMPLATE], None)

    def _inputs(self, pixels: np.ndarray) -> torch.Tensor:
        """(B, h, w, 3) uint8 stored pixels -> the teacher's (B, 3, S, S) normalised input."""
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        prep = self.teacher.preprocessing
        images = torch.from_numpy(pixels).to(self.teacher.device).permute(0, 3, 1, 2).float() / 255
        images = TF.resize(images, prep.image_size, InterpolationMode(prep.interpolation), antialias=True)
        return TF.normalize(TF.center_crop(images, prep.image_size), prep.mean, prep.std)

    def accepts(self, drawn: list[_Drawn]) -> list[bool]:
        if not drawn:
            return []
        embeddings = self.teacher.encode_images(self._inputs(np.stack([d.pixels for d in drawn])))
        predicted = (embeddings @ self.head).argmax(dim=1).tolist()
        return [p == self.column[d.prompt.class_index] for p, d in zip(predicted, drawn, strict=True)]


def _filter_batch(
    drawn: list[_Drawn],
    judge: TeacherFilter,
    redraw: Callable[[list[Prompt], list[int]], list[_Drawn]],
    retries: int,
    keep_failed: bool,
    counts: dict[str, int],
) -> list[_Drawn]:
    """Redraw the images ``judge`` rejects with seed ``derive_seed(prompt seed, 'filter', attempt)``,
    up to ``retries`` times; then keep or drop the rejected ones. Unusable redraws leave the filter
    (skipped and counted as any NaN/black image). Dropped images come back with ``pixels=None``."""
    drawn = list(drawn)
    judged = [i for i, d in enumerate(drawn) if d.pixels is not None]
    passed = dict(zip(judged, judge.accepts([drawn[i] for i in judged]), strict=True))
    for attempt in range(1, retries + 1):
        redo = [i for i in judged if not passed[i]]
        if not redo:
            break
        counts["redraws"] += len(redo)
        if attempt == 1:
            counts["redrawn"] += len(redo)
        prompts = [drawn[i].prompt for i in redo]
        again = redraw(prompts, [derive_seed(p.seed, "filter", attempt) for p in prompts])
        for i, d in zip(redo, again, strict=True):
            d.filter_redraws = attempt
            drawn[i] = d
        judged = [i for i in judged if drawn[i].pixels is not None]
        usable = [i for i in redo if drawn[i].pixels is not None]
        passed.update(zip(usable, judge.accepts([drawn[i] for i in usable]), strict=True))
    for i in judged:
        d = drawn[i]
        d.filter_passed = passed[i]
        if d.filter_passed:
            counts["kept_first_time" if d.filter_redraws == 0 else "kept_after_redraw"] += 1
        elif keep_failed:
            counts["kept_failed"] += 1
        else:
            counts["dropped"] += 1
            d.pixels = None
    return drawn


def load_filter(config: GenerateConfig, prompts: list[Prompt], device: torch.device) -> TeacherFilter | None:
    """The teacher filter over the prompts' classes, or None when ``generate.filter`` is 'none'."""
    if config.filter == "none":
        return None
    from synthdistill.teacher import load_teacher

    teacher = load_teacher(config.filter_model, config.filter_pretrained, device)
    return TeacherFilter(teacher, {p.class_index: p.class_name for p in prompts})


def _sample_meta(d: _Drawn, config: GenerateConfig) -> dict:
    meta = {
        "class_index": d.prompt.class_index,
        "class_name": d.prompt.class_name,
        "prompt": d.prompt.prompt,
        "seed": d.seed,
        "retried": d.retried,
        "weighted": d.weighted,
        "model": config.model,
        "lora": effective_lora(config.model, config.lora),
        "steps": config.steps,
        "guidance": config.guidance,
    }
    if d.filter_passed is not None:
        meta.update(filter_redraws=d.filter_redraws, filter_passed=d.filter_passed)
    return meta


def work_part(shard_index: int | None, num_shards: int | None, env: DistEnv) -> tuple[int, int]:
    """(part, parts) of this process: job-array task ``shard_index`` of ``num_shards``, x torchrun ranks."""
    if (shard_index is None) != (num_shards is None):
        raise SynthdistillError("--shard-index and --num-shards go together; give both or neither.")
    if num_shards is not None and not (num_shards > 0 and 0 <= shard_index < num_shards):
        raise SynthdistillError(
            f"--shard-index must be in 0..{num_shards - 1} for --num-shards {num_shards}; got {shard_index}."
        )
    return (shard_index or 0) * env.world_size + env.rank, (num_shards or 1) * env.world_size


def _check_folder(out_dir: Path, identity: dict, force: bool) -> bool:
    """Whether ``out_dir`` holds shards of another prompts file or settings (allowed only with force)."""
    index = read_index(out_dir)
    if index is None:
        foreign = bool(list_shards(out_dir))
        what = "shards without an index.json"
    else:
        old = {"prompts_sha256": index.get("prompts_sha256"), **index.get("settings", {})}
        new = {"prompts_sha256": identity["prompts_sha256"], **identity["settings"]}
        changed = [key for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)]
        foreign = bool(changed)
        what = f"shards made from another prompts file or settings (changed: {', '.join(changed)})"
    if foreign and not force:
        raise SynthdistillError(
            f"'{out_dir}' holds {what}; pass --force to replace them, or choose another --out."
        )
    return foreign


def _lock_path(out_dir: Path, shard: int) -> Path:
    return out_dir / f".shard-{shard:06d}.lock"


def _remove_shard_leftovers(path: Path) -> None:
    """Every temporary file of one shard and its record; call only while holding the shard's lock."""
    for pattern in (f".{path.name}.tmp-*", f".{record_path(path).name}.tmp-*"):
        for stale in path.parent.glob(pattern):
            stale.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_files(out_dir: Path) -> None:
    """Temporary files whose writer is gone (this host, process not alive) and unheld shard locks.

    Temporaries are named ``.<name>.tmp-<host>-<pid>`` (fileio.temporary_name); a lock file that can
    be taken is held by nobody, and taking and releasing it removes it.
    """
    host = socket.gethostname()
    for path in out_dir.glob(".*.tmp-*"):
        writer_host, _, pid = path.name.rpartition(".tmp-")[2].rpartition("-")
        if writer_host == host and pid.isdigit() and not _pid_alive(int(pid)):
            path.unlink(missing_ok=True)
    for lock in out_dir.glob(".shard-*.lock"):
        try:
            with exclusive_lock(lock, f"shard {lock.stem.lstrip('.')}"):
                pass
        except SynthdistillError:
            pass  # held: another process is writing that shard


def _clear_folder(out_dir: Path) -> None:
    """Remove the shards, their records, their unfinished temporary files and the index of another
    generation run."""
    shards = list_shards(out_dir)
    stale = [*out_dir.glob(".shard-*.tar.tmp-*"), *out_dir.glob(".shard-*.json.tmp-*")]
    for path in [
        *shards,
        *map(record_path, shards),
        *out_dir.glob("shard-*.json"),
        *stale,
        out_dir / INDEX_NAME,
    ]:
        path.unlink(missing_ok=True)


def _update_index(out_dir: Path, info: dict, shards_total: int, filtered: bool) -> bool:
    """Write index.json with the counts summed over every shard's record; returns whether every
    shard exists and agrees with its record (count and size).

    Processes finish in any order and each writes the index: rewriting until the folder did not
    change during the write guarantees that the last writer lists every finished shard.
    """
    expected = {shard_name(i) for i in range(shards_total)}
    while True:
        shards = list_shards(out_dir)
        records = [read_record(p) or {} for p in shards]
        totals: dict[str, Any] = {
            "images_retried": sum(r.get("images_retried", 0) for r in records),
            "images_failed": sum(r.get("images_failed", 0) for r in records),
        }
        if filtered:
            totals["filter"] = {k: sum(r.get("filter", {}).get(k, 0) for r in records) for k in FILTER_COUNTS}
        complete = expected <= {p.name for p in shards if not check_shard(p)}
        write_index(out_dir, {**info, **totals, "complete": complete})
        if list_shards(out_dir) == shards:
            return complete


@contextmanager
def _disk_full_is_one_sentence(out_dir: Path) -> Iterator[None]:
    """A full disk (or quota) while writing becomes one sentence naming the folder; the shard being
    written has already removed its temporary file (ShardWriter, atomic_path)."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise SynthdistillError(
            f"The disk holding '{out_dir}' is full ({e.strerror}); free space there or choose another --out, "
            "then run the same command again: finished shards are kept."
        ) from None


def _write_shard(
    pipe: DiffusionPipeline,
    encoder: PromptEncoder,
    judge: TeacherFilter | None,
    path: Path,
    prompts: list[Prompt],
    config: GenerateConfig,
    tally: _Tally,
    progress: tqdm,
    fail_after: int | None,
) -> None:
    """Draw ``prompts`` in batches into the shard at ``path``, which appears only when complete,
    with its record (sample count, size, hash and this shard's counts) beside it."""
    shard = _Tally()

    def redraw(batch: list[Prompt], seeds: list[int]) -> list[_Drawn]:
        return _draw_batch(pipe, encoder, batch, seeds, config)

    with ShardWriter(path) as writer:
        for begin in range(0, len(prompts), config.batch_size):
            batch = prompts[begin : begin + config.batch_size]
            drawn = redraw(batch, [p.seed for p in batch])
            if judge is not None:
                drawn = _filter_batch(
                    drawn, judge, redraw, config.filter_retries, config.filter_keep_failed, shard.filter
                )
            for d in drawn:
                shard.retried += d.retried
                if d.pixels is not None:
                    image = Image.fromarray(d.pixels)
                    writer.write(
                        d.prompt.key, encode_sample(image, _sample_meta(d, config), config.jpeg_quality)
                    )
                    shard.written += 1
                elif d.filter_passed is None:  # unusable, not dropped by the filter
                    shard.failed += 1
                progress.update()
                if fail_after is not None and tally.written + shard.written >= fail_after:
                    raise KeyboardInterrupt(f"simulated interruption after {fail_after} images")
            if shard.retried or shard.failed:
                progress.set_postfix(
                    retried=tally.retried + shard.retried, failed=tally.failed + shard.failed
                )
        writer.record.update(shard.record())
    tally.add(shard)


def generate_images(
    prompts_path: str | Path,
    out_dir: str | Path,
    config: GenerateConfig,
    *,
    shard_index: int | None = None,
    num_shards: int | None = None,
    force: bool = False,
    device: str = "auto",
    fail_after: int | None = None,
    pipeline: DiffusionPipeline | None = None,
) -> GenerateSummary:
    """Draw one image per prompt into ``out_dir/shard-*.tar`` (this process's shards) and index.json.

    ``shard_index``/``num_shards`` pick this job-array task's share; under torchrun each rank takes a
    share of that. ``force`` redoes this process's shards and replaces a folder made from another
    prompts file or settings (refused otherwise). A shard that another process is writing (its lock
    is held) is skipped and counted in ``shards_busy``; a shard that is cut short or differs from its
    record is drawn again (``shards_redrawn``). ``pipeline`` reuses an already loaded
    :func:`load_text2image_pipeline` (``config.model`` is still what is recorded). ``fail_after`` is a
    test hook: a KeyboardInterrupt after that many images, as a Ctrl-C would.
    """
    prompts_file = read_prompts(prompts_path)
    prompts, out_dir = prompts_file.prompts, Path(out_dir)
    env = dist_env()
    part, parts = work_part(shard_index, num_shards, env)
    shards_total = math.ceil(len(prompts) / config.shard_size)
    torch_device = resolve_device(device, env)
    identity = {"prompts_sha256": prompts_file.sha256, "settings": shards_settings(config, torch_device.type)}
    # Another run's shards are cleared before the slow model load, so that processes starting
    # together clear them before any of them has written a shard of its own.
    if _check_folder(out_dir, identity, force):
        _clear_folder(out_dir)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)  # keeps every torchrun rank's CUDA context off GPU 0
    judge = load_filter(config, prompts, torch_device)  # small: a missing filter model fails first
    pipe = pipeline if pipeline is not None else load_text2image_pipeline(config, torch_device)
    encoder = PromptEncoder(pipe, config.prompt_weighting)

    info = {
        "prompts_file": str(prompts_file.path),
        **identity,
        "num_prompts": len(prompts),
        "shards_expected": shards_total,
    }
    mine = list(range(part, shards_total, parts))
    if torch_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(torch_device)
    tally = _Tally()
    written = skipped = redrawn = busy = 0
    start = time.perf_counter()
    with _disk_full_is_one_sentence(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_files(out_dir)
        _update_index(out_dir, info, shards_total, judge is not None)
        todo = [s for s in mine if force or check_shard(out_dir / shard_name(s))]
        todo_images = sum(len(prompts[s * config.shard_size : (s + 1) * config.shard_size]) for s in todo)
        with progress_bar(
            todo_images, f"generate {part + 1}/{parts}", unit="img", enabled=env.local_rank == 0
        ) as progress:
            for shard in mine:
                path = out_dir / shard_name(shard)
                with ExitStack() as stack:
                    try:
                        stack.enter_context(exclusive_lock(_lock_path(out_dir, shard), f"shard {path.name}"))
                    except SynthdistillError:
                        busy += 1  # another process writes this shard now
                        continue
                    present = path.exists()
                    problem = check_shard(path, full=True) if present else "missing"
                    if present and not problem and not force:
                        skipped += 1
                        continue
                    if present and problem:
                        redrawn += 1
                    path.unlink(missing_ok=True)
                    _remove_shard_leftovers(path)
                    shard_prompts = prompts[shard * config.shard_size : (shard + 1) * config.shard_size]
                    _write_shard(
                        pipe, encoder, judge, path, shard_prompts, config, tally, progress, fail_after
                    )
                    written += 1
        seconds = time.perf_counter() - start
        complete = _update_index(out_dir, info, shards_total, judge is not None)
    peak = torch.cuda.max_memory_allocated(torch_device) / 2**30 if torch_device.type == "cuda" else None
    return GenerateSummary(
        out_dir=out_dir,
        num_prompts=len(prompts),
        shards_total=shards_total,
        shards_written=written,
        shards_skipped=skipped,
        images_written=tally.written,
        images_retried=tally.retried,
        images_failed=tally.failed,
        seconds=seconds,
        images_per_second=tally.written / seconds if seconds > 0 else 0.0,
        peak_gpu_memory_gib=peak,
        complete=complete,
        shards_redrawn=redrawn,
        shards_busy=busy,
        filter=tally.filter if judge is not None else None,
    )
