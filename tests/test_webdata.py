"""Streaming training data: shards split over ranks and workers, bad data counted, shard-level resume."""

from __future__ import annotations

import io
import json
import math
import socket
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from synthdistill.config import load_recipe
from synthdistill.data import stream as webdata
from synthdistill.data.stream import build_train_source, expand_urls, measure_throughput
from synthdistill.errors import SynthdistillError
from synthdistill.shards import ShardWriter, encode_sample, shard_name, write_index

SHARDS, PER_SHARD, SIZE = 6, 5, 16
CORRUPT = {"s1-2", "s4-0"}  # image bytes that do not decode
UNCAPTIONED = "s2-3"  # an image without .txt or .json


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, SIZE, SIZE) in [0, 1]; module level so spawned processes can unpickle it."""
    array = np.asarray(image.resize((SIZE, SIZE)), dtype=np.float32) / 255
    return torch.from_numpy(array).permute(2, 0, 1)


def image_bytes(seed: int, fmt: str) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def caption_files(key: str, number: int) -> dict[str, bytes]:
    """Captions in the three places a sample may keep one: .txt, .json caption, .json prompt."""
    if key == UNCAPTIONED:
        return {}
    text = f"caption of {key}"
    kind = number % 3
    if kind == 0:
        return {"txt": text.encode()}
    field = "caption" if kind == 1 else "prompt"
    return {"json": json.dumps({field: text, "other": 1}).encode()}


def write_web_shards(directory: Path) -> tuple[str, list[str]]:
    """SHARDS tar shards of PER_SHARD samples plus one unreadable shard; returns (spec, good keys)."""
    good = []
    for shard in range(SHARDS):
        with ShardWriter(directory / f"web-{shard:04d}.tar") as writer:
            for i in range(PER_SHARD):
                key, number = f"s{shard}-{i}", shard * PER_SHARD + i
                image = {"png": image_bytes(number, "PNG")} if i % 2 else {"jpg": image_bytes(number, "JPEG")}
                if key in CORRUPT:
                    image = {"jpg": b"these bytes are not an image"}
                else:
                    good.append(key)
                writer.write(key, {**image, **caption_files(key, number)})
    (directory / f"web-{SHARDS:04d}.tar").write_bytes(b"not a tar file at all")
    return str(directory / f"web-{{0000..{SHARDS:04d}}}.tar"), good


@pytest.fixture
def web(tmp_path):
    return write_web_shards(tmp_path)


def shard_of(key: str) -> int:
    return int(key[1:].split("-")[0])


def run_epoch(source, epoch=0, stop_after=None):
    batches = []
    for batch in source.epoch(epoch):
        batches.append(batch)
        if stop_after is not None and len(batches) == stop_after:
            break
    return batches


def keys_of(batches) -> list[str]:
    return [k for b in batches if not b.padding for k in b.keys]


def test_expand_urls():
    assert expand_urls("/d/{00000008..00000010}.tar") == [
        "/d/00000008.tar",
        "/d/00000009.tar",
        "/d/00000010.tar",
    ]
    assert expand_urls(" a/{0..1}.tar :: pipe:cat b.tar ") == ["a/0.tar", "a/1.tar", "pipe:cat b.tar"]
    assert expand_urls("s3://bucket/x-{a,b}.tar") == ["s3://bucket/x-a.tar", "s3://bucket/x-b.tar"]
    with pytest.raises(SynthdistillError):
        expand_urls(" :: ")


def test_unknown_url_scheme_and_missing_paths_are_refused_early(tmp_path):
    with pytest.raises(SynthdistillError, match="nosuchfs"):
        build_train_source("nosuchfs://bucket/{0..3}.tar", batch_size=2, transform=to_tensor)
    with pytest.raises(SynthdistillError, match="No shard"):
        build_train_source(str(tmp_path / "{0..3}.tar"), batch_size=2, transform=to_tensor)
    with pytest.raises(SynthdistillError, match="train_num_samples"):
        build_train_source(str(tmp_path), batch_size=2, transform=to_tensor, resampled=True)


def test_exact_epoch_yields_every_good_sample_once_and_counts_the_bad(web):
    spec, good = web
    source = build_train_source(spec, batch_size=4, transform=to_tensor, num_workers=2, shuffle_buffer=8)
    batches = run_epoch(source)
    assert Counter(keys_of(batches)) == Counter(good)
    assert all(b.images.shape == (len(b.keys), 3, SIZE, SIZE) and b.texts is None for b in batches)
    assert [len(b.keys) for b in batches] == [4] * (len(good) // 4) + [len(good) % 4] * (len(good) % 4 > 0)
    stats = source.stats
    assert (stats.samples, stats.corrupt, stats.shards_read, stats.shards_failed) == (len(good), 2, SHARDS, 1)
    assert sorted(source.worker_stats) == [0, 1]
    assert sum(s.samples for s in source.worker_stats.values()) == len(good)
    assert source.start_epoch == 1  # the epoch is complete
    assert keys_of(run_epoch(source, epoch=1)) != keys_of(batches)  # reshuffled per epoch


def test_captions_come_from_txt_or_json_and_uncaptioned_samples_are_counted(web):
    spec, good = web
    source = build_train_source(spec, batch_size=5, transform=to_tensor, need_text=True)
    batches = run_epoch(source)
    texts = {k: t for b in batches for k, t in zip(b.keys, b.texts, strict=True)}
    assert sorted(texts) == sorted(set(good) - {UNCAPTIONED})
    assert all(t == f"caption of {k}" for k, t in texts.items())
    assert (source.stats.no_text, source.stats.corrupt) == (1, 2)


def test_ranks_and_workers_read_disjoint_shards(web):
    spec, good = web
    seen = []
    for rank in range(2):
        source = build_train_source(
            spec, batch_size=3, transform=to_tensor, rank=rank, world_size=2, num_workers=2
        )
        seen.append(keys_of(run_epoch(source)))
    assert {shard_of(k) for k in seen[0]}.isdisjoint({shard_of(k) for k in seen[1]})
    assert Counter(seen[0] + seen[1]) == Counter(good)


def test_interrupted_epoch_resumes_without_repeating_finished_shards(web):
    spec, good = web
    build = dict(batch_size=3, transform=to_tensor, num_workers=2, shuffle_buffer=2, seed=7)
    first = build_train_source(spec, **build)
    seen_before = keys_of(run_epoch(first, stop_after=6))
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint holds
    finished = set(state["finished"]["0"])
    assert state["epoch"] == 0 and len(finished - {SHARDS}) >= 2 and len(finished) < SHARDS

    resumed = build_train_source(spec, **build)
    resumed.load_state_dict(state)
    assert resumed.start_epoch == 0
    seen_after = keys_of(run_epoch(resumed, epoch=0))
    done_keys = [k for k in good if shard_of(k) in finished]
    assert not set(seen_after) & set(done_keys)
    assert Counter(seen_after + done_keys) == Counter(good)
    assert set(done_keys) <= set(seen_before)  # a finished shard was really consumed before the stop
    partly_read = set(seen_before) - set(done_keys)
    assert partly_read and partly_read <= set(seen_after)  # unfinished shards are read again in full

    again = resumed.state_dict()  # a second interruption would keep the shards of the first
    assert again["epoch"] == 1 and again["finished"] == {"0": []} and again["resumed"] == []


def test_resume_state_checks_the_data_and_mode(web, tmp_path):
    spec, _ = web
    state = build_train_source(spec, batch_size=2, transform=to_tensor).state_dict()
    fewer = build_train_source(spec.replace(f"{SHARDS:04d}}}", "0003}"), batch_size=2, transform=to_tensor)
    with pytest.raises(SynthdistillError, match="changed"):
        fewer.load_state_dict(state)
    resampled = build_train_source(spec, batch_size=2, transform=to_tensor, resampled=True, num_samples=10)
    with pytest.raises(SynthdistillError, match="resampled=false"):
        resampled.load_state_dict(state)


def test_resampled_epoch_is_num_samples_over_world_size_per_rank(web):
    spec, good = web
    build = dict(
        batch_size=4, transform=to_tensor, world_size=2, num_workers=2, resampled=True, num_samples=23
    )
    for rank in range(2):
        source = build_train_source(spec, rank=rank, **build)
        batches = run_epoch(source)
        assert sum(len(b.keys) for b in batches) == 11
        assert len(batches) == source.batches_per_epoch == math.ceil(11 / 4)
        assert set(keys_of(batches)) <= set(good)
        again = build_train_source(spec, rank=rank, **build)
        assert keys_of(run_epoch(again)) == keys_of(batches)  # seeded: the same stream
        assert keys_of(run_epoch(again, epoch=1)) != keys_of(batches)


def test_resampled_resume_draws_only_the_rest_of_the_epoch(web):
    spec, _ = web
    build = dict(batch_size=4, transform=to_tensor, resampled=True, num_samples=12, seed=3)
    first = build_train_source(spec, **build)
    run_epoch(first, epoch=2, stop_after=1)
    resumed = build_train_source(spec, **{**build, "seed": 99})
    resumed.load_state_dict(first.state_dict())
    assert (resumed.start_epoch, resumed.seed) == (2, 3)
    assert sum(len(b.keys) for b in run_epoch(resumed, epoch=2)) == 8


def test_imagefolder_source(tmp_path, monkeypatch):
    root = tmp_path / "train"
    good = []
    for c, (name, ext) in enumerate([("n001", "JPEG"), ("n002", "png"), ("n003", "jpg")]):
        (root / name).mkdir(parents=True)
        for i in range(4):
            fmt = "PNG" if ext == "png" else "JPEG"
            (root / name / f"{name}_{i}.{ext}").write_bytes(image_bytes(10 * c + i, fmt))
            good.append(f"{name}/{name}_{i}")
    (root / "n003" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "n003" / "notes.txt").write_text("ignored")
    monkeypatch.setattr(webdata, "FOLDER_SHARD_SIZE", 3)

    seen, failed = [], 0
    for rank in range(2):
        source = build_train_source(
            f"imagenet:{root}", batch_size=4, transform=to_tensor, rank=rank, world_size=2, num_workers=2
        )
        assert (source.num_shards, source.num_samples) == (5, 13)
        seen.append(keys_of(run_epoch(source)))
        failed += source.stats.corrupt
    assert Counter(seen[0] + seen[1]) == Counter(good) and failed == 1
    assert not set(seen[0]) & set(seen[1])
    with pytest.raises(SynthdistillError, match="no captions"):
        build_train_source(f"imagenet:{root}", batch_size=4, transform=to_tensor, need_text=True)


def test_run_shard_folder_and_its_prompts(tmp_path):
    shards = tmp_path / "run" / "shards"
    for s in range(2):
        with ShardWriter(shards / shard_name(s)) as writer:
            for i in range(3):
                image = Image.fromarray(np.full((SIZE, SIZE, 3), 40 * i + s, dtype=np.uint8))
                writer.write(f"{s:03d}{i:05d}", encode_sample(image, {"prompt": f"a photo {s}-{i}"}))
    write_index(shards, {})
    source = build_train_source(str(tmp_path / "run"), batch_size=4, transform=to_tensor, need_text=True)
    assert (source.num_shards, source.num_samples) == (2, 6)
    texts = sorted(t for b in run_epoch(source) for t in b.texts)
    assert texts == sorted(f"a photo {s}-{i}" for s in range(2) for i in range(3))


def test_pipe_commands_and_failing_commands(web):
    spec, good = web
    first = expand_urls(spec)[0]
    source = build_train_source(
        f"pipe:cat {first}::pipe:cat {first}.missing", batch_size=8, transform=to_tensor
    )
    assert sorted(keys_of(run_epoch(source))) == sorted(k for k in good if shard_of(k) == 0)
    assert (source.stats.shards_read, source.stats.shards_failed) == (1, 1)


def test_throughput():
    rate = measure_throughput(images=500, seconds=2.0, world_size=8, remaining_images=4_000_000)
    assert (rate.per_gpu, rate.total, rate.eta_seconds) == (250.0, 2000.0, 2000.0)
    assert str(rate) == "250.0 img/s per GPU, 2000.0 img/s total, ETA 0:33:20"
    assert measure_throughput(10, 0.0).eta_seconds is None


def test_domain_agnostic_recipes_name_their_training_data():
    configs = Path(__file__).resolve().parents[1] / "configs"
    datacomp = load_recipe(configs / "datacomp_medium.yaml").distill
    assert len(expand_urls(datacomp.train_data)) == 12896 and datacomp.resampled
    imagenet = load_recipe(configs / "imagenet.yaml").distill
    assert imagenet.train_data.startswith("imagenet:") and not imagenet.resampled
    assert imagenet.train_num_samples == 1_281_167 and imagenet.loss == "fd"
    synthci = load_recipe(configs / "synthci30m.yaml").distill
    assert synthci.train_num_samples == 30_000_000 and synthci.resampled


# --------------------------------------------------------------------------- two real processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gloo_rank(rank: int, port: int, spec: str, out: str) -> None:
    """One rank: a full exact epoch, epoch 1 interrupted after 3 steps and resumed, then an epoch
    over a single shard, which leaves rank 1 nothing to read."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        build = dict(
            batch_size=3, transform=to_tensor, rank=rank, world_size=2, num_workers=2, shuffle_buffer=2
        )
        source = build_train_source(spec, **build)
        full = run_epoch(source)
        stats = source.reduce_stats()
        cut = run_epoch(source, epoch=1, stop_after=3)
        state = source.state_dict()
        resumed = build_train_source(spec, **build)
        resumed.load_state_dict(state)
        rest = run_epoch(resumed, epoch=1)
        one_shard = build_train_source(expand_urls(spec)[0], **{**build, "batch_size": 2})
        lonely = run_epoch(one_shard)
        result = {
            "full": keys_of(full),
            "full_batches": len(full),
            "padding": sum(b.padding for b in full),
            "corrupt": stats.corrupt,
            "shards_failed": stats.shards_failed,
            "cut": keys_of(cut),
            "state": state,
            "rest": keys_of(rest),
            "rest_batches": len(rest),
            "one_shard": [(len(b.keys), b.padding) for b in lonely],
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_split_shards_and_resume(web, tmp_path):
    spec, good = web
    out = tmp_path / "out"
    out.mkdir()
    mp.start_processes(gloo_rank, args=(free_port(), spec, str(out)), nprocs=2, start_method="spawn")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]

    shards = [{shard_of(k) for k in r["full"]} for r in ranks]
    assert shards[0].isdisjoint(shards[1])
    assert Counter(ranks[0]["full"] + ranks[1]["full"]) == Counter(good)
    real = [math.ceil(len(r["full"]) / 3) for r in ranks]  # at most one partial batch per rank
    assert [r["full_batches"] for r in ranks] == [max(real)] * 2  # in step: the shorter rank padded
    assert [r["padding"] for r in ranks] == [max(real) - n for n in real] and max(real) > min(real)
    assert all((r["corrupt"], r["shards_failed"]) == (2, 1) for r in ranks)  # summed over ranks

    state = ranks[0]["state"]
    assert state == ranks[1]["state"] and sorted(state["finished"]) == ["0", "1"]
    finished = {s for shards in state["finished"].values() for s in shards}
    assert finished - {SHARDS}, finished
    done_keys = [k for k in good if shard_of(k) in finished]
    rest = ranks[0]["rest"] + ranks[1]["rest"]
    assert Counter(rest + done_keys) == Counter(good)
    assert set(done_keys) <= set(ranks[0]["cut"] + ranks[1]["cut"])
    assert ranks[0]["rest_batches"] == ranks[1]["rest_batches"]
    # rank 1 had no shard: it kept in step with batches drawn at random, all marked as padding
    assert [tuple(b) for b in ranks[0]["one_shard"]] == [(2, False), (2, False), (1, False)]
    assert [tuple(b) for b in ranks[1]["one_shard"]] == [(2, True)] * 3
