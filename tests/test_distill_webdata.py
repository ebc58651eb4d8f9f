"""Distillation on streamed data (distill.train_data): WebDataset shards with captions, an image
folder, shard-level resume, two gloo processes. Tiny models, CPU."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from synthdistill.cli import main
from synthdistill.config import DistillConfig
from synthdistill.errors import SynthdistillError
from synthdistill.shards import ShardWriter
from synthdistill.student import load_student
from synthdistill.train import distill_student as distill
from synthdistill.train.sources import caption_texts
from test_distill import losses, read_log, tiny_config

SHARDS, PER_SHARD = 6, 8
CORRUPT = {"s1-3", "s4-6"}  # image bytes that do not decode
UNCAPTIONED = "s2-5"  # an image without a caption: trained on by fd, skipped by vl
GOOD = SHARDS * PER_SHARD - len(CORRUPT)  # 46


def jpeg(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def good_in(shards) -> int:
    """Good samples (decodable images) in these shard indices."""
    return sum(f"s{shard}-{i}" not in CORRUPT for shard in shards if shard < SHARDS for i in range(PER_SHARD))


@pytest.fixture(scope="module")
def web(tmp_path_factory, make_blob) -> str:
    """SHARDS WebDataset shards of PER_SHARD 64 px images with .txt captions (some repeated), two
    corrupt images, one uncaptioned, and one more 'shard' that is not a tar file. Returns the spec."""
    directory = tmp_path_factory.mktemp("web")
    for shard in range(SHARDS):
        with ShardWriter(directory / f"web-{shard:04d}.tar") as writer:
            for i in range(PER_SHARD):
                key, number = f"s{shard}-{i}", shard * PER_SHARD + i
                files = {"jpg": b"not a jpeg" if key in CORRUPT else jpeg(make_blob(number))}
                if key != UNCAPTIONED:
                    files["txt"] = f"a photo of thing {number % 12}".encode()
                writer.write(key, files)
    (directory / f"web-{SHARDS:04d}.tar").write_bytes(b"not a tar file")
    return str(directory / f"web-{{0000..{SHARDS:04d}}}.tar")


def stream_config(spec: str, **overrides) -> DistillConfig:
    """test_distill's tiny settings, trained on ``spec`` (an epoch of GOOD samples)."""
    return tiny_config(**{"train_data": spec, "train_num_samples": GOOD, "shuffle_buffer": 8, **overrides})


def epoch_ends(student_dir) -> list[dict]:
    return [line for line in read_log(student_dir) if line.get("event") == "epoch_end"]


def weights(student_dir) -> dict[str, torch.Tensor]:
    return load_file(str(student_dir / "model.safetensors"))


def test_fd_on_web_shards_learns_and_counts_bad_data(tmp_path, web):
    out = tmp_path / "student"
    summary = distill(None, out, stream_config(web, epochs=4), device="cpu")
    assert summary.completed and summary.steps == summary.total_steps == 4 * 6  # ceil(46 / 8) per epoch
    logged = losses(out)
    assert len(logged) == 24 and all(torch.isfinite(torch.tensor(logged)))
    assert logged[-1] < logged[0] / 3
    ends = epoch_ends(out)
    assert [e["epoch"] for e in ends] == [0, 1, 2, 3]
    assert all(
        (e["samples"], e["corrupt"], e["shards_read"], e["shards_failed"]) == (GOOD, 2, 6, 1) for e in ends
    )
    assert (summary.corrupt_samples, summary.failed_shards) == (4 * 2, 4 * 1)
    line = next(line for line in read_log(out) if "loss" in line)
    assert line["images_per_s"] == pytest.approx(line["images_per_s_per_gpu"]) and line["eta_s"] > 0
    assert load_student(out).config.preprocessing.image_size == 64


def test_vl_trains_against_the_teachers_embeddings_of_the_captions(tmp_path, web):
    out = tmp_path / "student"
    summary = distill(None, out, stream_config(web, loss="vl", epochs=1), device="cpu")
    assert summary.completed and all(torch.isfinite(torch.tensor(losses(out))))
    (end,) = epoch_ends(out)
    assert (end["samples"], end["no_text"], end["corrupt"]) == (GOOD - 1, 1, 2)  # captions were read


def test_identical_captions_share_one_text(tiny_teacher):
    labels, texts = caption_texts(tiny_teacher, ["a dog", "a cat", "a dog", "a bird"], "fp32")
    assert labels.tolist() == [0, 1, 0, 2]
    assert torch.allclose(texts, tiny_teacher.encode_texts(["a dog", "a cat", "a bird"]))


def test_streamed_data_order_is_fixed_by_the_seed(tmp_path, web):
    config = stream_config(web, workers=2, shuffle_buffer=16)
    runs = {name: tmp_path / name / "student" for name in ("a", "b", "other seed")}
    for name, out in runs.items():
        distill(None, out, config, seed=1 if name == "other seed" else 0, device="cpu")
    a, b, other = (weights(out) for out in runs.values())
    assert all(torch.equal(a[k], b[k]) for k in a) and losses(runs["a"]) == losses(runs["b"])
    assert not all(torch.equal(a[k], other[k]) for k in a)


def test_exact_epoch_resumes_without_repeating_finished_shards(tmp_path, web):
    out = tmp_path / "student"
    config = stream_config(web, shuffle_buffer=4)
    first = distill(None, out, config, device="cpu", stop_after_steps=3)
    assert not first.completed and first.steps == 3 and not (out / "config.json").exists()
    (checkpoint,) = (tmp_path / "checkpoints").iterdir()
    data = torch.load(checkpoint / "state.pt", weights_only=True)["data"]
    finished = set(data["finished"]["0"])
    assert data["epoch"] == 0 and 0 < len(finished - {SHARDS}) < SHARDS  # {SHARDS}: the broken one

    second = distill(None, out, config, device="cpu")
    assert second.completed and second.resumed_from_step == 3
    rest, full = epoch_ends(out)  # the stopped call finished no epoch
    assert rest["samples"] == GOOD - good_in(finished)  # only the shards not finished before
    assert full["samples"] == GOOD


def test_resampled_epoch_resumes_with_the_samples_left(tmp_path, web):
    out = tmp_path / "student"
    config = stream_config(web, resampled=True, train_num_samples=32)  # 4 steps per epoch
    assert distill(None, out, config, device="cpu", stop_after_steps=3).steps == 3
    summary = distill(None, out, config, device="cpu")
    assert summary.completed and summary.steps == summary.total_steps == 8
    assert [e["samples"] for e in epoch_ends(out)] == [32 - 3 * 8, 32]


def test_cli_trains_on_an_image_folder(tmp_path, make_blob, monkeypatch, capsys):
    root = tmp_path / "train"
    for c, name in enumerate(["n01", "n02", "n03"]):
        (root / name).mkdir(parents=True)
        for i in range(6):
            make_blob(10 * c + i).save(root / name / f"{name}_{i}.{'png' if i % 2 else 'JPEG'}")
    monkeypatch.chdir(tmp_path)  # the default run directory lands here
    out = tmp_path / "student"
    main(
        [
            "distill", "--train-data", f"imagenet:{root}", "--out", str(out), "--teacher", "tiny",
            "--student", "tiny", "--epochs", "2", "--batch-size", "8", "--workers", "0", "--device", "cpu",
            "--set", "distill.teacher_pretrained=null",
        ]
    )  # fmt: skip
    assert f"student: {out} (6 steps" in capsys.readouterr().out  # ceil(18 / 8) per epoch
    assert [e["samples"] for e in epoch_ends(out)] == [18, 18]
    assert load_student(out).config.teacher == "tiny"


def test_streamed_data_needs_its_epoch_size_and_excludes_shards(tmp_path, web, capsys):
    with pytest.raises(SynthdistillError, match=r"distill\.train_num_samples=N"):
        distill(None, tmp_path / "student", stream_config(web, train_num_samples=None), device="cpu")
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--shards", str(tmp_path), "--train-data", web, "--device", "cpu"])
    assert exit_info.value.code == 2 and "train_data=null" in capsys.readouterr().err


def torchrun_distill(web: str, out, *extra: str) -> subprocess.CompletedProcess:
    """`synthdistill distill` on web, fd, tiny models, batch 16, under torchrun with two CPU processes."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "synthdistill", "distill", "--train-data", web, "--train-num-samples", str(GOOD),
        "--loss", "fd", "--out", str(out), "--teacher", "tiny", "--student", "tiny", "--epochs", "2",
        "--batch-size", "16", "--lr", "2e-3", "--device", "cpu",
        "--set", "distill.teacher_pretrained=null", "--set", "distill.log_every=1", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("student: ") == 1  # only rank 0 speaks
    return result


def test_torchrun_with_two_gloo_processes_streams_disjoint_shares_in_step(tmp_path, web):
    out = tmp_path / "student"
    torchrun_distill(web, out, "--workers", "1")
    log = read_log(out)
    assert log[0]["world_size"] == 2
    ends = epoch_ends(out)
    # every good sample once per epoch over both ranks: the ranks read disjoint shards
    assert all((e["samples"], e["corrupt"], e["shards_failed"]) == (GOOD, 2, 1) for e in ends)
    steps = [line["step"] for line in log if "loss" in line]
    assert steps == list(range(1, len(steps) + 1)) and ends[-1]["step"] == steps[-1]
    assert sum(e["padding_batches"] for e in ends) > 0  # a rank with fewer samples kept in step
    assert load_student(out).config.embed_dim == 32


def test_run_stopped_on_one_process_resumes_on_two(tmp_path, web):
    out = tmp_path / "student"
    distill(None, out, stream_config(web, batch_size=16), device="cpu", stop_after_steps=2)
    (checkpoint,) = (tmp_path / "checkpoints").iterdir()
    finished = set(torch.load(checkpoint / "state.pt", weights_only=True)["data"]["finished"]["0"])
    assert finished - {SHARDS}
    torchrun_distill(
        web, out, "--workers", "0", "--set", "distill.cache_views=2", "--set", "distill.shuffle_buffer=8"
    )
    assert [line["world_size"] for line in read_log(out) if line.get("event") == "start"] == [1, 2]
    rest, full = epoch_ends(out)
    assert (rest["samples"], full["samples"]) == (GOOD - good_in(finished), GOOD)
    assert load_student(out).config.embed_dim == 32
