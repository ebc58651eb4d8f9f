"""Streaming training data at web scale, split over ranks and data-loader workers, resumable per shard.

A training source is a list of *shards*: WebDataset tar files (local paths, ``pipe:`` commands,
http(s), or any fsspec URL such as ``s3://``), the ``shard-*.tar`` files of one of our runs, or,
for an ImageFolder-style set (``imagenet:/data/imagenet/train``), fixed chunks of its files. An
epoch either visits every shard once (exact: the shards are shuffled, then split by rank, then by
worker) or draws shards with replacement until each rank has ``num_samples // world_size`` samples
(resampled). Every worker shuffles samples through a buffer. Samples that do not decode and shards
that cannot be read are skipped and counted, never fatal.

The training loop sees only :class:`TrainSource`::

    source = build_train_source(spec, batch_size=..., transform=..., rank=..., world_size=...)
    source.load_state_dict(checkpoint["data"])          # when resuming
    for epoch in range(source.start_epoch, epochs):
        for batch in source.epoch(epoch):                # TrainBatch: images (B, 3, H, W), texts, keys
            ...
            checkpoint["data"] = source.state_dict()     # collective: every rank calls it

Resume works per shard: each batch says which shards it completed, so the source knows which
shards this rank has finished in the current epoch; a resumed run skips every shard any rank
finished and splits the rest anew (so the number of ranks may change). Samples of shards that
were only partly consumed are seen again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

import braceexpand
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from synthdistill.data.encoded import EncodedImages, read_header
from synthdistill.errors import SynthdistillError, setting
from synthdistill.runtime import derive_seed
from synthdistill.shards import IMAGE_EXTENSIONS, decode_image, list_shards, read_index

log = logging.getLogger(__name__)

IMAGEFOLDER_PREFIX = "imagenet:"
FOLDER_SHARD_SIZE = 1000  # files per shard of an image folder: the unit of splitting and resume
STATE_FORMAT = "synthdistill.webdata/1"
# URL schemes webdataset's gopen opens itself; any other scheme (s3://, gs://, az://, ...) goes to fsspec.
GOPEN_SCHEMES = ("", "file", "pipe", "http", "https")
# A resampling worker that reads this many shards in a row without one usable sample gives up.
MAX_FAILED_SHARDS_IN_A_ROW = 100

Transform = Callable[[Image.Image], torch.Tensor]
"""RGB image -> (3, H, W) tensor; for an ``encoded`` source: header-only image -> its crop box."""


# ----------------------------------------------------------------------------- shards and URLs


def expand_urls(spec: str) -> list[str]:
    """WebDataset URL notation -> the URLs in order.

    ``::`` separates lists and ``{00000000..00012895}`` expands (zero padding kept), so
    ``"/a/{0..1}.tar::pipe:curl -s https://h/b.tar"`` gives three URLs. ``pipe:`` commands and
    fsspec URLs pass through unchanged.
    """
    urls = [url for part in spec.split("::") if part.strip() for url in braceexpand.braceexpand(part.strip())]
    if not urls:
        raise SynthdistillError(
            f"'{spec}' names no shards; give paths or URLs such as /data/{{0000..0099}}.tar."
        )
    return urls


def open_url(url: str) -> BinaryIO:
    """A readable stream for one shard: webdataset's gopen for paths, ``pipe:`` and http(s), else fsspec."""
    if urlparse(url).scheme in GOPEN_SCHEMES:
        return gopen(url, "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


def _check_url_schemes(urls: list[str]) -> None:
    """Refuse early a scheme that nothing installed can read (e.g. s3:// without s3fs)."""
    import fsspec

    for scheme in sorted({urlparse(u).scheme for u in urls} - set(GOPEN_SCHEMES)):
        try:
            fsspec.get_filesystem_class(scheme)
        except (ImportError, ValueError) as e:
            raise SynthdistillError(
                f"Cannot read '{scheme}://' URLs ({e}); install fsspec's backend for it (s3fs, gcsfs, ...) "
                f"or stream the shards through a command: 'pipe:aws s3 cp {scheme}://... -'."
            ) from None


def _tar_samples(stream: BinaryIO) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for consecutive tar members sharing a key, as webdataset groups them."""
    key, files = None, {}
    for entry in tar_file_iterator(stream):
        base, ext = base_plus_ext(entry["fname"])
        if base is None:
            continue
        if base != key and files:
            yield key, files
            files = {}
        key = base
        files[ext.lower()] = entry["data"]
    if files:
        yield key, files


@dataclass(frozen=True)
class TarShards:
    """Shards that are tar files, by URL."""

    urls: list[str]

    @property
    def names(self) -> list[str]:
        return self.urls

    def read(self, index: int) -> Iterator[tuple[str, dict[str, bytes]]]:
        stream = open_url(self.urls[index])
        completed = False
        try:
            yield from _tar_samples(stream)
            completed = True
        finally:
            if completed:
                stream.close()  # a pipe reports its command's failure here
            else:
                with suppress(Exception):  # left early: a pipe's command was cut off on purpose
                    stream.close()


@dataclass(frozen=True)
class FolderShards:
    """An ImageFolder-style tree (``root/<class>/<image>``) cut into shards of ``shard_size`` files.

    The files are shuffled once with a fixed seed before cutting, so every shard mixes classes
    and the same tree always gives the same shards (which resume relies on).
    """

    root: str
    files: list[str]
    shard_size: int

    @classmethod
    def scan(cls, root: str | Path) -> FolderShards:
        root = Path(root)
        if not root.is_dir():
            raise SynthdistillError(f"Image folder '{root}' does not exist; give imagenet:/path/to/train.")
        files = sorted(
            str(Path(dirpath, name).relative_to(root))
            for dirpath, _, names in os.walk(root)
            for name in names
            if name.rpartition(".")[2].lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise SynthdistillError(f"Image folder '{root}' holds no .jpg/.jpeg/.png/.webp files.")
        random.Random(derive_seed("image folder shards")).shuffle(files)
        return cls(str(root), files, FOLDER_SHARD_SIZE)

    @property
    def names(self) -> list[str]:
        count = math.ceil(len(self.files) / self.shard_size)
        return [f"{self.root}#{i}" for i in range(count)]

    def read(self, index: int) -> Iterator[tuple[str, dict[str, bytes]]]:
        for relative in self.files[index * self.shard_size : (index + 1) * self.shard_size]:
            key, _, ext = relative.rpartition(".")
            try:
                data = Path(self.root, relative).read_bytes()
            except OSError as e:
                log.warning("Skipping unreadable image %s: %s", relative, e)
                data = b""  # counted as a corrupt sample
            yield key, {ext.lower(): data}


Shards = TarShards | FolderShards


def _resolve_shards(spec: str) -> tuple[Shards, int | None]:
    """A source spec -> its shards and, where known without reading them, its sample count."""
    if spec.startswith(IMAGEFOLDER_PREFIX):
        folder = FolderShards.scan(spec[len(IMAGEFOLDER_PREFIX) :])
        return folder, len(folder.files)
    if Path(spec).is_dir():
        directory = Path(spec) / "shards" if list_shards(Path(spec) / "shards") else Path(spec)
        paths = list_shards(directory) or sorted(directory.glob("*.tar"))
        if not paths:
            raise SynthdistillError(
                f"Folder '{spec}' holds no .tar shards; give a shard folder, WebDataset URLs "
                f"(/data/{{00000..00099}}.tar) or an image folder as imagenet:/path/to/train."
            )
        index = read_index(directory)
        return TarShards([str(p) for p in paths]), index["total"] if index else None
    urls = expand_urls(spec)
    _check_url_schemes(urls)
    local = [u for u in urls if urlparse(u).scheme in ("", "file")]
    missing = [u for u in local if not Path(urlparse(u).path if u.startswith("file:") else u).is_file()]
    if local and len(missing) == len(urls):
        raise SynthdistillError(f"No shard of '{spec}' exists (the first is '{urls[0]}'); check the path.")
    if missing:
        log.warning(
            "%d of %d shards do not exist and will be skipped, e.g. %s", len(missing), len(urls), missing[0]
        )
    return TarShards(urls), None


# ----------------------------------------------------------------------------- one worker's stream


@dataclass
class SourceStats:
    """Counters of one epoch (per worker, per rank, or over all ranks)."""

    samples: int = 0  # samples yielded to training (padding excluded)
    corrupt: int = 0  # skipped: no image, or image bytes that do not decode
    no_text: int = 0  # skipped: no caption although the loss needs one
    shards_read: int = 0  # shards read to the end
    shards_failed: int = 0  # shards that could not be opened or broke off (logged)
    padding_batches: int = 0  # repeated batches that kept this rank in step with the others

    def __add__(self, other: SourceStats) -> SourceStats:
        return SourceStats(*(a + b for a, b in zip(_values(self), _values(other), strict=True)))


def _values(stats: SourceStats) -> list[int]:
    return [getattr(stats, f.name) for f in dataclasses.fields(stats)]


@dataclass(frozen=True)
class _Plan:
    """What one rank reads in one epoch: its shards in order (exact), or a sample quota (resampled)."""

    shards: list[int]
    quota: int | None
    seed: int


@dataclass(frozen=True)
class _Raw:
    visit: int  # the n-th shard this worker opened (a resampled shard can be open twice)
    shard: int
    key: str
    files: dict[str, bytes]


@dataclass(frozen=True)
class _ShardEnd:
    visit: int
    shard: int


@dataclass
class _WorkerBatch:
    """What a worker sends: a batch, the shards it completed, the worker's counters so far."""

    worker: int
    images: torch.Tensor | EncodedImages | None
    texts: list[str] | None
    keys: list[str]
    finished: list[int]
    stats: SourceStats
    last: bool = False

    def pin_memory(self) -> _WorkerBatch:
        images = None if self.images is None else self.images.pin_memory()
        return dataclasses.replace(self, images=images)

    def split(self, count: int) -> tuple[TrainBatch, _WorkerBatch]:
        """The first ``count`` samples as a batch, and the rest (which keeps the finished shards)."""
        texts = self.texts
        head = TrainBatch(self.images[:count], None if texts is None else texts[:count], self.keys[:count])
        rest = dataclasses.replace(
            self,
            images=self.images[count:],
            texts=None if texts is None else texts[count:],
            keys=self.keys[count:],
        )
        return head, rest


def _caption(files: dict[str, bytes]) -> str | None:
    """The caption: ``.txt``, else the ``caption`` or ``prompt`` field of ``.json``."""
    if "txt" in files:
        return files["txt"].decode("utf-8", "replace").strip() or None
    try:
        meta = json.loads(files["json"]) if "json" in files else None
    except ValueError:
        return None
    if isinstance(meta, dict):
        for name in ("caption", "prompt"):
            if isinstance(meta.get(name), str) and meta[name].strip():
                return meta[name].strip()
    return None


class _EpochStream(IterableDataset):
    """One rank's epoch as an iterable of :class:`_WorkerBatch`; each data-loader worker takes its part.

    Per worker: shard events (samples, end-of-shard markers) -> shuffle buffer -> decode -> batches.
    An end-of-shard marker leaves the buffer right after the shard's last sample, so the batch that
    carries it is the one that completes the shard. ``encoded``: only the header is read, and the
    batch holds the files with the transform's crop boxes (:class:`EncodedImages`).
    """

    def __init__(
        self,
        shards: Shards,
        plan: _Plan,
        batch_size: int,
        transform: Transform,
        need_text: bool,
        buffer: int,
        encoded: bool = False,
    ):
        super().__init__()
        self.shards, self.plan, self.batch_size = shards, plan, batch_size
        self.transform, self.need_text, self.buffer = transform, need_text, max(1, buffer)
        self.encoded = encoded

    def __iter__(self) -> Iterator[_WorkerBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        stats = SourceStats()
        quota, buffer = None, self.buffer
        if self.plan.quota is not None:  # resampled: read no more shards than the quota needs
            quota = self.plan.quota // workers + (worker < self.plan.quota % workers)
            buffer = max(1, min(buffer, quota))
        events = self._shard_events(worker, workers, stats) if quota != 0 else iter(())
        shuffled = self._shuffled(
            events, buffer, random.Random(derive_seed(self.plan.seed, "buffer", worker))
        )
        images, texts, keys, finished = [], [], [], []
        for item in shuffled:
            if isinstance(item, _ShardEnd):
                finished.append(item.shard)
                continue
            data = next((item.files[e] for e in IMAGE_EXTENSIONS if e in item.files), b"")
            image = read_header(data) if self.encoded else decode_image(data)
            if image is None:
                stats.corrupt += 1
                continue
            text = _caption(item.files) if self.need_text else None
            if self.need_text and text is None:
                stats.no_text += 1
                continue
            images.append((data, self.transform(image)) if self.encoded else self.transform(image))
            texts.append(text)
            keys.append(item.key)
            stats.samples += 1
            if len(keys) == self.batch_size:
                yield self._batch(worker, images, texts, keys, finished, stats)
                images, texts, keys, finished = [], [], [], []
            if quota is not None and stats.samples >= quota:
                break
        shuffled.close()
        yield self._batch(worker, images, texts, keys, finished, stats, last=True)

    def _batch(self, worker, images, texts, keys, finished, stats, last=False) -> _WorkerBatch:
        if not images:
            batched = None
        elif self.encoded:
            batched = EncodedImages.of(*zip(*images, strict=True))
        else:
            batched = torch.stack(images)
        return _WorkerBatch(
            worker=worker,
            images=batched,
            texts=texts if self.need_text else None,
            keys=keys,
            finished=finished,
            stats=dataclasses.replace(stats),
            last=last,
        )

    def _shard_indices(self, worker: int, workers: int) -> Iterator[int]:
        if self.plan.quota is None:
            yield from self.plan.shards[worker::workers]
            return
        rng, count = random.Random(derive_seed(self.plan.seed, "resample", worker)), len(self.shards.names)
        while True:
            yield rng.randrange(count)

    def _shard_events(self, worker: int, workers: int, stats: SourceStats) -> Iterator[_Raw | _ShardEnd]:
        failed_in_a_row, logged = 0, set()
        for visit, shard in enumerate(self._shard_indices(worker, workers)):
            count = 0
            try:
                for key, files in self.shards.read(shard):
                    count += 1
                    yield _Raw(visit, shard, key, files)
                stats.shards_read += 1
            except Exception as e:  # any I/O, tar or pipe error: this shard is skipped, the epoch goes on
                stats.shards_failed += 1
                if shard not in logged:  # a resampled worker may draw a broken shard again and again
                    logged.add(shard)
                    log.warning("Skipping shard %s after %d samples: %s", self.shards.names[shard], count, e)
            yield _ShardEnd(visit, shard)
            failed_in_a_row = 0 if count else failed_in_a_row + 1
            if failed_in_a_row >= MAX_FAILED_SHARDS_IN_A_ROW:
                log.error(
                    "Worker %d read %d shards in a row without a sample; it stops.", worker, failed_in_a_row
                )
                return

    @staticmethod
    def _shuffled(
        events: Iterator[_Raw | _ShardEnd], size: int, rng: random.Random
    ) -> Iterator[_Raw | _ShardEnd]:
        """Samples in random order through a buffer; a shard's end comes right after its last sample."""
        buffer: list[_Raw] = []
        in_buffer: Counter[int] = Counter()  # visit -> its samples still buffered
        ended: dict[int, _ShardEnd] = {}  # visits read to the end whose samples are still buffered

        def pop() -> Iterator[_Raw | _ShardEnd]:
            index = rng.randrange(len(buffer))
            buffer[index], buffer[-1] = buffer[-1], buffer[index]
            sample = buffer.pop()
            yield sample
            in_buffer[sample.visit] -= 1
            if in_buffer[sample.visit] == 0 and sample.visit in ended:
                yield ended.pop(sample.visit)

        for event in events:
            if isinstance(event, _ShardEnd):
                if in_buffer[event.visit]:
                    ended[event.visit] = event
                else:
                    yield event
                continue
            buffer.append(event)
            in_buffer[event.visit] += 1
            if len(buffer) >= size:
                yield from pop()
        while buffer:
            yield from pop()


# ----------------------------------------------------------------------------- the rank's view


@dataclass
class TrainBatch:
    """One training batch of this rank.

    ``images`` (B, 3, H, W) as the transform made them (an ``encoded`` source: the B files with
    their crop boxes); ``texts`` the B captions when the source was built with ``need_text``, else
    None; ``keys`` the samples' keys. ``padding`` marks a repeated batch that keeps this rank in step
    with ranks that still have data (exact epochs only).
    """

    images: torch.Tensor | EncodedImages
    texts: list[str] | None
    keys: list[str]
    padding: bool = False


class _Tail:
    """Workers' last, partial batches, merged into full ones: a rank ends an epoch with at most one
    partial batch. A piece's finished shards count once all its samples are in an emitted batch."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.pieces: list[_WorkerBatch] = []

    def add(self, piece: _WorkerBatch) -> Iterator[tuple[TrainBatch, list[int]]]:
        self.pieces.append(piece)
        while sum(len(p.keys) for p in self.pieces) >= self.batch_size:
            yield self._take(self.batch_size)

    def flush(self) -> Iterator[tuple[TrainBatch, list[int]]]:
        if self.pieces:
            yield self._take(sum(len(p.keys) for p in self.pieces))

    def _take(self, count: int) -> tuple[TrainBatch, list[int]]:
        parts: list[TrainBatch] = []
        finished: list[int] = []
        while count:
            head, rest = self.pieces[0].split(count)
            parts.append(head)
            count -= len(head.keys)
            if rest.keys:
                self.pieces[0] = rest
            else:
                finished += self.pieces.pop(0).finished
        texts = None if parts[0].texts is None else [t for p in parts for t in p.texts]
        keys = [k for p in parts for k in p.keys]
        images = [p.images for p in parts]
        joined = EncodedImages.cat(images) if isinstance(images[0], EncodedImages) else torch.cat(images)
        return TrainBatch(joined, texts, keys), finished


@dataclass
class _Progress:
    """Where this rank is within ``epoch``; ``resumed*`` is what earlier runs did in it (all ranks)."""

    epoch: int = 0
    finished: set[int] = field(default_factory=set)
    samples: int = 0
    resumed_finished: set[int] = field(default_factory=set)
    resumed_samples: int = 0


class TrainSource:
    """Training data for one rank: iterate :meth:`epoch`, checkpoint :meth:`state_dict`.

    Made by :func:`build_train_source`. When torch.distributed is initialised with more than one
    rank, :meth:`epoch` keeps all ranks in step (an exact epoch pads ranks that run out first with
    repeats of their last batch, marked ``padding``) and :meth:`state_dict` / :meth:`reduce_stats`
    are collectives: every rank must call them at the same point.
    """

    def __init__(
        self,
        spec: str,
        shards: Shards,
        *,
        num_samples: int | None,
        batch_size: int,
        transform: Transform,
        rank: int,
        world_size: int,
        num_workers: int,
        seed: int,
        resampled: bool,
        shuffle_buffer: int,
        need_text: bool,
        pin_memory: bool,
        encoded: bool = False,
    ):
        self.spec, self.shards, self.num_samples = spec, shards, num_samples
        self.batch_size, self.transform, self.need_text = batch_size, transform, need_text
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.seed, self.resampled = seed, resampled
        self.shuffle_buffer, self.pin_memory, self.encoded = shuffle_buffer, pin_memory, encoded
        self.fingerprint = hashlib.sha256("\n".join(shards.names).encode("utf-8")).hexdigest()[:16]
        self._progress = _Progress()
        self._restored: _Progress | None = None
        self._worker_stats: dict[int, SourceStats] = {}
        self._padding_batches = 0
        self._undecodable = 0  # encoded samples the training device could not decode, this epoch
        self._group = None
        self._distributed = dist.is_available() and dist.is_initialized() and world_size > 1
        if self._distributed:
            if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
                raise ValueError(
                    f"rank {rank} of {world_size} given, but torch.distributed says "
                    f"{dist.get_rank()} of {dist.get_world_size()}."
                )
            # bookkeeping collectives run on the CPU, so they need no GPU sync under NCCL
            self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    @property
    def num_shards(self) -> int:
        return len(self.shards.names)

    @property
    def start_epoch(self) -> int:
        """The epoch to run next: 0, or the one a restored state was in."""
        return self._progress.epoch

    @property
    def batches_per_epoch(self) -> int | None:
        """This rank's batches per epoch: exact when resampled, an estimate from ``num_samples`` otherwise."""
        if self.num_samples is None:
            return None
        return math.ceil(self.num_samples // self.world_size / self.batch_size)

    @property
    def stats(self) -> SourceStats:
        """This rank's counters for the current (or last) epoch, summed over its workers."""
        total = SourceStats(
            samples=-self._undecodable, corrupt=self._undecodable, padding_batches=self._padding_batches
        )
        for worker_stats in self._worker_stats.values():
            total = total + worker_stats
        return total

    @property
    def worker_stats(self) -> dict[int, SourceStats]:
        """The counters of each data-loader worker of this rank (worker id -> counters)."""
        return dict(self._worker_stats)

    def count_undecodable(self, count: int) -> None:
        """Count ``count`` samples of a batch of this epoch whose files did not decode after all
        (an ``encoded`` source): corrupt, not trained on."""
        self._undecodable += count

    def reduce_stats(self) -> SourceStats:
        """The counters summed over all ranks (a collective when distributed)."""
        if not self._distributed:
            return self.stats
        values = torch.tensor(_values(self.stats), dtype=torch.int64)
        dist.all_reduce(values, group=self._group)
        return SourceStats(*values.tolist())

    def epoch(self, epoch: int) -> Iterator[TrainBatch]:
        """This rank's batches of ``epoch``; a restored state's epoch skips the shards finished before.

        Leaving the loop early is fine: progress stays mid-epoch, ready for :meth:`state_dict`.
        """
        restored = self._restored if self._restored and self._restored.epoch == epoch else None
        self._restored = None
        self._progress = restored or _Progress(epoch=epoch)
        self._worker_stats, self._padding_batches, self._undecodable = {}, 0, 0
        loader = self._loader(self._plan(epoch))
        real = self._rank_batches(loader)
        last: TrainBatch | None = None
        try:
            while True:
                batch = next(real, None)
                if not self._any_rank(batch is not None):
                    break
                if batch is None:
                    batch = dataclasses.replace(last or self._spare_batch(epoch), padding=True)
                    self._padding_batches += 1
                else:
                    last = batch
                yield batch
        finally:
            real.close()
        self._progress = _Progress(epoch=epoch + 1)

    def state_dict(self) -> dict:
        """Where the epoch stands, as a JSON-able dict for a checkpoint (a collective when distributed).

        ``finished`` maps each rank to the shards it finished in ``epoch`` since this run started;
        ``resumed`` holds the shards finished by earlier runs. Resampled sources only need ``epoch``,
        ``seed`` and the samples already drawn.
        """
        mine = {"finished": sorted(self._progress.finished), "samples": self._progress.samples}
        if self._distributed:
            gathered: list[dict | None] = [None] * self.world_size
            dist.all_gather_object(gathered, mine, group=self._group)
            by_rank = dict(enumerate(gathered))
        else:
            by_rank = {self.rank: mine}
        return {
            "format": STATE_FORMAT,
            "mode": "resampled" if self.resampled else "exact",
            "seed": self.seed,
            "epoch": self._progress.epoch,
            "num_shards": self.num_shards,
            "fingerprint": self.fingerprint,
            "resumed": sorted(self._progress.resumed_finished),
            "resumed_samples": self._progress.resumed_samples,
            "finished": {str(r): s["finished"] for r, s in by_rank.items()},
            "samples": {str(r): s["samples"] for r, s in by_rank.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict`: the next :meth:`epoch` call for its epoch resumes it."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise SynthdistillError(
                "The checkpoint's data state is not one this version can read; start a new run."
            )
        mode = "resampled" if self.resampled else "exact"
        if state["mode"] != mode:
            raise SynthdistillError(
                f"The checkpoint was trained with {state['mode']} data and this run asks for {mode}; "
                f"set distill.resampled={str(state['mode'] == 'resampled').lower()} to resume it."
            )
        same_data = (state["num_shards"], state["fingerprint"]) == (self.num_shards, self.fingerprint)
        if mode == "exact" and not same_data:
            raise SynthdistillError(
                f"The training data changed since the checkpoint ({state['num_shards']} shards then, "
                f"{self.num_shards} now); resume with the same --train-data or start a new run."
            )
        self.seed = int(state["seed"])
        finished = set(state["resumed"]).union(*map(set, state["finished"].values()))
        samples = int(state["resumed_samples"]) + sum(state["samples"].values())
        self._progress = _Progress(epoch=int(state["epoch"]))
        self._restored = _Progress(
            epoch=int(state["epoch"]), resumed_finished=finished, resumed_samples=samples
        )

    # internals

    def _plan(self, epoch: int) -> _Plan:
        done = self._progress.resumed_finished
        seed = derive_seed(self.seed, "epoch", epoch, len(done), self._progress.resumed_samples, self.rank)
        if self.resampled:
            quota = max(0, self.num_samples - self._progress.resumed_samples) // self.world_size
            return _Plan(shards=[], quota=quota, seed=seed)
        order = list(range(self.num_shards))
        random.Random(derive_seed(self.seed, "shard order", epoch)).shuffle(order)
        remaining = [s for s in order if s not in done]
        readers = self.world_size * max(1, self.num_workers)
        if len(remaining) < readers:
            log.info(
                "%d shards for %d data readers (ranks x workers): some stay idle.", len(remaining), readers
            )
        return _Plan(shards=remaining[self.rank :: self.world_size], quota=None, seed=seed)

    def _stream(self, plan: _Plan) -> _EpochStream:
        return _EpochStream(
            self.shards,
            plan,
            self.batch_size,
            self.transform,
            self.need_text,
            self.shuffle_buffer,
            self.encoded,
        )

    def _loader(self, plan: _Plan) -> DataLoader:
        generator = torch.Generator().manual_seed(derive_seed(plan.seed, "loader"))
        return DataLoader(
            self._stream(plan),
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=generator,
        )

    def _rank_batches(self, loader: DataLoader) -> Iterator[TrainBatch]:
        tail = _Tail(self.batch_size)
        for item in loader:
            self._worker_stats[item.worker] = item.stats
            if not item.keys:
                self._record(None, item.finished)
            elif item.last:
                for batch, finished in tail.add(item):
                    yield self._record(batch, finished)
            else:
                yield self._record(TrainBatch(item.images, item.texts, item.keys), item.finished)
        for batch, finished in tail.flush():
            yield self._record(batch, finished)

    def _record(self, batch: TrainBatch | None, finished: list[int]) -> TrainBatch | None:
        """Count a batch as consumed: it is handed to training right after this."""
        self._progress.finished.update(finished)
        if batch is not None:
            self._progress.samples += len(batch.keys)
        return batch

    def _any_rank(self, has_batch: bool) -> bool:
        if not self._distributed:
            return has_batch
        flag = torch.tensor([int(has_batch)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    def _spare_batch(self, epoch: int) -> TrainBatch:
        """A batch drawn from random shards, for a rank that has to pad but read nothing this epoch."""
        plan = _Plan(shards=[], quota=self.batch_size, seed=derive_seed(self.seed, "spare", epoch, self.rank))
        for item in self._stream(plan):
            if item.keys:
                return TrainBatch(item.images, item.texts, item.keys)
        raise SynthdistillError(f"No shard of '{self.spec}' gave a usable sample; check the training data.")


def build_train_source(
    spec: str,
    *,
    batch_size: int,
    transform: Transform,
    num_samples: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    seed: int = 0,
    resampled: bool = False,
    shuffle_buffer: int = 5000,
    need_text: bool = False,
    pin_memory: bool = False,
    encoded: bool = False,
) -> TrainSource:
    """The training data named by ``spec``, for one rank.

    ``spec``: WebDataset URLs (``"/data/datacomp/{00000000..00012895}.tar"``, ``::``-separated lists,
    ``pipe:`` commands, ``s3://...``), a folder of tar shards (a run's ``shards/``), or
    ``imagenet:/data/imagenet/train`` (class folders of images; no captions). ``batch_size`` is
    per rank (the global batch divided by ``world_size``); ``transform`` maps an RGB PIL image to a
    (3, H, W) tensor and runs in the workers. ``num_samples`` (all ranks together) defines a
    resampled epoch and is otherwise only an estimate for :attr:`TrainSource.batches_per_epoch`
    (defaulting to the count a shard folder's index or an image folder gives). ``need_text`` keeps
    only samples with a caption (``.txt``, or ``caption``/``prompt`` in ``.json``). ``encoded``:
    the workers decode nothing; ``transform`` maps an image whose header alone was read to its
    (top, left, height, width) crop box, and batches hold :class:`EncodedImages` for the training
    device to decode (:func:`synthdistill.data.encoded.decode_crops`; count what does not decode
    with :meth:`TrainSource.count_undecodable`).

    When torch.distributed is initialised with ``world_size > 1``, every rank must call this
    together (it may create a gloo group for the data bookkeeping).
    """
    if batch_size <= 0 or num_workers < 0 or shuffle_buffer < 0:
        raise SynthdistillError(
            "batch_size must be positive, and num_workers and shuffle_buffer not negative."
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}.")
    if num_samples is not None and num_samples <= 0:
        raise SynthdistillError(f"distill.train_num_samples must be positive; got {num_samples}.")
    if resampled and num_samples is None:
        raise SynthdistillError(
            f"Resampled training data needs {setting('distill.train_num_samples', 'N')}: it defines "
            "the epoch."
        )
    if need_text and spec.startswith(IMAGEFOLDER_PREFIX):
        raise SynthdistillError(
            f"'{spec}' has no captions, which the loss needs; use {setting('distill.loss', 'fd')}, or shards "
            "with .txt captions."
        )
    shards, known_samples = _resolve_shards(spec)
    return TrainSource(
        spec,
        shards,
        num_samples=num_samples or known_samples,
        batch_size=batch_size,
        transform=transform,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        seed=seed,
        resampled=resampled,
        shuffle_buffer=shuffle_buffer,
        need_text=need_text,
        pin_memory=pin_memory,
        encoded=encoded,
    )


# ----------------------------------------------------------------------------- throughput


@dataclass(frozen=True)
class Throughput:
    """Images per second on one GPU (rank) and over all of them, with the time left when known."""

    per_gpu: float
    total: float
    eta_seconds: float | None = None

    def __str__(self) -> str:
        text = f"{self.per_gpu:.1f} img/s per GPU, {self.total:.1f} img/s total"
        if self.eta_seconds is not None:
            minutes, seconds = divmod(round(self.eta_seconds), 60)
            text += f", ETA {minutes // 60}:{minutes % 60:02d}:{seconds:02d}"
        return text


def measure_throughput(
    images: int, seconds: float, world_size: int = 1, remaining_images: int | None = None
) -> Throughput:
    """Throughput from ``images`` seen by this rank in ``seconds``.

    Ranks of a DDP run move in step, so the total is ``world_size`` times this rank's rate;
    ``remaining_images`` (all ranks together) gives the ETA.
    """
    per_gpu = images / seconds if seconds > 0 else 0.0
    total = per_gpu * world_size
    eta = remaining_images / total if remaining_images is not None and total > 0 else None
    return Throughput(per_gpu, total, eta)
