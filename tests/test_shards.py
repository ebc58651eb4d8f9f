import tarfile

import pytest
import webdataset as wds

from synthdistill.errors import SynthdistillError
from synthdistill.shards import (
    ShardSamples,
    ShardWriter,
    decode_image,
    encode_sample,
    list_shards,
    read_index,
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
