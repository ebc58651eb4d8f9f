"""distill.stream_decode=device: streamed images decoded and cropped on the training device (here the
CPU, where decode_jpeg runs libjpeg), against the worker path it replaces."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from synthdistill.cli import main
from synthdistill.config import ConfigError, load_recipe
from synthdistill.data.encoded import EncodedImages, decode_crops
from synthdistill.data.stream import build_train_source
from synthdistill.errors import SynthdistillError
from synthdistill.shards import ShardWriter
from synthdistill.train import distill_student as distill
from synthdistill.train.sources import RandomCrop, StreamTrainData
from test_distill import losses, read_log
from test_distill_webdata import (  # noqa: F401
    GOOD,
    SHARDS,
    epoch_ends,
    good_in,
    stream_config,
    torchrun_distill,
    web,
)

CPU = torch.device("cpu")
SIZE = 48  # the crop size; the images are 64 x 80, so crops are scaled down and (small boxes) up


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, make_blob) -> str:
    """Two shards of 6 captioned 64 x 80 images: JPEGs, every third a PNG. Returns the spec."""
    directory = tmp_path_factory.mktemp("mixed")
    for shard in range(2):
        with ShardWriter(directory / f"mixed-{shard}.tar") as writer:
            for i in range(6):
                number = shard * 6 + i
                image = make_blob(number, 80).crop((0, 0, 80, 64))
                fmt = "PNG" if i % 3 == 2 else "JPEG"
                writer.write(f"m{number}", {fmt.lower()[:3]: encoded(image, fmt), "txt": b"a thing"})
    return str(directory / "mixed-{0..1}.tar")


class BoxOf:
    """A worker-path transform that returns the box the crop draws, as the image: (4,) int64."""

    def __init__(self, crop: RandomCrop):
        self.crop = crop

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.tensor(self.crop.box(image))


def batches(spec: str, transform, encoded_files: bool = False, batch_size: int = 4) -> list:
    source = build_train_source(
        spec,
        batch_size=batch_size,
        transform=transform,
        num_workers=2,
        seed=3,
        shuffle_buffer=5,
        encoded=encoded_files,
    )
    return list(source.epoch(0))


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_device_decode_draws_the_worker_paths_boxes_and_nearly_its_pixels(mixed, interpolation):
    crop = RandomCrop(SIZE, (0.08, 1.0), (3 / 4, 4 / 3), interpolation)
    files = batches(mixed, crop.box, encoded_files=True)
    boxes = batches(mixed, BoxOf(crop))
    pixels = batches(mixed, crop)
    assert [b.keys for b in files] == [b.keys for b in boxes] == [b.keys for b in pixels]
    assert torch.equal(torch.cat([b.images.boxes for b in files]), torch.cat([b.images for b in boxes]))
    for on_device, by_workers in zip(files, pixels, strict=True):
        crops, kept = decode_crops(on_device.images, SIZE, interpolation, CPU)
        assert kept == list(range(len(on_device.keys))) and crops.dtype == torch.uint8
        difference = (crops.int() - by_workers.images.int()).abs()
        # libjpeg decodes alike in PIL and torchvision, and both resizes are antialiased with the same
        # filters: inside the crop the two agree to a grey level or two. Along its border PIL's filter
        # also reads the pixels just outside the box, which torch's resize of the cut-out crop cannot,
        # so edge rows differ more where a blob's edge runs along the box (measured: up to 14
        # levels over 200 images; the bound leaves twice that).
        margin = 6  # > the filter's reach at the largest upscaling of these boxes (~2.5x, 2 taps)
        assert difference.float().mean() < 0.5
        assert difference[..., margin:-margin, margin:-margin].max() <= 2
        assert difference.max() <= 32


def test_encoded_batches_split_and_join_back_to_their_files():
    files = [bytes([i]) * (i + 1) for i in range(5)]
    batch = EncodedImages.of(files, [(i, 0, 1, 1) for i in range(5)])
    head, rest = batch[:2], batch[2:]
    joined = EncodedImages.cat([head, rest[:1], rest[1:]])
    assert [f.numpy().tobytes() for f in joined.files()] == files
    assert [f.numpy().tobytes() for f in rest.files()] == files[2:]
    assert torch.equal(joined.boxes, batch.boxes) and len(batch[5:]) == 0


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, make_blob) -> tuple[str, set[str]]:
    """One shard of 12 images: JPEGs and PNGs, one JPEG cut short (its header reads, its pixels do
    not) and one file that is no image at all. Returns the spec and the keys that must train."""
    directory = tmp_path_factory.mktemp("damaged")
    good = set()
    with ShardWriter(directory / "damaged-0.tar") as writer:
        for number in range(12):
            key = f"d{number}"
            jpeg = encoded(make_blob(number), "JPEG")
            if number == 4:
                files = {"jpg": jpeg[: len(jpeg) // 2]}
            elif number == 9:
                files = {"jpg": b"no image here"}
            elif number % 3 == 1:
                files = {"png": encoded(make_blob(number), "PNG")}
            else:
                files = {"jpg": jpeg}
            good |= set() if number in (4, 9) else {key}
            writer.write(key, files)
    return str(directory / "damaged-0.tar"), good


def test_pngs_train_and_undecodable_images_are_counted_as_on_the_worker_path(damaged, tiny_teacher):
    spec, good = damaged
    crop = RandomCrop(32, (0.5, 1.0), (3 / 4, 4 / 3), "bicubic")
    runs = {}
    for decode in ("workers", "device"):
        source = build_train_source(
            spec,
            batch_size=4,
            transform=crop.box if decode == "device" else crop,
            num_samples=12,
            encoded=decode == "device",
        )
        data = StreamTrainData(
            source, tiny_teacher, 32, "fp32", False, device_crop=crop if decode == "device" else None
        )
        steps = list(data.epoch(0))
        runs[decode] = steps, data.epoch_stats(), data.input
    (worker_steps, worker_stats, _), (device_steps, device_stats, device_input) = runs.values()
    assert device_input == "stream-device-decode"
    # the shuffle precedes decoding, so both paths train on the same samples in the same order
    assert [k for s in device_steps for k in s.keys] == [k for s in worker_steps for k in s.keys]
    assert set(k for s in device_steps for k in s.keys) == good  # the PNGs among them
    assert all(torch.isfinite(s.images).all() and s.images.shape[1:] == (3, 32, 32) for s in device_steps)
    # the device path drops the cut JPEG from its batch (the worker path skips it before batching):
    # 11 samples in batches of 4 and 10 in batches of 4 both make 3 steps
    assert len(device_steps) == len(worker_steps) == 3
    assert (
        (device_stats.samples, device_stats.corrupt)
        == (worker_stats.samples, worker_stats.corrupt)
        == (10, 2)
    )


def test_a_batch_that_does_not_decode_at_all_is_refused(tmp_path, make_blob, tiny_teacher):
    with ShardWriter(tmp_path / "cut-0.tar") as writer:
        for number in range(4):
            jpeg = encoded(make_blob(number), "JPEG")
            writer.write(f"c{number}", {"jpg": jpeg[: len(jpeg) // 2]})  # the header reads
    crop = RandomCrop(32, (0.5, 1.0), (3 / 4, 4 / 3), "bicubic")
    source = build_train_source(
        str(tmp_path / "cut-0.tar"), batch_size=4, transform=crop.box, encoded=True, num_samples=4
    )
    data = StreamTrainData(source, tiny_teacher, 32, "fp32", False, device_crop=crop)
    with pytest.raises(SynthdistillError, match="stream_decode=workers"):
        next(data.epoch(0))


def test_cli_trains_with_device_decode_and_counts_bad_data(tmp_path, web):  # noqa: F811
    out = tmp_path / "student"
    main(
        [
            "distill", "--train-data", web, "--train-num-samples", str(GOOD), "--out", str(out),
            "--teacher", "tiny", "--student", "tiny", "--epochs", "3", "--batch-size", "8", "--lr", "2e-3",
            "--workers", "2", "--device", "cpu", "--set", "distill.teacher_pretrained=null",
            "--set", "distill.stream_decode=device", "--set", "distill.log_every=1",
            "--set", "distill.shuffle_buffer=8",
        ]
    )  # fmt: skip
    assert read_log(out)[0]["input"] == "stream-device-decode"
    logged = losses(out)
    assert len(logged) == 3 * 6 and all(torch.isfinite(torch.tensor(logged)))  # ceil(46 / 8) per epoch
    assert logged[-1] < logged[0] / 2
    ends = epoch_ends(out)
    assert all(
        (e["samples"], e["corrupt"], e["shards_read"], e["shards_failed"]) == (GOOD, 2, 6, 1) for e in ends
    )


def test_device_decode_resumes_without_repeating_finished_shards(tmp_path, web):  # noqa: F811
    out = tmp_path / "student"
    config = stream_config(web, shuffle_buffer=4, stream_decode="device")
    first = distill(None, out, config, device="cpu", stop_after_steps=3)
    assert not first.completed and first.steps == 3
    (checkpoint,) = (tmp_path / "checkpoints").iterdir()
    finished = set(torch.load(checkpoint / "state.pt", weights_only=True)["data"]["finished"]["0"])
    assert 0 < len(finished - {SHARDS}) < SHARDS
    second = distill(None, out, config, device="cpu")
    assert second.completed and second.resumed_from_step == 3 and second.input == "stream-device-decode"
    rest, full = epoch_ends(out)
    assert (rest["samples"], full["samples"]) == (GOOD - good_in(finished), GOOD)


@pytest.mark.slow
def test_two_gloo_processes_decode_on_the_device_in_step(tmp_path, web):  # noqa: F811
    out = tmp_path / "student"
    torchrun_distill(web, out, "--workers", "1", "--set", "distill.stream_decode=device")
    log = read_log(out)
    assert (log[0]["world_size"], log[0]["input"]) == (2, "stream-device-decode")
    ends = epoch_ends(out)
    assert all((e["samples"], e["corrupt"], e["shards_failed"]) == (GOOD, 2, 1) for e in ends)
    steps = [line["step"] for line in log if "loss" in line]
    assert steps == list(range(1, len(steps) + 1)) and ends[-1]["step"] == steps[-1]
    assert sum(e["padding_batches"] for e in ends) > 0  # a rank with fewer samples kept in step


def test_device_decode_only_for_streamed_data():
    with pytest.raises(ConfigError, match=r"stream_decode=device .* set distill\.train_data"):
        load_recipe(overrides=["dataset=pets", "distill.stream_decode=device"])
    with pytest.raises(ConfigError, match="input=decoded"):
        load_recipe(
            overrides=["dataset=pets", "distill.train_data=/d/{0..1}.tar", "distill.stream_decode=device"]
            + ["distill.input=decoded"]
        )
    recipe = load_recipe(overrides=["distill.train_data=/d/{0..1}.tar", "distill.stream_decode=device"])
    assert recipe.distill.stream_decode == "device"
