"""Stage 2: prompts become images, written as WebDataset shards, resumable and spread over processes.

Prompt ``i`` of prompts.jsonl (its 0-based line) becomes sample ``f"{i:08d}"`` of shard
``i // shard_size``. Process ``part`` of ``parts`` (torchrun rank and/or ``--shard-index``) writes
the shards ``s`` with ``s % parts == part``, so processes never touch the same file. A shard file
exists only once complete, so a restart skips finished shards and redoes the ones in flight. Each
image gets its own ``torch.Generator`` seeded from its prompt's seed, so it depends on (model,
prompt, seed, settings), not on its batch, rank or restart.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from synthdistill.config import GenerateConfig
from synthdistill.errors import SynthdistillError
from synthdistill.runtime import DistEnv, derive_seed, dist_env, resolve_device
from synthdistill.shards import (
    INDEX_NAME,
    ShardWriter,
    encode_sample,
    list_shards,
    read_index,
    shard_name,
    write_index,
)
from synthdistill.tiny import TINY_DIFFUSION_NAMES, create_tiny_diffusion_pipeline

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

BLACK_LEVEL = 2 / 255
"""An image with no pixel brighter than this is black: the safety checker's blank or a failed decode."""

OUTPUT_SETTINGS = (
    "model",
    "lora",
    "scheduler",
    "steps",
    "guidance",
    "resolution",
    "negative_prompt",
    "store_size",
    "jpeg_quality",
    "precision",
    "vae",
    "safety_checker",
    "shard_size",
)
"""The settings the shards depend on; batch_size and compile change speed, not images."""


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


@dataclass
class GenerateSummary:
    """What one process did. ``complete`` is about the whole prompts file: every shard exists."""

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


@dataclass
class _Drawn:
    prompt: Prompt
    seed: int
    pixels: np.ndarray | None
    retried: bool


@dataclass
class _Tally:
    written: int = 0
    retried: int = 0
    failed: int = 0


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
    """Read and check prompts.jsonl; a bad line is refused with its line number."""
    path = Path(path)
    if not path.is_file():
        raise SynthdistillError(
            f"Prompts file '{path}' does not exist; write it with `synthdistill prompts`."
        )
    data = path.read_bytes()
    lines = data.decode("utf-8", errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise SynthdistillError(
            f"Prompts file '{path}' holds no prompts; write it with `synthdistill prompts`."
        )
    prompts = []
    for index, line in enumerate(lines):
        try:
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
            f"Cannot load {key} '{name}' ({reason}); pass {local} with --set {key}=PATH, "
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
    if config.lora:
        lora = Path(config.lora)
        with _loading("generate.lora", config.lora, "a local folder or .safetensors file (null: no LoRA)"):
            if lora.is_file():
                pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
            else:
                pipe.load_lora_weights(config.lora)
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
    pipe: DiffusionPipeline, texts: list[str], seeds: list[int], config: GenerateConfig
) -> torch.Tensor:
    """(B, 3, H, W) images in [0, 1] on the pipeline's device (NaN kept), one CPU generator per image.

    CPU generators make the noise, and so the image, the same on any device and in any batch.
    """
    extra: dict[str, Any] = {}
    if config.negative_prompt and config.guidance > 1:
        extra["negative_prompt"] = [config.negative_prompt] * len(texts)
    if config.resolution:
        extra["height"] = extra["width"] = config.resolution
    return pipe(
        prompt=texts,
        num_inference_steps=config.steps,
        guidance_scale=config.guidance,
        generator=[torch.Generator().manual_seed(seed) for seed in seeds],
        output_type="pt",
        **extra,
    ).images


def _draw_batch(pipe: DiffusionPipeline, batch: list[Prompt], config: GenerateConfig) -> list[_Drawn]:
    """Draw a batch; a NaN/black image is drawn once more with a derived seed, then given up (None)."""
    images = _draw(pipe, [p.prompt for p in batch], [p.seed for p in batch], config)
    seeds, retried = [p.seed for p in batch], [False] * len(batch)
    redraw = unusable(images).nonzero().flatten().tolist()
    for i in redraw:
        seeds[i], retried[i] = derive_seed(batch[i].seed, "retry"), True
    if redraw:
        images[redraw] = _draw(pipe, [batch[i].prompt for i in redraw], [seeds[i] for i in redraw], config)
    failed = unusable(images).tolist()
    pixels = to_stored_pixels(images, config.store_size)
    return [
        _Drawn(prompt, seed, None if bad else image, again)
        for prompt, seed, image, again, bad in zip(batch, seeds, pixels, retried, failed, strict=True)
    ]


def _sample_meta(d: _Drawn, config: GenerateConfig) -> dict:
    return {
        "class_index": d.prompt.class_index,
        "class_name": d.prompt.class_name,
        "prompt": d.prompt.prompt,
        "seed": d.seed,
        "retried": d.retried,
        "model": config.model,
        "lora": config.lora,
        "steps": config.steps,
        "guidance": config.guidance,
    }


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
        changed = [key for key in new if old.get(key) != new[key]]
        foreign = bool(changed)
        what = f"shards made from another prompts file or settings (changed: {', '.join(changed)})"
    if foreign and not force:
        raise SynthdistillError(
            f"'{out_dir}' holds {what}; pass --force to replace them, or choose another --out."
        )
    return foreign


def _clear_folder(out_dir: Path) -> None:
    """Remove the shards, their unfinished temporary files and the index of another generation run."""
    for path in [*list_shards(out_dir), *out_dir.glob(".shard-*.tar.tmp-*"), out_dir / INDEX_NAME]:
        path.unlink(missing_ok=True)


def _update_index(out_dir: Path, info: dict, shards_total: int) -> bool:
    """Write index.json; returns whether every shard exists.

    Processes finish in any order and each writes the index: rewriting until the folder did not
    change during the write guarantees that the last writer lists every finished shard.
    """
    expected = {shard_name(i) for i in range(shards_total)}
    while True:
        names = [p.name for p in list_shards(out_dir)]
        complete = expected <= set(names)
        write_index(out_dir, {**info, "complete": complete})
        if [p.name for p in list_shards(out_dir)] == names:
            return complete


def _write_shard(
    pipe: DiffusionPipeline,
    path: Path,
    prompts: list[Prompt],
    config: GenerateConfig,
    tally: _Tally,
    progress: tqdm,
    fail_after: int | None,
) -> None:
    """Draw ``prompts`` in batches into the shard at ``path``, which appears only when complete."""
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # a killed run's (fileio.temporary_name)
        stale.unlink(missing_ok=True)
    with ShardWriter(path) as writer:
        for begin in range(0, len(prompts), config.batch_size):
            for d in _draw_batch(pipe, prompts[begin : begin + config.batch_size], config):
                tally.retried += d.retried
                if d.pixels is None:
                    tally.failed += 1
                else:
                    image = Image.fromarray(d.pixels)
                    writer.write(
                        d.prompt.key, encode_sample(image, _sample_meta(d, config), config.jpeg_quality)
                    )
                    tally.written += 1
                progress.update()
                if fail_after is not None and tally.written >= fail_after:
                    raise KeyboardInterrupt(f"simulated interruption after {tally.written} images")
            if tally.retried:
                progress.set_postfix(retried=tally.retried, failed=tally.failed)


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
    prompts file or settings (refused otherwise). ``pipeline`` reuses an already loaded
    :func:`load_text2image_pipeline` (``config.model`` is still what is recorded). ``fail_after`` is a
    test hook: a KeyboardInterrupt after that many images, as a Ctrl-C would.
    """
    prompts_file = read_prompts(prompts_path)
    prompts, out_dir = prompts_file.prompts, Path(out_dir)
    env = dist_env()
    part, parts = work_part(shard_index, num_shards, env)
    shards_total = math.ceil(len(prompts) / config.shard_size)
    settings = {name: getattr(config, name) for name in OUTPUT_SETTINGS}
    identity = {"prompts_sha256": prompts_file.sha256, "settings": settings}
    # Another run's shards are cleared before the slow model load, so that processes starting
    # together clear them before any of them has written a shard of its own.
    if _check_folder(out_dir, identity, force):
        _clear_folder(out_dir)
    torch_device = resolve_device(device, env)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)  # keeps every torchrun rank's CUDA context off GPU 0
    pipe = pipeline if pipeline is not None else load_text2image_pipeline(config, torch_device)

    out_dir.mkdir(parents=True, exist_ok=True)
    info = {
        "prompts_file": str(prompts_file.path),
        **identity,
        "num_prompts": len(prompts),
        "shards_expected": shards_total,
    }
    _update_index(out_dir, info, shards_total)

    mine = range(part, shards_total, parts)
    todo = [s for s in mine if force or not (out_dir / shard_name(s)).exists()]
    todo_images = sum(len(prompts[s * config.shard_size : (s + 1) * config.shard_size]) for s in todo)
    if torch_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(torch_device)
    tally = _Tally()
    start = time.perf_counter()
    with tqdm(
        total=todo_images,
        unit="img",
        desc=f"generate {part + 1}/{parts}",
        disable=None if env.local_rank == 0 else True,
    ) as progress:
        for shard in todo:
            shard_prompts = prompts[shard * config.shard_size : (shard + 1) * config.shard_size]
            _write_shard(
                pipe, out_dir / shard_name(shard), shard_prompts, config, tally, progress, fail_after
            )
    seconds = time.perf_counter() - start
    complete = _update_index(out_dir, info, shards_total)
    peak = torch.cuda.max_memory_allocated(torch_device) / 2**30 if torch_device.type == "cuda" else None
    return GenerateSummary(
        out_dir=out_dir,
        num_prompts=len(prompts),
        shards_total=shards_total,
        shards_written=len(todo),
        shards_skipped=len(mine) - len(todo),
        images_written=tally.written,
        images_retried=tally.retried,
        images_failed=tally.failed,
        seconds=seconds,
        images_per_second=tally.written / seconds if seconds > 0 else 0.0,
        peak_gpu_memory_gib=peak,
        complete=complete,
    )
