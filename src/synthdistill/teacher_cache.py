"""The teacher-embedding cache: K fixed augmented views of every image, embedded by the teacher once.

Over many epochs a frozen teacher would embed each image again and again. Instead it embeds views
0..K-1 of every sample once (see :mod:`synthdistill.augment`: a view is replayable from its seed),
and epoch e trains the student on view e mod K with the stored target: the same optimisation problem
without the teacher in the loop. The embeddings live next to the shards as one array (K, N, D), fp16
by default, named by a key over everything they depend on (teacher, its weights, preprocessing,
precision, augmentation, the shards, the storage type), so another teacher or other shards mean
another file, and the same ones are reused across runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from synthdistill.augment import Augmentation, ViewDataset, view_loader
from synthdistill.config import config_hash
from synthdistill.fileio import atomic_write_json
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
    dataset: ViewDataset,
    views: int,
    precision: str,
    shards_id: str,
    *,
    env: DistEnv,
    batch_size: int = 256,
    workers: int = 0,
    dtype: str = "fp16",
) -> TeacherCache:
    """Reuse the cache for this key, or embed views 0..views-1 of every sample of ``dataset``.

    ``dataset`` must prepare images for the teacher's input. ``dtype`` fp16 halves the disk and
    rounds the targets (relative error ~1e-3); fp32 stores them exactly. Under torchrun every rank embeds its
    share into the same (not yet visible) file; rank 0 renames it into place, then writes the
    metadata: a cache whose ``.json`` exists is complete.
    """
    key = cache_key(teacher, dataset.augmentation, views, precision, shards_id, dtype)
    path, meta_path = cache_dir / f"views-{key}.npy", cache_dir / f"views-{key}.json"
    if meta_path.is_file() and path.is_file():
        return TeacherCache(path, np.load(path, mmap_mode="r"), built=False)

    num_samples = len(dataset)
    partial = cache_dir / f".views-{key}.npy.partial"  # one name for all ranks, unlike temporary_name
    shape = (views, num_samples, teacher.embed_dim)
    if env.is_main:
        cache_dir.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(partial, mode="w+", dtype=STORAGE_DTYPES[dtype], shape=shape).flush()
    barrier(env)
    embeddings = np.lib.format.open_memmap(partial, mode="r+")
    items = [(index, view) for view in range(views) for index in range(num_samples)][
        env.rank :: env.world_size
    ]
    batches = [items[start : start + batch_size] for start in range(0, len(items), batch_size)]
    loader = view_loader(dataset, batches, workers, pin_memory=teacher.device.type == "cuda")
    for batch in tqdm(loader, desc="teacher cache", unit="batch", disable=None if env.is_main else True):
        if len(batch):
            features = teacher_features(teacher, batch.inputs[0], precision)
            embeddings[batch.views.numpy(), batch.indices.numpy()] = features.cpu().numpy()
    embeddings.flush()
    del embeddings
    barrier(env)
    if env.is_main:
        os.replace(partial, path)
        atomic_write_json(
            meta_path,
            {
                "key": key,
                "teacher": teacher.identity,
                "views": views,
                "samples": num_samples,
                "embed_dim": teacher.embed_dim,
                "augmentation": dataclasses.asdict(dataset.augmentation),
            },
        )
        logger.info("teacher cache: %d views of %d images -> %s", views, num_samples, path)
    barrier(env)
    return TeacherCache(path, np.load(path, mmap_mode="r"), built=True)
