"""The teacher-embedding cache: K fixed augmented views of every image, embedded by the teacher once.

Over many epochs a frozen teacher would embed each image again and again. Instead it embeds views
0..K-1 of every sample once (see :mod:`synthdistill.data.augment`: a view is replayable from its seed),
and epoch e trains the student on view e mod K with the stored target: the same optimisation problem
without the teacher in the loop. The embeddings live next to the shards as one array (K, N, D), fp16
by default, named by a key over everything they depend on (teacher, its weights, preprocessing,
precision, augmentation, the shards, the storage type), so another teacher or other shards mean
another file, and the same ones are reused across runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from synthdistill.data.augment import Augmentation, augment
from synthdistill.data.decoded import allocated_memmap
from synthdistill.errors import SynthdistillError
from synthdistill.fileio import (
    atomic_write_json,
    disk_full_is_an_error,
    exclusive_lock,
    remove_stale_temporaries,
    temporary_name,
)
from synthdistill.identity import teacher_cache_identity
from synthdistill.progress import progress_iter
from synthdistill.runtime import DistEnv, autocast, autocast_dtype, barrier
from synthdistill.teacher import Teacher

logger = logging.getLogger(__name__)


def teacher_features(teacher: Teacher, images: torch.Tensor, precision: str) -> torch.Tensor:
    """(B, 3, S, S) -> (B, D) fp32 image features, not normalised (the unnormalised-MSE loss needs
    their scale). The one place both the cache and the live loop call the teacher."""
    device = teacher.device
    with torch.no_grad(), autocast(device, precision):
        return teacher.model.encode_image(images.to(device, non_blocking=True)).float()


STORAGE_DTYPES = {"fp16": np.float16, "fp32": np.float32}


def cache_key(
    teacher: Teacher, augmentation: Augmentation, views: int, precision: str, shards_id: str, dtype: str
) -> str:
    """The cache's name: :func:`synthdistill.identity.teacher_cache_identity` of this teacher, its
    autocast dtype on its device, the augmentation, the view count, the shards and the storage."""
    return teacher_cache_identity(
        teacher=teacher.name,
        teacher_pretrained=teacher.pretrained,
        preprocessing=dataclasses.asdict(teacher.preprocessing),
        precision=str(autocast_dtype(teacher.device, precision) or "fp32"),
        augmentation=dataclasses.asdict(augmentation),
        views=views,
        shards=shards_id,
        dtype=dtype,
    )


@dataclass
class TeacherCache:
    """Stored teacher features of views 0..K-1 of every sample: ``embeddings`` is (K, N, D)."""

    path: Path
    embeddings: np.ndarray
    built: bool  # True when this call computed it, False when an existing cache was reused

    @property
    def views(self) -> int:
        return self.embeddings.shape[0]

    def lookup(self, views: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """(B,) view and sample indices -> (B, D) fp32 teacher features."""
        rows = self.embeddings[views.numpy(), indices.numpy()]
        return torch.from_numpy(rows.astype(np.float32))


def open_or_build_cache(
    cache_dir: Path,
    teacher: Teacher,
    images,
    num_samples: int,
    augmentation: Augmentation,
    views: int,
    precision: str,
    shards_id: str,
    *,
    env: DistEnv,
    batch_size: int = 256,
    dtype: str = "fp16",
) -> TeacherCache:
    """Reuse the cache for this key, or embed views 0..views-1 of every sample.

    ``images`` yields uint8 batches (``batches(items, device)``: the training run's own image
    source), augmented here as in training. ``dtype`` fp16 halves the disk and rounds the targets
    (relative error ~1e-3); fp32 stores them exactly. Rank 0 holds a lock file for the check and
    the build, so a second process waits for the first's cache instead of writing into it; under
    torchrun every rank embeds its share into its own file, and rank 0 merges them into place,
    then writes the metadata: a cache whose ``.json`` exists is complete.
    """
    key = cache_key(teacher, augmentation, views, precision, shards_id, dtype)
    path, meta_path = cache_dir / f"views-{key}.npy", cache_dir / f"views-{key}.json"
    lock = cache_lock(cache_dir / f".views-{key}.lock") if env.is_main else contextlib.nullcontext()
    with lock:
        if env.is_main:
            remove_stale_temporaries(cache_dir, recursive=False)  # what killed builds left
        build = broadcast_object(not (meta_path.is_file() and path.is_file()), env)
        if build:
            build_cache(
                path, meta_path, teacher, images, num_samples, augmentation, views, precision,
                env=env, batch_size=batch_size, dtype=dtype,
            )  # fmt: skip
    barrier(env)
    return TeacherCache(path, np.load(path, mmap_mode="r"), built=build)


@contextlib.contextmanager
def cache_lock(path: Path) -> Iterator[None]:
    """The cache's lock file; a second process says once that it waits for the first. Only the
    refusal to take the lock is caught here: an error of the build itself (a full disk) goes on up."""
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(exclusive_lock(path, "the teacher cache"))
        except SynthdistillError:
            logger.info("another process is building the teacher cache in %s: waiting for it", path.parent)
            held.enter_context(exclusive_lock(path, "the teacher cache", wait=True))
        yield


def broadcast_object(value, env: DistEnv):
    """Rank 0's ``value`` on every rank."""
    if not env.is_distributed:
        return value
    holder = [value]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def build_cache(
    path: Path,
    meta_path: Path,
    teacher: Teacher,
    images,
    num_samples: int,
    augmentation: Augmentation,
    views: int,
    precision: str,
    *,
    env: DistEnv,
    batch_size: int,
    dtype: str,
) -> None:
    """Each rank embeds items rank, rank + W, ... into its own file (a name unique to this build, so
    no two writers share a file, which network filesystems do not keep consistent); rank 0 merges
    them into (K, N, D) and renames it into place. A full disk is one sentence naming the folder,
    and the build's files are removed."""
    cache_dir = path.parent
    token = broadcast_object(temporary_name(path).name.split(".tmp-")[-1], env)
    items = [(index, view) for view in range(views) for index in range(num_samples)]
    part = cache_dir / f".{path.name}.part{env.rank}-of-{env.world_size}.tmp-{token}"
    merged_path = temporary_name(path)
    if env.is_main:
        cache_dir.mkdir(parents=True, exist_ok=True)
    barrier(env)
    try:
        with disk_full_is_an_error(cache_dir):
            embed_share(part, teacher, images, items[env.rank :: env.world_size], augmentation, precision,
                        batch_size, dtype, env)  # fmt: skip
            barrier(env)
            if env.is_main:
                merge_shares(merged_path, part, items, views, num_samples, teacher.embed_dim, dtype, env)
                os.replace(merged_path, path)
    except BaseException:  # the parts are the merge's input: removed only when the build fails
        part.unlink(missing_ok=True)
        if env.is_main:
            merged_path.unlink(missing_ok=True)
            for rank in range(env.world_size):  # a rank that failed before the merge
                (cache_dir / part.name.replace(f".part{env.rank}-", f".part{rank}-")).unlink(missing_ok=True)
        raise
    if env.is_main:
        atomic_write_json(
            meta_path,
            {
                "key": path.stem.removeprefix("views-"),
                "teacher": teacher.identity,
                "views": views,
                "samples": num_samples,
                "embed_dim": teacher.embed_dim,
                "augmentation": dataclasses.asdict(augmentation),
            },
        )
        logger.info("teacher cache: %d views of %d images -> %s", views, num_samples, path)


def embed_share(
    part: Path,
    teacher: Teacher,
    images,
    mine: list[tuple[int, int]],
    augmentation: Augmentation,
    precision: str,
    batch_size: int,
    dtype: str,
    env: DistEnv,
) -> None:
    """This rank's (sample, view) items, embedded by the teacher, into rows of its own ``part`` file."""
    rows = allocated_memmap(part, STORAGE_DTYPES[dtype], (len(mine), teacher.embed_dim))
    position = {item: row for row, item in enumerate(mine)}
    batches = [mine[start : start + batch_size] for start in range(0, len(mine), batch_size)]
    loaded = images.batches(batches, teacher.device)
    for batch in progress_iter(loaded, len(batches), "teacher cache", unit="batch", enabled=env.is_main):
        if len(batch):
            (inputs,) = augment(batch, augmentation, [teacher.preprocessing])
            features = teacher_features(teacher, inputs, precision)
            where = [
                position[(i, v)] for i, v in zip(batch.indices.tolist(), batch.views.tolist(), strict=True)
            ]
            rows[where] = features.cpu().numpy()
    rows.flush()


def merge_shares(
    merged_path: Path,
    part: Path,
    items: list[tuple[int, int]],
    views: int,
    num_samples: int,
    embed_dim: int,
    dtype: str,
    env: DistEnv,
) -> None:
    """Rank 0: every rank's part file into one (K, N, D) array at ``merged_path``."""
    merged = allocated_memmap(merged_path, STORAGE_DTYPES[dtype], (views, num_samples, embed_dim))
    for rank in range(env.world_size):
        rank_part = part.parent / part.name.replace(f".part{env.rank}-", f".part{rank}-")
        rank_items = np.array(items[rank :: env.world_size], dtype=np.int64).reshape(-1, 2)
        merged[rank_items[:, 1], rank_items[:, 0]] = np.load(rank_part, mmap_mode="r")
        rank_part.unlink()
    merged.flush()
