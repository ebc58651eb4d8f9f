"""Stage 3: distil the teacher's image encoder into a small student.

``distill`` reads top to bottom: models, data, optimizer, resume, then one loop over steps. The
loop sees one small interface, :class:`TrainData` (``steps_per_epoch``, ``start_epoch``,
``epoch(e)`` yielding :class:`TrainStep`, ``state_dict``), behind which sit two sources:

- :class:`ShardTrainData`, the run's synthetic shards: replayable augmented views, resumable at any
  batch. With the teacher cache on, epoch e trains on view e mod K with the teacher's stored
  features; without it the teacher embeds view e in the loop.
- :class:`StreamTrainData`, ``distill.train_data`` (WebDataset URLs, a shard folder, an image
  folder) streamed by :mod:`synthdistill.webdata`: random crops made in the data-loader workers,
  the teacher in the loop, captions as the texts of vl/mpc, resumable per shard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import RandomResizedCrop
from tqdm.auto import tqdm

from synthdistill.augment import Augmentation, Batch, ViewDataset, prepare_view, view_loader
from synthdistill.config import DistillConfig, config_hash, hashed_settings
from synthdistill.errors import SynthdistillError
from synthdistill.fileio import temporary_name
from synthdistill.losses import LossSettings, WeightedLoss
from synthdistill.registry import Domain
from synthdistill.runtime import (
    DistEnv,
    autocast,
    barrier,
    derive_seed,
    dist_env,
    init_distributed,
    resolve_device,
)
from synthdistill.shards import ShardSamples, list_shards
from synthdistill.student import CONFIG_NAME, Student, create_student, save_student
from synthdistill.teacher import Preprocessing, Teacher, load_teacher
from synthdistill.teacher_cache import (
    TeacherCache,
    open_or_build_cache,
    shards_fingerprint,
    teacher_features,
)
from synthdistill.webdata import SourceStats, TrainSource, build_train_source, measure_throughput

logger = logging.getLogger(__name__)

LOG_NAME = "train_log.jsonl"


@dataclass
class DistillSummary:
    """What a distillation call did; ``student_dir`` is None when it stopped before the end."""

    student_dir: str | None
    steps: int
    total_steps: int
    epochs: int
    samples: int | None  # per epoch: in the shards, or train_num_samples of streamed data
    final_loss: float | None
    final_cosine: float | None
    images_per_second: float
    corrupt_keys: list[str] = field(default_factory=list)
    resumed_from_step: int | None = None
    teacher_cache: str | None = None
    cache_seconds: float = 0.0  # opening or building the teacher cache
    train_data: str | None = None  # streamed data instead of the run's shards
    corrupt_samples: int = 0  # streamed data: samples skipped as undecodable (all ranks, epochs of this call)
    failed_shards: int = 0  # streamed data: shards that could not be read (all ranks, epochs of this call)

    @property
    def completed(self) -> bool:
        return self.student_dir is not None

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "corrupt_images": len(self.corrupt_keys)}


def open_shards(shards_dir: str | Path | None) -> ShardSamples:
    """The shards of a folder, refused with a clear sentence when missing or empty."""
    if shards_dir is None:
        raise SynthdistillError("No training data: pass --shards DIR (the run's images) or --train-data.")
    shards_dir = Path(shards_dir)
    if not shards_dir.is_dir():
        raise SynthdistillError(
            f"Shards folder '{shards_dir}' does not exist; generate images first (`synthdistill generate`) "
            "or pass --shards."
        )
    shards = list_shards(shards_dir)
    if not shards:
        raise SynthdistillError(
            f"Shards folder '{shards_dir}' holds no shard-*.tar files; generate images first "
            "(`synthdistill generate`)."
        )
    samples = ShardSamples(shards)
    if len(samples) == 0:
        raise SynthdistillError(f"The shards in '{shards_dir}' hold no images; regenerate them.")
    return samples


def class_text_embeddings(teacher: Teacher, domain: Domain | None, samples: ShardSamples) -> torch.Tensor:
    """(C, D) teacher text embeddings of the class prompts (CLIP's template ensemble), for vl/mpc.

    Also checks that the shards were made for these classes (their ``class_name`` metadata).
    """
    if domain is None:
        raise SynthdistillError("Losses vl and mpc need the class names: pass --dataset or --classes.")
    meta = samples[0].meta
    index, name = meta.get("class_index"), meta.get("class_name")
    if (
        index is not None
        and name is not None
        and (index >= domain.num_classes or domain.classnames[index] != name)
    ):
        raise SynthdistillError(
            f"The shards were made for other classes (sample '{samples.key(0)}' is '{name}', class {index}) "
            f"than '{domain.name}'; pass the dataset or class file they were generated from."
        )
    return teacher.build_zero_shot_head(domain.classnames, domain.templates).T.contiguous()


def caption_texts(teacher: Teacher, captions: list[str], precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's captions as the texts of vl/mpc: (B,) index of each image's caption among the
    distinct ones, and their (C, D) L2-normalised teacher embeddings, computed in this step.

    Identical captions become one text, as images of one class share the class text: mpc counts
    them as positives of each other; vl keeps image i's own caption as its only positive.
    """
    distinct = list(dict.fromkeys(captions))
    index = {caption: i for i, caption in enumerate(distinct)}
    labels = torch.tensor([index[caption] for caption in captions], device=teacher.device)
    with autocast(teacher.device, precision):
        return labels, teacher.encode_texts(distinct)


class Distiller(nn.Module):
    """Student and loss as one module, so DDP also syncs a learnable temperature's gradient."""

    def __init__(self, student: Student, loss: WeightedLoss, class_text: torch.Tensor | None):
        super().__init__()
        self.student, self.loss = student, loss
        self.register_buffer("class_text", class_text, persistent=False)

    def forward(
        self,
        images: torch.Tensor,
        teacher_features: torch.Tensor,
        labels: torch.Tensor | None,
        texts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (scalar loss, (B, D) fp32 student features). The loss is computed in fp32.

        ``texts`` (C, D), the batch's caption embeddings, replace the class texts for vl/mpc;
        ``labels`` index the texts of either kind.
        """
        student_features = self.student.forward_features(images).float()
        with torch.autocast(images.device.type, enabled=False):
            class_text = self.class_text if texts is None else texts
            loss = self.loss(student_features, teacher_features, labels, class_text)
        return loss, student_features


# ----------------------------------------------------------------------------- training data


@dataclass
class TrainStep:
    """What one optimisation step trains on, whichever source it came from (tensors on the device)."""

    images: torch.Tensor  # (B, 3, S, S) the student's input
    targets: torch.Tensor  # (B, D) the teacher's image features of the same crops, not normalised
    labels: torch.Tensor | None  # (B,) each image's text: class index, or caption index into ``texts``
    texts: torch.Tensor | None  # (C, D) the batch's caption embeddings; None: the class texts
    keys: list[str]
    corrupt_keys: list[str] = field(default_factory=list)  # dropped from this batch: did not decode
    padding: bool = False  # a repeat that keeps this rank in step: trained on, not new images

    def __len__(self) -> int:
        return len(self.keys)


class TrainData(Protocol):
    """What the loop needs of its data, on each rank. Under DDP every rank yields the same number
    of steps per epoch, and ``state_dict`` / ``epoch_stats`` are collectives (all ranks call them)."""

    identity: str  # names the data and its split for the run hash: a checkpoint resumes only on the same

    @property
    def steps_per_epoch(self) -> int: ...

    @property
    def start_epoch(self) -> int: ...

    def epoch(self, epoch: int) -> Iterator[TrainStep]:
        """The steps of ``epoch``; after :meth:`load_state_dict`, its epoch goes on where it stopped."""
        ...

    def state_dict(self) -> dict:
        """Where the data stands after the steps yielded so far (JSON-able, for a checkpoint)."""
        ...

    def load_state_dict(self, state: dict) -> None: ...

    def epoch_stats(self) -> SourceStats | None:
        """The counters of the epoch just finished, over all ranks (None: the source keeps none)."""
        ...


@dataclass
class ShardViewSource:
    """The map-style data source: a seeded permutation per epoch, split across ranks like
    DistributedSampler (padded so every rank takes the same number of steps), in batches of
    (sample index, view index). The incomplete last batch is dropped when there is a full one."""

    dataset: ViewDataset
    local_batch: int
    seed: int
    views: int | None  # K with the teacher cache (view = epoch mod K); None: a fresh view each epoch
    env: DistEnv
    workers: int = 0
    pin_memory: bool = False

    @property
    def per_rank(self) -> int:
        return math.ceil(len(self.dataset) / self.env.world_size)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.per_rank // self.local_batch)

    def loader(
        self, epoch: int, first_batch: int = 0, end_batch: int | None = None
    ) -> torch.utils.data.DataLoader:
        """Batches ``first_batch`` to ``end_batch`` (exclusive) of ``epoch``: a resume starts mid-epoch."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "order", epoch))
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        padded = (order * self.env.world_size)[: self.per_rank * self.env.world_size]
        mine = padded[self.env.rank :: self.env.world_size]
        view = epoch % self.views if self.views else epoch
        batches = [
            [(index, view) for index in mine[b * self.local_batch : (b + 1) * self.local_batch]]
            for b in range(first_batch, self.steps_per_epoch if end_batch is None else end_batch)
        ]
        return view_loader(self.dataset, batches, self.workers, self.pin_memory)


class ShardTrainData:
    """The run's synthetic shards as :class:`TrainData`: the views of :class:`ShardViewSource`, with the
    teacher's features from the cache or from the teacher in the loop (on the last prepared input)."""

    def __init__(
        self,
        views: ShardViewSource,
        identity: str,
        device: torch.device,
        precision: str,
        *,
        cache: TeacherCache | None,
        teacher: Teacher | None,
        num_classes: int | None,
    ):
        self.views, self.identity, self.device, self.precision = views, identity, device, precision
        self.cache, self.teacher, self.num_classes = cache, teacher, num_classes
        self.position = (0, 0)  # (epoch, its batches done)

    @property
    def steps_per_epoch(self) -> int:
        return self.views.steps_per_epoch

    @property
    def start_epoch(self) -> int:
        return self.position[0]

    def epoch(self, epoch: int) -> Iterator[TrainStep]:
        first = self.position[1] if epoch == self.position[0] else 0
        for done, batch in enumerate(self.views.loader(epoch, first), start=first + 1):
            check_batch(batch, epoch * self.steps_per_epoch + done, self.num_classes)
            if self.cache is not None:
                targets = self.cache.lookup(batch.views, batch.indices).to(self.device, non_blocking=True)
            else:
                targets = teacher_features(self.teacher, batch.inputs[-1], self.precision)
            self.position = (epoch, done) if done < self.steps_per_epoch else (epoch + 1, 0)
            yield TrainStep(
                images=batch.inputs[0].to(self.device, non_blocking=True),
                targets=targets,
                labels=batch.labels.to(self.device, non_blocking=True),
                texts=None,
                keys=batch.keys,
                corrupt_keys=batch.corrupt_keys,
            )
        self.position = (epoch + 1, 0)

    def state_dict(self) -> dict:
        return {"epoch": self.position[0], "batch": self.position[1]}

    def load_state_dict(self, state: dict) -> None:
        self.position = (int(state["epoch"]), int(state["batch"]))

    def epoch_stats(self) -> None:
        return None


@dataclass(frozen=True)
class RandomCrop:
    """open_clip's training transform for streamed images: RandomResizedCrop at area scale
    (scale_min, 1) and the views' aspect range, resized with the preprocessing's interpolation
    (bicubic) and normalised with its (CLIP's) mean/std. RGB image -> (3, S, S).

    The box comes from torch's RNG, which the data loader seeds per worker from the stream's
    seed (per seed, epoch, rank): a seed gives the same crops. Picklable, for the workers.
    """

    preprocessing: Preprocessing
    scale_min: float

    def __call__(self, image: Image.Image) -> torch.Tensor:
        box = RandomResizedCrop.get_params(image, [self.scale_min, 1.0], list(Augmentation.ratio))
        return prepare_view(image, box, self.preprocessing)


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, H) -> (B, 3, size, size), bicubic with antialiasing; as is when already that size."""
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)


class StreamTrainData:
    """Streamed ``distill.train_data`` as :class:`TrainData`: crops made in the data-loader workers
    at the larger of the two models' input sizes, the teacher's features (and, for vl/mpc, its
    embeddings of the captions) computed in the step. Resumes per shard (see :mod:`synthdistill.webdata`).
    """

    def __init__(
        self, source: TrainSource, teacher: Teacher, image_size: int, precision: str, needs_text: bool
    ):
        if source.batches_per_epoch is None:
            raise SynthdistillError(
                f"Pass --train-num-samples (the samples of an epoch of '{source.spec}'): the learning-rate "
                "schedule and the ETA count steps."
            )
        self.source, self.teacher, self.image_size = source, teacher, image_size
        self.precision, self.needs_text = precision, needs_text
        self.identity = source.fingerprint  # any number of ranks resumes it: the rest is split anew

    @property
    def steps_per_epoch(self) -> int:
        return self.source.batches_per_epoch

    @property
    def start_epoch(self) -> int:
        return self.source.start_epoch

    def epoch(self, epoch: int) -> Iterator[TrainStep]:
        device = self.teacher.device
        for batch in self.source.epoch(epoch):
            images = batch.images.to(device, non_blocking=True)
            targets = teacher_features(
                self.teacher, resize_square(images, self.teacher.preprocessing.image_size), self.precision
            )
            labels, texts = (
                caption_texts(self.teacher, batch.texts, self.precision) if self.needs_text else (None, None)
            )
            yield TrainStep(
                images=resize_square(images, self.image_size),
                targets=targets,
                labels=labels,
                texts=texts,
                keys=batch.keys,
                padding=batch.padding,
            )

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)

    def epoch_stats(self) -> SourceStats:
        return self.source.reduce_stats()


def open_stream_data(
    config: DistillConfig,
    teacher: Teacher,
    student: Student,
    needs_text: bool,
    seed: int,
    env: DistEnv,
    device: torch.device,
) -> StreamTrainData:
    """``config.train_data`` for this rank (call it after joining the process group: it may make one)."""
    image_size = student.config.preprocessing.image_size
    crop = dataclasses.replace(
        student.config.preprocessing, image_size=max(image_size, teacher.preprocessing.image_size)
    )
    source = build_train_source(
        config.train_data,
        batch_size=config.batch_size // env.world_size,
        transform=RandomCrop(crop, config.aug_scale_min),
        num_samples=config.train_num_samples,
        rank=env.rank,
        world_size=env.world_size,
        num_workers=config.workers,
        seed=seed,
        resampled=config.resampled,
        shuffle_buffer=config.shuffle_buffer,
        need_text=needs_text,
        pin_memory=device.type == "cuda",
    )
    return StreamTrainData(source, teacher, image_size, config.precision, needs_text)


def train_steps(
    data: TrainData, epochs: int, log: TrainLog, step: int, stop_step: int | None
) -> Iterator[tuple[int, int, TrainStep]]:
    """(step number, epoch, batch) from where ``data`` stands to the end of ``epochs``, or up to step
    ``stop_step``; logs the data counters of every epoch it finishes. Nothing is drawn past a stop."""
    if stop_step is not None and step >= stop_step:
        return
    for epoch in range(data.start_epoch, epochs):
        for batch in data.epoch(epoch):
            step += 1
            yield step, epoch, batch
            if step == stop_step:
                return
        log.epoch_end(epoch, step, data.epoch_stats())


def make_optimizer(module: nn.Module, config: DistillConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; as in CLIP training, biases, norms and the temperature (1-D tensors) get no weight decay."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, fused=device.type == "cuda")


def lr_factor(step: int, config: DistillConfig, total_steps: int) -> float:
    """Linear warm-up, then constant (the paper) or cosine decay to zero."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "cosine":
        progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


class Checkpoints:
    """``step-NNNNNNNN/`` folders (weights.safetensors + state.pt); the newest is the resume point.

    A folder is written under a hidden name and renamed when complete; older ones are then removed.
    """

    def __init__(self, directory: Path, run_hash: str):
        self.directory, self.run_hash = Path(directory), run_hash

    def latest(self) -> Path | None:
        found = sorted(self.directory.glob("step-*")) if self.directory.is_dir() else []
        return found[-1] if found else None

    def clear(self) -> None:
        for path in self.directory.glob("step-*") if self.directory.is_dir() else []:
            shutil.rmtree(path)

    def save(self, step: int, distiller: Distiller, optimizer, scheduler, state: dict) -> Path:
        from safetensors.torch import save_file

        final = self.directory / f"step-{step:08d}"
        tmp = temporary_name(final)
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            weights = {k: v.detach().cpu().contiguous() for k, v in distiller.state_dict().items()}
            save_file(weights, str(tmp / "weights.safetensors"))
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save(
                {
                    **state,
                    "step": step,
                    "run_hash": self.run_hash,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": rng,
                },
                tmp / "state.pt",
            )
        except BaseException:  # an interrupted save leaves no hidden half checkpoint
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for older in self.directory.glob("step-*"):
            if older != final:
                shutil.rmtree(older)
        return final

    def load(self, path: Path, distiller: Distiller, optimizer, scheduler, device: torch.device) -> dict:
        """Restore weights, optimizer and scheduler; return the saved state (step, rng, ...)."""
        from safetensors.torch import load_file

        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        if state["run_hash"] != self.run_hash:
            raise SynthdistillError(
                f"The checkpoint '{path}' was made under another config, other training data or (on the "
                "run's shards) another number of processes; rerun with --no-resume to start over, or "
                "choose another --out."
            )
        distiller.load_state_dict(load_file(str(path / "weights.safetensors"), device=str(device)))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        return state


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


class TrainLog:
    """``train_log.jsonl`` (and TensorBoard when installed), written by rank 0.

    Sums loss, cosine and images between log lines on every rank; a line averages them over ranks
    and gives the throughput (new images: padding batches are trained on but not counted).
    """

    def __init__(self, path: Path, env: DistEnv, device: torch.device, fresh: bool, corrupt_keys: list[str]):
        self.env, self.path = env, path
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss * n, cosine, n, new images
        self.corrupt_keys = list(corrupt_keys)  # every rank's, as of the last line
        self.unlogged_corrupt: list[str] = []  # this rank's since then
        self.data_stats = SourceStats()  # streamed data: the epochs finished in this call, all ranks
        self.started = time.perf_counter()
        self.last: dict = {}
        self.images = 0  # new images trained on, all ranks
        self.tensorboard = None
        if env.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            if fresh:
                path.unlink(missing_ok=True)
            with contextlib.suppress(ImportError):
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(path.parent / "tensorboard"))

    def event(self, **record) -> None:
        if self.env.is_main:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def add(self, batch: TrainStep, loss: torch.Tensor, cosine_sum: torch.Tensor) -> None:
        self.sums[0] += loss.detach() * len(batch)
        self.sums[1] += cosine_sum.detach()
        self.sums[2] += len(batch)
        self.sums[3] += 0 if batch.padding else len(batch)
        self.unlogged_corrupt += batch.corrupt_keys

    def write(self, step: int, epoch: int, lr: float, remaining_images: int) -> dict:
        """One line: the averages since the last one, the throughput and ETA (``remaining_images``
        over all ranks), and the corrupt images met since (named once)."""
        for key in gather_keys(self.unlogged_corrupt, self.env):
            if key not in self.corrupt_keys:
                self.corrupt_keys.append(key)
                logger.warning("skipped sample '%s': its image does not decode", key)
                self.event(event="corrupt_image", step=step, key=key)
        self.unlogged_corrupt = []
        if self.env.is_distributed:
            torch.distributed.all_reduce(self.sums)
        loss_sum, cosine_sum, count, new_images = self.sums.tolist()
        rate = measure_throughput(
            new_images / self.env.world_size,
            time.perf_counter() - self.started,
            self.env.world_size,
            remaining_images,
        )
        self.last = {
            "step": step,
            "epoch": epoch,
            "loss": loss_sum / count,
            "lr": lr,
            "images_per_s": rate.total,
            "images_per_s_per_gpu": rate.per_gpu,
            "eta_s": rate.eta_seconds,
            "cosine": cosine_sum / count,
        }
        self.event(**self.last)
        if self.tensorboard is not None:
            for name in ("loss", "lr", "images_per_s", "cosine"):
                self.tensorboard.add_scalar(f"train/{name}", self.last[name], step)
        self.images += int(new_images)
        self.sums.zero_()
        self.started = time.perf_counter()
        return self.last

    def epoch_end(self, epoch: int, step: int, stats: SourceStats | None) -> None:
        """A line per finished epoch; with streamed data, its counters summed over ranks."""
        record = {"event": "epoch_end", "epoch": epoch, "step": step}
        if stats is not None:
            self.data_stats = self.data_stats + stats
            record.update(dataclasses.asdict(stats))
            if (stats.corrupt or stats.shards_failed) and self.env.is_main:
                logger.warning(
                    "epoch %d: skipped %d samples that do not decode and %d shards that could not be read",
                    epoch,
                    stats.corrupt,
                    stats.shards_failed,
                )
        self.event(**record)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def gather_keys(keys: list[str], env: DistEnv) -> list[str]:
    """Every rank's keys, on every rank."""
    if not env.is_distributed:
        return keys
    gathered: list[list[str]] = [[] for _ in range(env.world_size)]
    torch.distributed.all_gather_object(gathered, keys)
    return [key for rank_keys in gathered for key in rank_keys]


@contextlib.contextmanager
def process_group(env: DistEnv, device: torch.device) -> Iterator[None]:
    """Join torchrun's process group for the call (unless a caller, e.g. the pipeline, already did)."""
    owned = env.is_distributed and not torch.distributed.is_initialized()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_distributed(env, device)
    try:
        yield
    finally:
        if owned:
            torch.distributed.destroy_process_group()


def non_finite_error(
    loss: float, step: int, epoch: int, batch: TrainStep, checkpoint: Path | None
) -> SynthdistillError:
    shown = ", ".join(batch.keys[:16]) + (f" and {len(batch.keys) - 16} more" if len(batch.keys) > 16 else "")
    kept = f"the last good checkpoint is '{checkpoint}'" if checkpoint else "no checkpoint was written yet"
    return SynthdistillError(
        f"The loss became {loss} at step {step} (epoch {epoch}) on samples {shown}; {kept}: lower "
        "distill.lr or check those images, then rerun to resume."
    )


def build_student(config: DistillConfig, teacher: Teacher, seed: int) -> Student:
    """The student with its projection head to the teacher's width; the same init on every rank."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "student"))
        return create_student(
            config.student,
            teacher.embed_dim,
            head=config.head,
            pretrained=config.student_pretrained,
            preprocessing=teacher.preprocessing,
            image_size=config.image_size,
            teacher=config.teacher,
            teacher_pretrained=config.teacher_pretrained,
        )


def run_hash(config: DistillConfig, seed: int, data_id: str) -> str:
    """What a checkpoint must share with this call to be resumed: the settings that change training,
    and the data (``TrainData.identity``)."""
    return config_hash(hashed_settings(config), seed, data_id)


def check_batch(batch: Batch, step: int, num_classes: int | None) -> None:
    """Refuse a batch with no decodable image, or (for vl/mpc) a sample without a class of the domain."""
    if not len(batch):
        raise SynthdistillError(
            f"No image of the batch at step {step} decodes ({', '.join(batch.corrupt_keys[:8])}, ...): "
            "the shards look damaged; regenerate them."
        )
    if num_classes is not None and not bool(((batch.labels >= 0) & (batch.labels < num_classes)).all()):
        bad = batch.keys[int(((batch.labels < 0) | (batch.labels >= num_classes)).int().argmax())]
        raise SynthdistillError(
            f"Sample '{bad}' has no class index of this domain; vl and mpc need shards made for its classes."
        )


def distill(
    shards_dir: Path | None,
    out_dir: Path,
    config: DistillConfig,
    *,
    domain: Domain | None = None,
    seed: int = 0,
    device: str = "auto",
    checkpoint_dir: Path | None = None,
    cache_dir: Path | None = None,
    stop_after_steps: int | None = None,
    resume: bool = True,
) -> DistillSummary:
    """Train a student to reproduce the teacher's image embeddings on the shards in ``shards_dir``,
    or, when ``config.train_data`` is set, on that streamed data (``shards_dir`` is then unused).

    Writes ``out_dir/train_log.jsonl`` during training and the student (``model.safetensors``,
    then ``config.json``) at the end. Checkpoints go to ``checkpoint_dir`` (default
    ``out_dir/../checkpoints``) and a run under the same settings resumes from the newest one
    unless ``resume=False``. ``stop_after_steps`` ends the call early after a checkpoint at that
    step (a planned interruption). Under torchrun every rank calls this; only rank 0 writes.
    """
    env = dist_env()
    device = resolve_device(device, env)
    out_dir = Path(out_dir)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else out_dir.parent / "checkpoints"
    with process_group(env, device):
        if config.batch_size % env.world_size:
            raise SynthdistillError(
                f"distill.batch_size ({config.batch_size}) must be a multiple of the number of "
                f"processes ({env.world_size})."
            )
        samples = None if config.train_data else open_shards(shards_dir)

        # Models: the frozen teacher, the student, the loss (vl/mpc on shards also need the class texts).
        teacher = load_teacher(config.teacher, config.teacher_pretrained, device)
        student = build_student(config, teacher, seed)
        loss = WeightedLoss(
            config.loss, LossSettings(config.fd_variant, teacher.logit_scale, config.learnable_temperature)
        )
        needs_class_text = samples is not None and loss.needs_text
        class_text = class_text_embeddings(teacher, domain, samples) if needs_class_text else None
        distiller = Distiller(student, loss, class_text).to(device)

        # Data: streamed train_data with the teacher in the loop, or replayable views of the shards
        # with the teacher's features from the cache or from the teacher in the loop.
        cache, cache_started = None, time.perf_counter()
        if config.train_data:
            data = open_stream_data(config, teacher, student, loss.needs_text, seed, env, device)
        else:
            augmentation = Augmentation(seed, config.aug_scale_min)
            shards_id = shards_fingerprint(samples.shards)
            inputs = [student.config.preprocessing]
            if config.cache_teacher:
                teacher_views = ViewDataset(samples, augmentation, [teacher.preprocessing])
                cache = open_or_build_cache(
                    Path(cache_dir) if cache_dir else Path(shards_dir).parent / "teacher_cache",
                    teacher,
                    teacher_views,
                    config.cache_views,
                    config.precision,
                    shards_id,
                    env=env,
                    batch_size=config.batch_size // env.world_size,
                    workers=config.workers,
                    dtype=config.cache_dtype,
                )
                teacher = None  # its work is done: free its memory
            elif teacher.preprocessing != inputs[0]:
                inputs.append(teacher.preprocessing)  # the teacher sees the same crop at its own size
            views = ShardViewSource(
                ViewDataset(samples, augmentation, inputs),
                local_batch=config.batch_size // env.world_size,
                seed=seed,
                views=cache.views if cache else None,
                env=env,
                workers=config.workers,
                pin_memory=device.type == "cuda",
            )
            data = ShardTrainData(
                views,
                f"{shards_id} on {env.world_size} processes",  # the views are split by rank
                device,
                config.precision,
                cache=cache,
                teacher=teacher,
                num_classes=len(class_text) if class_text is not None else None,
            )
        cache_seconds = time.perf_counter() - cache_started
        total_steps = config.epochs * data.steps_per_epoch

        # Optimizer, schedule and data position, restored from the newest checkpoint of this same run.
        optimizer = make_optimizer(distiller, config, device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config, total_steps))
        checkpoints = Checkpoints(checkpoint_dir, run_hash(config, seed, data.identity))
        latest = checkpoints.latest() if resume else None
        state = checkpoints.load(latest, distiller, optimizer, scheduler, device) if latest else {}
        if latest:
            data.load_state_dict(state["data"])
        step = start_step = saved_step = state.get("step", 0)
        if env.is_main:
            if not latest:
                checkpoints.clear()
            (out_dir / CONFIG_NAME).unlink(missing_ok=True)  # the folder must not look finished
        if latest and env.is_main:
            restore_rng(state["rng"])
        else:
            torch.manual_seed(derive_seed(seed, "train", env.rank, step))
        model = distiller
        if env.is_distributed:
            model = nn.parallel.DistributedDataParallel(
                distiller, device_ids=[device.index] if device.type == "cuda" else None
            )
        if config.compile:
            model = torch.compile(model)
        log = TrainLog(
            out_dir / LOG_NAME, env, device, fresh=not latest, corrupt_keys=state.get("corrupt_keys", [])
        )
        log.event(
            event="start",
            step=step,
            total_steps=total_steps,
            world_size=env.world_size,
            train_data=config.train_data,
        )

        def write_log(epoch: int) -> None:
            """A log line (a collective under DDP), echoed in the progress bar."""
            remaining = max(total_steps - step, 0) * config.batch_size
            line = log.write(step, epoch, scheduler.get_last_lr()[0], remaining)
            progress.set_postfix(
                loss=f"{line['loss']:.4f}", cos=f"{line['cosine']:.4f}", img_s=f"{line['images_per_s']:.0f}"
            )

        def save_checkpoint(epoch: int) -> None:
            """Log, then every rank reports the data position (a collective) and rank 0 writes."""
            nonlocal saved_step
            if log.last.get("step") != step:
                write_log(epoch)
            position = {"data": data.state_dict(), "corrupt_keys": log.corrupt_keys}
            if env.is_main:
                checkpoints.save(step, distiller, optimizer, scheduler, position)
            saved_step = step

        # The loop: one optimisation step per batch.
        distiller.train()
        progress = tqdm(total=total_steps, initial=step, unit="step", disable=None if env.is_main else True)
        started, epoch = time.perf_counter(), data.start_epoch
        for step, epoch, batch in train_steps(data, config.epochs, log, start_step, stop_after_steps):
            with autocast(device, config.precision):
                batch_loss, student_features = model(batch.images, batch.targets, batch.labels, batch.texts)
            optimizer.zero_grad(set_to_none=True)
            batch_loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(distiller.parameters(), config.grad_clip or math.inf)
            if not bool(torch.isfinite(batch_loss.detach()) & torch.isfinite(grad_norm)):
                log.event(event="non_finite_loss", step=step, keys=batch.keys)
                raise non_finite_error(batch_loss.item(), step, epoch, batch, checkpoints.latest())
            optimizer.step()
            scheduler.step()

            cosine = F.cosine_similarity(student_features.detach(), batch.targets, dim=-1)
            log.add(batch, batch_loss, cosine.sum())
            if step % config.checkpoint_every == 0:
                save_checkpoint(epoch)
            elif step % config.log_every == 0:
                write_log(epoch)
            progress.update()
        if step > saved_step:
            save_checkpoint(epoch)  # where this call ends, finished or stopped
        progress.close()
        elapsed = time.perf_counter() - started

        finished = data.start_epoch >= config.epochs
        if finished and env.is_main:
            save_student(student, out_dir)  # config.json last: its presence means complete
        log.event(event="end" if finished else "stopped", step=step)
        log.close()
        barrier(env)
        return DistillSummary(
            student_dir=str(out_dir) if finished else None,
            steps=step,
            total_steps=total_steps,
            epochs=config.epochs,
            samples=data.source.num_samples if samples is None else len(samples),
            final_loss=log.last.get("loss"),
            final_cosine=log.last.get("cosine"),
            images_per_second=log.images / elapsed if step > start_step else 0.0,
            corrupt_keys=log.corrupt_keys,
            resumed_from_step=start_step if latest else None,
            teacher_cache=str(cache.path) if cache else None,
            cache_seconds=cache_seconds,
            train_data=config.train_data,
            corrupt_samples=log.data_stats.corrupt,
            failed_shards=log.data_stats.shards_failed,
        )
