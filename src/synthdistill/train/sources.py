"""The training data behind one interface, :class:`TrainData`: what the loop iterates, checkpoints
and resumes, whichever source the images come from.

- :class:`ShardTrainData`, the run's synthetic shards: replayable augmented views, resumable at any
  batch. The images come decoded from :mod:`synthdistill.data.decoded` (``distill.input=decoded``)
  or decoded by data-loader workers (``workers``); either way uint8 batches are augmented on the
  device by the one implementation in :mod:`synthdistill.data.augment`, so both give the same
  tensors. With the teacher cache on, epoch e trains on view e mod K with the teacher's stored
  features; without it the teacher embeds view e in the loop.
- :class:`StreamTrainData`, ``distill.train_data`` (WebDataset URLs, a shard folder, an image
  folder) streamed by :mod:`synthdistill.data.stream`: random uint8 crops made in the data-loader
  workers (or, ``distill.stream_decode=device``, the JPEGs decoded and cropped on the device, see
  :mod:`synthdistill.data.encoded`), normalised on the device, the teacher in the loop, captions as
  the texts of vl/mpc, resumable per shard.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from synthdistill.config import DistillConfig
from synthdistill.data.augment import (
    Augmentation,
    Batch,
    EpochBatches,
    ViewDataset,
    augment,
    view_loader,
)
from synthdistill.data.decoded import DecodedImages
from synthdistill.data.encoded import EncodedImages, decode_crops
from synthdistill.data.stream import SourceStats, TrainBatch, TrainSource, build_train_source
from synthdistill.errors import SynthdistillError, setting
from synthdistill.losses import caption_ids
from synthdistill.registry import Domain
from synthdistill.runtime import DistEnv, autocast, derive_seed
from synthdistill.shards import ShardSamples, list_shards
from synthdistill.student import Student
from synthdistill.teacher import Preprocessing, Teacher
from synthdistill.train.teacher_cache import TeacherCache, teacher_features

ItemBatches = Sequence[Sequence[tuple[int, int]]]  # batches of (sample index, view index)


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


# ----------------------------------------------------------------------------- the interface


@dataclass
class TrainStep:
    """What one optimisation step trains on, whichever source it came from (tensors on the device)."""

    images: torch.Tensor  # (B, 3, S, S) the student's input
    targets: torch.Tensor  # (B, D) the teacher's image features of the same crops, not normalised
    labels: torch.Tensor | None  # (B,) each image's text: class index, or caption index into ``texts``
    texts: torch.Tensor | None  # (C, D) the batch's caption embeddings; None: the class texts
    keys: list[str]
    text_ids: torch.Tensor | None = None  # (B,) captions: equal ids for equal captions on every rank
    corrupt_keys: list[str] = field(default_factory=list)  # dropped from this batch: did not decode
    padding: bool = False  # a repeat that keeps this rank in step: trained on, not new images

    def __len__(self) -> int:
        return len(self.keys)


class TrainData(Protocol):
    """What the loop needs of its data, on each rank. Under DDP every rank yields the same number
    of steps per epoch, and ``state_dict`` / ``epoch_stats`` are collectives (all ranks call them)."""

    identity: str  # names the data and its split for the run hash: a checkpoint resumes only on the same
    input: str  # how the images reach the device: decoded, workers, stream or stream-device-decode (logged)

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


# ----------------------------------------------------------------------------- the run's shards


@dataclass
class ShardViewSource:
    """The order of the shards' views: a seeded permutation per epoch, split across ranks like
    DistributedSampler (padded so every rank takes the same number of steps), in batches of
    (sample index, view index). The incomplete last batch is dropped when there is a full one."""

    num_samples: int
    local_batch: int
    seed: int
    views: int | None  # K with the teacher cache (view = epoch mod K); None: a fresh view each epoch
    env: DistEnv

    @property
    def per_rank(self) -> int:
        return math.ceil(self.num_samples / self.env.world_size)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.per_rank // self.local_batch)

    def batches(self, epoch: int, first_batch: int = 0, end_batch: int | None = None) -> list[list[tuple]]:
        """Batches ``first_batch`` to ``end_batch`` (exclusive) of ``epoch``: a resume starts mid-epoch."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "order", epoch))
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        padded = (order * self.env.world_size)[: self.per_rank * self.env.world_size]
        mine = padded[self.env.rank :: self.env.world_size]
        view = epoch % self.views if self.views else epoch
        return [
            [(index, view) for index in mine[b * self.local_batch : (b + 1) * self.local_batch]]
            for b in range(first_batch, self.steps_per_epoch if end_batch is None else end_batch)
        ]


class WorkerImages:
    """Images decoded from the shards by data-loader workers, as uint8 batches (one loader, whose
    workers persist across epochs)."""

    def __init__(self, samples: ShardSamples, workers: int, pin_memory: bool):
        self.sampler = EpochBatches()
        self.loader = view_loader(ViewDataset(samples), self.sampler, workers, pin_memory)

    def batches(self, items: ItemBatches, device: torch.device) -> Iterator[Batch]:
        self.sampler.batches = [list(batch) for batch in items]
        for batch in self.loader:
            yield batch.to(device)


class DecodedBatches:
    """Images from the decoded store (see :mod:`synthdistill.data.decoded`), as uint8 batches."""

    def __init__(self, store: DecodedImages):
        self.store = store

    def batches(self, items: ItemBatches, device: torch.device) -> Iterator[Batch]:
        for batch in items:
            yield self.store.batch(list(batch), device)


def prefetched(batches: Iterator[Batch], device: torch.device) -> Iterator[Batch]:
    """On CUDA, the next batch is gathered and copied on a side stream while the current one trains."""
    if device.type != "cuda":
        yield from batches
        return
    side, main = torch.cuda.Stream(device), torch.cuda.current_stream(device)

    def load() -> Batch | None:
        with torch.cuda.stream(side):
            return next(batches, None)

    upcoming = load()
    while upcoming is not None:
        main.wait_stream(side)
        for tensor in (upcoming.images, upcoming.labels):
            tensor.record_stream(main)
        current, upcoming = upcoming, load()
        yield current


class ShardTrainData:
    """The run's synthetic shards as :class:`TrainData`: the views of :class:`ShardViewSource`, with the
    teacher's features from the cache or from the teacher in the loop (on the last prepared input)."""

    def __init__(
        self,
        order: ShardViewSource,
        images: WorkerImages | DecodedBatches,
        augmentation: Augmentation,
        inputs: Sequence[Preprocessing],
        identity: str,
        device: torch.device,
        precision: str,
        *,
        cache: TeacherCache | None,
        teacher: Teacher | None,
        num_classes: int | None,
    ):
        self.order, self.images, self.augmentation, self.inputs = order, images, augmentation, list(inputs)
        self.identity, self.device, self.precision = identity, device, precision
        self.cache, self.teacher, self.num_classes = cache, teacher, num_classes
        self.input = "decoded" if isinstance(images, DecodedBatches) else "workers"
        self.position = (0, 0)  # (epoch, its batches done)

    @property
    def steps_per_epoch(self) -> int:
        return self.order.steps_per_epoch

    @property
    def start_epoch(self) -> int:
        return self.position[0]

    def epoch(self, epoch: int) -> Iterator[TrainStep]:
        first = self.position[1] if epoch == self.position[0] else 0
        batches = prefetched(self.images.batches(self.order.batches(epoch, first), self.device), self.device)
        for done, batch in enumerate(batches, start=first + 1):
            check_batch(batch, epoch * self.steps_per_epoch + done, self.num_classes)
            views = augment(batch, self.augmentation, self.inputs)
            if self.cache is not None:
                targets = self.cache.lookup(batch.views, batch.indices).to(self.device, non_blocking=True)
            else:
                targets = teacher_features(self.teacher, views[-1], self.precision)
            self.position = (epoch, done) if done < self.steps_per_epoch else (epoch + 1, 0)
            yield TrainStep(
                images=views[0],
                targets=targets,
                labels=batch.labels,
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


# ----------------------------------------------------------------------------- streamed data


@dataclass(frozen=True)
class RandomCrop:
    """open_clip's training crop for streamed images: RandomResizedCrop at area ``scale`` and aspect
    ``ratio``, resized with ``interpolation`` to ``size``. RGB image -> (3, S, S) uint8 (normalised
    on the device).

    The box comes from torch's RNG, which the data loader seeds per worker from the stream's
    seed (per seed, epoch, rank): a seed gives the same crops. Picklable, for the workers.
    :meth:`box` alone needs only the image's size (its header), for the device-decode path.
    """

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    interpolation: str

    def box(self, image: Image.Image) -> tuple[int, int, int, int]:
        """(top, left, height, width) of a random crop of ``image``, drawn from torch's RNG."""
        return RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        top, left, height, width = self.box(image)
        resample = Image.BICUBIC if self.interpolation == "bicubic" else Image.BILINEAR
        crop = image.resize((self.size, self.size), resample, box=(left, top, left + width, top + height))
        return torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1)


def normalise(images: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """(B, 3, S, S) uint8 -> float with the model's mean and std (on the images' device)."""
    mean = torch.tensor(preprocessing.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, H) -> (B, 3, size, size), bicubic with antialiasing; as is when already that size."""
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)


class StreamTrainData:
    """Streamed ``distill.train_data`` as :class:`TrainData`: crops made in the data-loader workers
    at the larger of the two models' input sizes, the teacher's features (and, for vl/mpc, its
    embeddings of the captions) computed in the step. Resumes per shard (see :mod:`synthdistill.data.stream`).

    ``device_crop``: the source is ``encoded``; its batches are decoded on the teacher's device and
    cropped there to ``device_crop``'s size and interpolation (the boxes came with them).
    """

    def __init__(
        self,
        source: TrainSource,
        teacher: Teacher,
        image_size: int,
        precision: str,
        needs_text: bool,
        device_crop: RandomCrop | None = None,
    ):
        if source.batches_per_epoch is None:
            raise SynthdistillError(
                f"Pass {setting('distill.train_num_samples', 'N')} (the samples of an epoch of "
                f"'{source.spec}'): the learning-rate "
                "schedule and the ETA count steps."
            )
        self.source, self.teacher, self.image_size = source, teacher, image_size
        self.precision, self.needs_text, self.device_crop = precision, needs_text, device_crop
        self.input = "stream" if device_crop is None else "stream-device-decode"
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
            if isinstance(batch.images, EncodedImages):
                batch = self._decoded(batch, device)
            images = normalise(batch.images.to(device, non_blocking=True), self.teacher.preprocessing)
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
                text_ids=caption_ids(batch.texts, device) if self.needs_text else None,
                padding=batch.padding,
            )

    def _decoded(self, batch: TrainBatch, device: torch.device) -> TrainBatch:
        """The batch with its files decoded and cropped on ``device``: (K, 3, S, S) uint8, the
        samples whose image does not decode dropped and counted as corrupt (once: not again when
        the batch is repeated as padding)."""
        crops, kept = decode_crops(
            batch.images, self.device_crop.size, self.device_crop.interpolation, device
        )
        if len(kept) < len(batch.keys) and not batch.padding:
            self.source.count_undecodable(len(batch.keys) - len(kept))
        if not kept:
            raise SynthdistillError(
                f"No image of a batch of '{self.source.spec}' decodes ({', '.join(batch.keys[:8])}, ...): "
                "the data look damaged; check them, or decode in the workers with "
                f"{setting('distill.stream_decode', 'workers')}, which skips them."
            )
        texts = None if batch.texts is None else [batch.texts[i] for i in kept]
        return TrainBatch(crops, texts, [batch.keys[i] for i in kept], batch.padding)

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
    crop = RandomCrop(
        max(image_size, teacher.preprocessing.image_size),
        tuple(config.aug_scale),
        tuple(config.aug_ratio),
        config.aug_interpolation,
    )
    on_device = config.stream_decode == "device"
    source = build_train_source(
        config.train_data,
        batch_size=config.batch_size // env.world_size,
        transform=crop.box if on_device else crop,
        num_samples=config.train_num_samples,
        rank=env.rank,
        world_size=env.world_size,
        num_workers=config.workers,
        seed=seed,
        resampled=config.resampled,
        shuffle_buffer=config.shuffle_buffer,
        need_text=needs_text,
        pin_memory=device.type == "cuda",
        encoded=on_device,
    )
    return StreamTrainData(
        source, teacher, image_size, config.precision, needs_text, device_crop=crop if on_device else None
    )
