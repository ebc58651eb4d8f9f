import errno
import hashlib
import io
import json
import tarfile

import pytest
import webdataset as wds

from synthdistill.errors import SynthdistillError
from synthdistill.shards import (
    ShardSamples,
    ShardWriter,
    check_shard,
    decode_image,
    encode_sample,
    list_shards,
    read_index,
    read_record,
    record_path,
    shard_name,
    write_index,
)


def write_shard(path, images, start=0):
    with ShardWriter(path) as writer:
        for i, image in enumerate(images):
            writer.write(f"{start + i:08d}", encode_sample(image, {"class_index": start + i}))


def test_written_shards_read_back_by_us_and_by_webdataset(tmp_path, make_image):
    images = [make_image(i) for i in range(5)]
    write_shard(tmp_path / shard_name(0), images[:3])
    write_shard(tmp_path / shard_name(1), images[3:], start=3)
    write_index(tmp_path, {"source": "test"})
    assert read_index(tmp_path)["total"] == 5

    samples = ShardSamples(list_shards(tmp_path))
    assert len(samples) == 5
    assert [samples[i].meta["class_index"] for i in range(5)] == [0, 1, 2, 3, 4]
    assert samples[4].key == "00000004"
    assert decode_image(samples[2].image).size == (64, 64)

    plain = list(wds.WebDataset([str(p) for p in list_shards(tmp_path)], shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in plain] == [f"{i:08d}" for i in range(5)]


def test_same_samples_give_identical_bytes(tmp_path, make_image):
    write_shard(tmp_path / "a.tar", [make_image(1)])
    write_shard(tmp_path / "b.tar", [make_image(1)])
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_interrupted_writer_leaves_no_shard(tmp_path, make_image):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / shard_name(0)) as writer:
        writer.write("00000000", encode_sample(make_image(0), {}))
        raise RuntimeError("killed mid-shard")
    assert list(tmp_path.iterdir()) == []


def filling_disk(room: int):
    """An ``open`` whose files for writing raise ENOSPC once ``room`` bytes are written in all: the
    shard writer's real write path meeting a full disk."""
    real_open, left = open, [room]

    class FillingFile(io.FileIO):
        def write(self, data):
            left[0] -= len(data)
            if left[0] < 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    def opener(path, mode="r", *args, **kwargs):
        return FillingFile(path, mode) if "w" in mode else real_open(path, mode, *args, **kwargs)

    return opener


def test_a_full_disk_while_writing_leaves_no_temporary_file(tmp_path, make_image, monkeypatch):
    from synthdistill import shards

    monkeypatch.setattr(shards, "open", filling_disk(5000), raising=False)
    with pytest.raises(OSError, match="No space"), ShardWriter(tmp_path / shard_name(0)) as writer:
        for i in range(4):
            writer.write(f"{i:08d}", encode_sample(make_image(i), {}))
    assert list(tmp_path.iterdir()) == []


def test_corrupt_image_decodes_to_none(tmp_path):
    assert decode_image(b"not an image") is None


def test_unreadable_shard_is_named(tmp_path):
    bad = tmp_path / shard_name(0)
    bad.write_bytes(b"garbage" * 100)
    with pytest.raises(SynthdistillError, match=str(bad.name)):
        ShardSamples([bad])
    with pytest.raises(SynthdistillError, match="generate images first"):
        ShardSamples([])
    assert tarfile.is_tarfile(bad) is False


def shard_with_record(tmp_path, make_image, count=5):
    path = tmp_path / shard_name(0)
    write_shard(path, [make_image(i) for i in range(count)])
    return path


def member_offsets(path):
    with tarfile.open(path) as tar:
        return [(m.offset, m.offset_data, m.size) for m in tar.getmembers()]


def test_writer_records_count_size_and_hash_beside_the_shard(tmp_path, make_image):
    path = shard_with_record(tmp_path, make_image)
    record = read_record(path)
    assert record_path(path).name == "shard-000000.json"
    assert (record["count"], record["bytes"]) == (5, path.stat().st_size)
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert check_shard(path, full=True) == ""
    write_index(tmp_path, {})
    assert read_index(tmp_path)["shards"] == [record]
    # the record is no tar member: a plain webdataset reader sees the samples only
    plain = list(wds.WebDataset(str(path), shardshuffle=False))
    assert len(plain) == 5 and all({k for k in s if not k.startswith("__")} == {"jpg", "json"} for s in plain)


@pytest.mark.parametrize("where", ["mid-header", "mid-data", "member-boundary", "end-blocks"])
@pytest.mark.parametrize("with_record", [True, False])
def test_a_shard_cut_short_is_refused_with_its_name_or_skipped_and_listed(
    tmp_path, make_image, where, with_record
):
    path = shard_with_record(tmp_path, make_image)
    good = tmp_path / "good" / shard_name(1)
    write_shard(good, [make_image(9)], start=9)
    data = path.read_bytes()
    header, data_start, size = member_offsets(path)[6]  # the 4th sample's image
    _, last_data, last_size = member_offsets(path)[-1]
    cut = {
        "mid-header": header + 100,
        "mid-data": data_start + size // 2,
        "member-boundary": header,
        "end-blocks": last_data + -(-last_size // 512) * 512,  # every zero block after the last member
    }[where]
    path.write_bytes(data[:cut])
    if not with_record:
        record_path(path).unlink()
    assert check_shard(path) != ""
    with pytest.raises(SynthdistillError, match=f"Shard '{path}' is incomplete or corrupt"):
        ShardSamples([path, good])
    samples = ShardSamples([path, good], skip_bad=True)
    assert len(samples) == 1 and samples[0].key == "00000009"
    assert [p for p, _ in samples.skipped_shards] == [path]


def test_a_corrupt_image_member_fails_the_hash_and_decodes_to_none(tmp_path, make_image):
    path = shard_with_record(tmp_path, make_image)
    _, data_start, size = member_offsets(path)[2]
    data = bytearray(path.read_bytes())
    data[data_start + 20 : data_start + size - 20] = bytes(size - 40)
    path.write_bytes(bytes(data))
    assert check_shard(path) == ""  # count and size still match: only the hash sees it
    assert "SHA-256" in check_shard(path, full=True)
    samples = ShardSamples([path])  # the reader keeps it; the caller counts the image that fails
    decoded = [decode_image(samples[i].image) for i in range(len(samples))]
    assert [image is None for image in decoded] == [False, True, False, False, False]


def test_a_shard_with_fewer_samples_than_its_record_is_refused(tmp_path, make_image):
    path = shard_with_record(tmp_path, make_image)
    record = read_record(path)
    write_shard(path, [make_image(i) for i in range(4)])  # another, shorter archive under the old record
    record_path(path).write_text(json.dumps(record))
    with pytest.raises(SynthdistillError, match="4 samples where its record says 5"):
        ShardSamples([path])
