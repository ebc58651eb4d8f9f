"""WebDataset tar shards: the one writer and the one reader every stage uses.

A sample is the files ``<key>.<ext>`` that share a key (``.jpg`` image, ``.json`` metadata), so
plain ``webdataset`` reads our shards too. A shard is written under a temporary name and renamed
when complete: a shard file that exists is a finished shard.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from synthdistill.errors import SynthdistillError
from synthdistill.fileio import atomic_write_json, read_json, temporary_name

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
INDEX_NAME = "index.json"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


@dataclass
class Sample:
    """One sample: its key, the encoded image and its metadata."""

    key: str
    image: bytes
    image_ext: str
    meta: dict


class ShardWriter:
    """Writes one shard; the file appears under its final name only on :meth:`commit`.

    Used as a context manager, it commits when the block succeeds and discards otherwise.
    Entries carry fixed mtimes and owners, so the same samples give byte-identical shards.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temporary_name(self.path)
        self._tar = tarfile.open(self._tmp, "w")  # noqa: SIM115 (closed by commit or abort)
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
        self._tar.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._tar.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
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


def write_index(directory: str | Path, info: dict) -> None:
    """``index.json``: the shards with their sample counts, plus whatever the writer adds."""
    shards = [{"name": p.name, "count": count_samples(p)} for p in list_shards(directory)]
    atomic_write_json(
        Path(directory) / INDEX_NAME, {**info, "shards": shards, "total": sum(s["count"] for s in shards)}
    )


def read_index(directory: str | Path) -> dict | None:
    path = Path(directory) / INDEX_NAME
    return read_json(path) if path.is_file() else None


def _group_members(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
    """Consecutive tar members grouped by key, as webdataset groups them."""
    key, group = None, {}
    for member in tar:
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


def count_samples(path: str | Path) -> int:
    with tarfile.open(path) as tar:
        return sum(1 for _ in _group_members(tar))


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
    """

    def __init__(self, shards: Sequence[str | Path]):
        self._files: dict[int, object] = {}
        self._pid = os.getpid()
        self.shards = [Path(s) for s in shards]
        if not self.shards:
            raise SynthdistillError("No shards given: generate images first (`synthdistill generate`).")
        self._locations: list[_Location] = []
        for number, path in enumerate(self.shards):
            if not path.is_file():
                raise SynthdistillError(f"Shard '{path}' does not exist.")
            try:
                with tarfile.open(path) as tar:
                    for key, members in _group_members(tar):
                        image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
                        if image_ext is None:
                            continue
                        image, meta = members[image_ext], members.get("json")
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
            except tarfile.TarError as e:
                raise SynthdistillError(f"Shard '{path}' is not a readable tar file ({e}).") from None

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
