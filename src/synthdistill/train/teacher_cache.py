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
import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from synthdistill.config import config_hash
from synthdistill.data.augment import Augmentation, augment
from synthdistill.errors import SynthdistillError
from synthdistill.fileio import atomic_write_json, exclusive_lock, temporary_name
from synthdistill.progress import progress_iter
from synthdistill.runtime import DistEnv, autocast, autocast_dtype, barrier
from synthdistill.shards import INDEX_NAME
from synthdistill.teacher import Teacher

logger = logging.getLogger(__name__)


def teacher_features(teacher: Teacher, images: torch.Tensor, precision: str) -> torch.Tensor:
    """(B, 3, S, S) -> (B, D) fp32 image features, not normalised (the unnormalised-MSE loss needs
    their scale). The one place both the cache and the live loop call the teacher."""
    device = teacher.device
    with torch.no_grad(), autocast(device, precision):
        return teacher.model.encode_image(images.to(device, non_blocking=True)).float()


def shards_fingerprint(shards: list[Path]) -> str:
    """Names the shards' content cheaply: their names and sizes, and the index.json beside them."""
    parts = [(p.name, p.stat().st_size) for p in shards]
    index = shards[0].parent / INDEX_NAME if shards else None
    index_hash = hashlib.sha256(index.read_bytes()).hexdigest() if index and index.is_file() else None
    return config_hash(parts, index_hash)


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A hash of every tensor of ``module``: a local checkpoint file may change under the same name."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode("utf-8"))
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


STORAGE_DTYPES = {"fp16": np.float16, "fp32": np.float32}


def cache_key(
    teacher: Teacher, augmentation: Augmentation, views: int, precision: str, shards_id: str, dtype: str
) -> str:
    """Everything the stored embeddings depend on, hashed."""
    return config_hash(
        dtype,
        teacher.identity,
        weights_fingerprint(teacher.model.visual),
        dataclasses.asdict(teacher.preprocessing),
        str(autocast_dtype(teacher.device, precision)),
        dataclasses.asdict(augmentation),
        views,
        shards_id,
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
    """The cache's lock file; a second process says once that it waits for the first."""
    try:
        with exclusive_lock(path, "the teacher cache"):
            yield
            return
    except SynthdistillError:
        logger.info("another process is building the teacher cache in %s: waiting for it", path.parent)
    with exclusive_lock(path, "the teacher cache", wait=True):
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
    them into (K, N, D), renames it into place and removes what an interrupted build left."""
    cache_dir = path.parent
    token = broadcast_object(temporary_name(path).name.split(".tmp-")[-1], env)
    items = [(index, view) for view in range(views) for index in range(num_samples)]
    mine = items[env.rank :: env.world_size]
    part = cache_dir / f".{path.name}.part{env.rank}-of-{env.world_size}.tmp-{token}"
    if env.is_main:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for stale in cache_dir.glob(f".{path.name}.*"):  # what an interrupted build of this cache left
            stale.unlink()
    barrier(env)
    rows = np.lib.format.open_memmap(
        part, mode="w+", dtype=STORAGE_DTYPES[dtype], shape=(len(mine), teacher.embed_dim)
    )
    position = {item: row for row, item in enumerate(mine)}
    batches = [mine[start : start + batch_size] for start in range(0, len(mine), batch_size)]
    device = teacher.device
    loaded = images.batches(batches, device)
    for batch in progress_iter(loaded, len(batches), "teacher cache", unit="batch", enabled=env.is_main):
        if len(batch):
            (inputs,) = augment(batch, augmentation, [teacher.preprocessing])
            features = teacher_features(teacher, inputs, precision)
            where = [
                position[(i, v)] for i, v in zip(batch.indices.tolist(), batch.views.tolist(), strict=True)
            ]
            rows[where] = features.cpu().numpy()
    rows.flush()
    del rows
    barrier(env)
    if env.is_main:
        merged_path = temporary_name(path)
        merged = np.lib.format.open_memmap(
            merged_path, mode="w+", dtype=STORAGE_DTYPES[dtype], shape=(views, num_samples, teacher.embed_dim)
        )
        for rank in range(env.world_size):
            rank_part = cache_dir / part.name.replace(f".part{env.rank}-", f".part{rank}-")
            rank_items = np.array(items[rank :: env.world_size], dtype=np.int64).reshape(-1, 2)
            merged[rank_items[:, 1], rank_items[:, 0]] = np.load(rank_part, mmap_mode="r")
            rank_part.unlink()
        merged.flush()
        del merged
        os.replace(merged_path, path)
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
