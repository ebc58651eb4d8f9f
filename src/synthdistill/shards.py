"""WebDataset tar shards: the one writer and the one reader every stage uses.

A sample is the files ``<key>.<ext>`` that share a key (``.jpg`` image, ``.json`` metadata), so
plain ``webdataset`` reads our shards too. A shard is written under a temporary name and renamed
when complete: a shard file that exists is a finished shard.

Beside each shard ``shard-000000.tar`` the writer leaves its record ``shard-000000.json``
(sample count, byte size, SHA-256 and whatever the writer adds), written before the shard is
renamed into place. It is a separate file, not a tar member, so plain ``webdataset`` readers never
see it, and a shard can be checked against it: a tar cut short reads as a shorter but valid
archive, which only the record (and the end-of-archive blocks) reveal.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from synthdistill.errors import SynthdistillError
from synthdistill.fileio import atomic_write_json, read_json, temporary_name

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
INDEX_NAME = "index.json"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
"""The errors that mean "no room left": the disk is full or the user's quota is used up."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def record_path(shard: str | Path) -> Path:
    """The record written beside a shard: ``shard-000000.tar`` -> ``shard-000000.json``."""
    return Path(shard).with_suffix(".json")


@dataclass
class Sample:
    """One sample: its key, the encoded image and its metadata."""

    key: str
    image: bytes
    image_ext: str
    meta: dict


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """Writes one shard; the file appears under its final name only on :meth:`commit`.

    Used as a context manager, it commits when the block succeeds and discards otherwise.
    Entries carry fixed mtimes and owners, so the same samples give byte-identical shards.
    ``record`` adds fields to the shard's record (e.g. generation counts).
    """

    def __init__(self, path: str | Path, record: dict | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.record = dict(record or {})
        self._tmp = temporary_name(self.path)
        self._file = open(self._tmp, "wb")  # noqa: SIM115 (closed by commit or abort)
        self._tar = tarfile.open(fileobj=self._file, mode="w")  # noqa: SIM115
        self.count = 0

    def write(self, key: str, files: dict[str, bytes]) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"Sample key '{key}' may not contain '.' or '/'.")
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def commit(self) -> Path:
        """Finish the archive, write its record, then rename it into place."""
        self._tar.close()
        self._file.close()
        record = {
            "name": self.path.name,
            "count": self.count,
            "bytes": self._tmp.stat().st_size,
            "sha256": file_sha256(self._tmp),
            **self.record,
        }
        atomic_write_json(record_path(self.path), record)
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the temporary file, even when closing it fails (a full disk fails again on close)."""
        with contextlib.suppress(OSError):
            self._tar.close()
        with contextlib.suppress(OSError):
            self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


def encode_sample(image: Image.Image, meta: dict, quality: int = 95) -> dict[str, bytes]:
    """An RGB image and its metadata as the files of one sample (.jpg, .json)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return {"jpg": buffer.getvalue(), "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}


def decode_image(data: bytes) -> Image.Image | None:
    """Encoded bytes -> RGB image, or None when the bytes are not a readable image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except Exception:  # PIL raises many types for corrupt data; the caller counts the skip
        return None


def list_shards(directory: str | Path) -> list[Path]:
    """The finished shards of a folder, in order (temporary files are hidden and ignored)."""
    return sorted(Path(directory).glob("shard-*.tar"))


def read_record(shard: str | Path) -> dict | None:
    """The shard's record, or None when it has none (shards from elsewhere) or it is unreadable."""
    path = record_path(shard)
    try:
        record = read_json(path)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("name") == Path(shard).name else None


def write_index(directory: str | Path, info: dict) -> None:
    """``index.json``: the shards with their records (or counted samples), plus whatever the writer adds."""
    shards = []
    for path in list_shards(directory):
        record = read_record(path)
        shards.append(record if record is not None else {"name": path.name, "count": count_samples(path)})
    atomic_write_json(
        Path(directory) / INDEX_NAME, {**info, "shards": shards, "total": sum(s["count"] for s in shards)}
    )


def read_index(directory: str | Path) -> dict | None:
    path = Path(directory) / INDEX_NAME
    return read_json(path) if path.is_file() else None


def _group_members(members: Sequence[tarfile.TarInfo]) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
    """Consecutive tar members grouped by key, as webdataset groups them."""
    key, group = None, {}
    for member in members:
        if not member.isfile():
            continue
        stem, _, ext = member.name.rpartition("/")[2].partition(".")
        if stem != key and group:
            yield key, group
            group = {}
        key = stem
        group[ext.lower()] = member
    if group:
        yield key, group


def _archive_members(path: Path) -> list[tarfile.TarInfo]:
    """The members of a complete archive; raises ValueError saying how the file is cut short.

    tarfile reads a tar cut mid-member, or without its end-of-archive blocks, as a shorter valid
    archive; here the last member's data must lie inside the file and be followed by the two zero
    blocks every tar writer appends.
    """
    size = path.stat().st_size
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    end = 0
    if members:
        last = members[-1]
        end = last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    if end > size:
        raise ValueError(f"cut short inside '{members[-1].name}'")
    with open(path, "rb") as handle:
        handle.seek(end)
        tail = handle.read(2 * tarfile.BLOCKSIZE)
    if tail != bytes(2 * tarfile.BLOCKSIZE):
        raise ValueError("cut short: the end-of-archive blocks are missing")
    return members


def check_shard(
    path: str | Path, members: Sequence[tarfile.TarInfo] | None = None, full: bool = False
) -> str:
    """Why the shard is incomplete or corrupt ('' when it is fine), checked against its record.

    Checks the archive's structure, then the record's sample count and byte size; ``full`` also
    compares the SHA-256 (a read of the whole file; generate does it before keeping a shard).
    A shard without a record (made elsewhere) is checked for its structure only.
    """
    path = Path(path)
    try:
        members = _archive_members(path) if members is None else members
    except (OSError, tarfile.TarError, ValueError) as e:
        return str(e) or type(e).__name__
    record = read_record(path)
    if record is None:
        return ""
    count = sum(1 for _ in _group_members(members))
    if count != record.get("count"):
        return f"{count} samples where its record says {record.get('count')}"
    size = path.stat().st_size
    if size != record.get("bytes"):
        return f"{size} bytes where its record says {record.get('bytes')}"
    if full and file_sha256(path) != record.get("sha256"):
        return "its content differs from its record (SHA-256)"
    return ""


def count_samples(path: str | Path) -> int:
    with tarfile.open(path) as tar:
        return sum(1 for _ in _group_members(tar.getmembers()))


@dataclass(frozen=True)
class _Location:
    shard: int
    key: str
    image_ext: str
    image_offset: int
    image_size: int
    meta_offset: int
    meta_size: int


class ShardSamples(Sequence):
    """Random access to every sample of a list of shards (a map-style dataset of raw samples).

    The index holds byte offsets, so a sample is one seek and one read: data loaders, samplers
    and exact resume work as with any in-memory list. Decoding is left to the caller, who counts
    unreadable images.

    Every shard is checked against its record (structure, sample count, byte size) when opened:
    an incomplete or corrupt shard is refused with its name, or, with ``skip_bad=True``, left out,
    logged and listed in :attr:`skipped_shards` as ``(path, reason)`` for the caller to count.
    """

    def __init__(self, shards: Sequence[str | Path], skip_bad: bool = False):
        self._files: dict[int, object] = {}
        self._pid = os.getpid()
        if not shards:
            raise SynthdistillError("No shards given: generate images first (`synthdistill generate`).")
        self.shards: list[Path] = []
        self.skipped_shards: list[tuple[Path, str]] = []
        self._locations: list[_Location] = []
        for path in map(Path, shards):
            if not path.is_file():
                raise SynthdistillError(f"Shard '{path}' does not exist.")
            try:
                members = _archive_members(path)
                reason = check_shard(path, members)
            except tarfile.TarError as e:
                members, reason = [], f"not a readable tar file ({e})"
            except ValueError as e:
                members, reason = [], f"incomplete: {e}"
            if reason:
                if not skip_bad:
                    raise SynthdistillError(
                        f"Shard '{path}' is incomplete or corrupt ({reason}); rerun `synthdistill generate` "
                        "on its folder to redraw it, or remove it."
                    )
                log.warning("skipping shard %s: %s", path, reason)
                self.skipped_shards.append((path, reason))
                continue
            self._add_shard(path, members)
        if not self.shards and self.skipped_shards:
            raise SynthdistillError(
                f"No readable shard among the {len(self.skipped_shards)} given (the first, "
                f"'{self.skipped_shards[0][0]}': {self.skipped_shards[0][1]}); regenerate them."
            )

    def _add_shard(self, path: Path, members: Sequence[tarfile.TarInfo]) -> None:
        number = len(self.shards)
        self.shards.append(path)
        for key, group in _group_members(members):
            image_ext = next((e for e in IMAGE_EXTENSIONS if e in group), None)
            if image_ext is None:
                continue
            image, meta = group[image_ext], group.get("json")
            self._locations.append(
                _Location(
                    number,
                    key,
                    image_ext,
                    image.offset_data,
                    image.size,
                    meta.offset_data if meta else -1,
                    meta.size if meta else 0,
                )
            )

    def __len__(self) -> int:
        return len(self._locations)

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():  # a forked data-loader worker must not share the parent's file offsets
            self._files, self._pid = {}, os.getpid()
        handle = self._files.get(shard)
        if handle is None:
            handle = self._files[shard] = open(self.shards[shard], "rb")  # noqa: SIM115 (kept open)
        handle.seek(offset)
        return handle.read(size)

    def __getitem__(self, index: int) -> Sample:
        loc = self._locations[index]
        meta = json.loads(self._read(loc.shard, loc.meta_offset, loc.meta_size)) if loc.meta_size else {}
        return Sample(loc.key, self._read(loc.shard, loc.image_offset, loc.image_size), loc.image_ext, meta)

    def key(self, index: int) -> str:
        return self._locations[index].key

    def __getstate__(self) -> dict:
        # open file handles do not cross into data-loader workers; each worker opens its own
        return {**self.__dict__, "_files": {}}

    def __del__(self) -> None:
        for handle in self._files.values():
            handle.close()
