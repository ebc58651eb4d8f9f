import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distill_runs import kill_after_first_checkpoint, resume_and_run_straight, tiny_config
from synthdistill.cli import main
from synthdistill.data.augment import EpochBatches, ViewDataset, view_loader
from synthdistill.errors import SynthdistillError
from synthdistill.registry import domain_from_classes, get_dataset
from synthdistill.runtime import DistEnv
from synthdistill.shards import ShardSamples, ShardWriter, list_shards, shard_name
from synthdistill.student import create_student, load_student
from synthdistill.train import LOG_NAME
from synthdistill.train import distill_student as distill
from synthdistill.train.sources import ShardViewSource

CLASSES = ("a", "b", "c")  # what write_shards labels the images with


def read_log(student_dir) -> list[dict]:
    return [json.loads(line) for line in (student_dir / LOG_NAME).read_text().splitlines()]


def losses(student_dir) -> list[float]:
    return [line["loss"] for line in read_log(student_dir) if "loss" in line]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, write_shards):
    """48 images: 6 steps per epoch at batch 8."""
    return write_shards(tmp_path_factory.mktemp("distill") / "shards", 48, shard_size=20)


def test_distilled_student_agrees_with_the_teacher_on_held_out_images(
    tmp_path, write_shards, make_blob, tiny_teacher
):
    shards = write_shards(tmp_path / "shards", 384, shard_size=128)
    config = tiny_config(epochs=24, batch_size=32, cache_views=4, log_every=12)
    summary = distill(shards, tmp_path / "student", config, device="cpu")
    assert summary.completed and summary.steps == summary.total_steps == 24 * 12

    held_out = torch.stack([tiny_teacher.preprocess_val(make_blob(100_000 + i)) for i in range(200)])
    cars = get_dataset("cars")
    head = tiny_teacher.build_zero_shot_head(cars.classnames, cars.templates)
    teacher = tiny_teacher.encode_images(held_out)
    teacher_classes = (teacher @ head).argmax(dim=1)
    counts = torch.bincount(teacher_classes)
    assert (counts > 0).sum() >= 4 and counts.max() <= 0.6 * len(held_out)  # the teacher is not degenerate

    student = load_student(tmp_path / "student")
    assert student.config.preprocessing == tiny_teacher.preprocessing  # same pixels for both
    untrained = create_student(
        "tiny", tiny_teacher.embed_dim, preprocessing=tiny_teacher.preprocessing
    ).eval()
    with torch.no_grad():
        agreement = {
            name: ((model(held_out) @ head).argmax(dim=1) == teacher_classes).float().mean().item()
            for name, model in (("trained", student), ("untrained", untrained))
        }
        cosine = (student(held_out) * teacher).sum(dim=1).mean().item()
    assert cosine >= 0.9
    assert agreement["trained"] >= 0.8
    assert agreement["untrained"] <= 0.5 and agreement["trained"] - agreement["untrained"] >= 0.3
    logged = losses(tmp_path / "student")
    assert logged[-1] < logged[0] / 3  # fd's distance, the root of the squared loss (which fell tenfold)


def test_cached_and_live_teacher_solve_the_same_problem(tmp_path, shards):
    # 2 epochs with 2 cached views: every run trains on views 0 and 1, cached or live
    runs = {
        "cached fp32": tiny_config(cache_teacher=True, cache_dtype="fp32"),
        "live": tiny_config(cache_teacher=False),
        "cached fp16": tiny_config(cache_teacher=True),
        "other views": tiny_config(cache_teacher=False, aug_scale=[0.5, 1.0]),
    }
    for name, config in runs.items():
        summary = distill(shards, tmp_path / name / "student", config, device="cpu")
        assert (summary.teacher_cache is not None) == config.cache_teacher
    exact, live, half, other = (np.array(losses(tmp_path / name / "student")) for name in runs)
    weights = {name: load_file(str(tmp_path / name / "student" / "model.safetensors")) for name in runs}
    assert all(torch.equal(weights["live"][k], weights["cached fp32"][k]) for k in weights["live"])
    assert exact.tolist() == live.tolist()
    # fp16 targets only round: a far smaller change than training on other views
    assert np.abs(half - live).max() < np.abs(other - live).max() / 10


def test_interrupted_and_resumed_run_equals_a_straight_run(tmp_path, shards):
    config = tiny_config(checkpoint_every=4)
    straight = distill(shards, tmp_path / "straight" / "student", config, device="cpu")
    first = distill(shards, tmp_path / "resumed" / "student", config, device="cpu", stop_after_steps=6)
    assert not first.completed and first.steps == 6
    assert not (tmp_path / "resumed" / "student" / "config.json").exists()
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()] == ["step-00000006"]
    second = distill(shards, tmp_path / "resumed" / "student", config, device="cpu")
    assert second.resumed_from_step == 6 and second.steps == straight.steps == 12
    a = load_file(str(tmp_path / "straight" / "student" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "student" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "resumed" / "student") == losses(tmp_path / "straight" / "student")


def test_checkpoint_of_other_settings_is_refused_unless_starting_over(tmp_path, shards):
    out = tmp_path / "student"
    distill(shards, out, tiny_config(), device="cpu", stop_after_steps=2)
    with pytest.raises(SynthdistillError, match="resume=False"):
        distill(shards, out, tiny_config(lr=1e-3), device="cpu")
    again = distill(shards, out, tiny_config(lr=1e-3), device="cpu", resume=False)
    assert again.completed and again.resumed_from_step is None
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000012"]


def test_non_finite_loss_names_the_step_and_samples_and_keeps_the_checkpoint(tmp_path, shards):
    cache_dir = tmp_path / "teacher_cache"  # not the shared one: it gets poisoned
    first = distill(
        shards, tmp_path / "first", tiny_config(), device="cpu", cache_dir=cache_dir, stop_after_steps=1
    )
    poisoned_index = 17
    poisoned_key = ShardSamples(list_shards(shards)).key(poisoned_index)
    embeddings = np.load(first.teacher_cache, mmap_mode="r+")
    embeddings[:, poisoned_index] = np.nan
    embeddings.flush()

    out = tmp_path / "second" / "student"
    with pytest.raises(SynthdistillError, match=f"at step (\\d+) .*{poisoned_key}") as error:
        distill(shards, out, tiny_config(checkpoint_every=1), device="cpu", cache_dir=cache_dir)
    step = int(re.search(r"at step (\d+)", str(error.value)).group(1))
    checkpoints = sorted(p.name for p in (tmp_path / "second" / "checkpoints").iterdir())
    assert checkpoints == ([f"step-{step - 1:08d}"] if step > 1 else [])
    assert not (out / "config.json").exists()
    (event,) = [line for line in read_log(out) if line.get("event") == "non_finite_loss"]
    assert event["step"] == step and poisoned_key in event["keys"]


def test_corrupt_image_is_skipped_counted_and_named(tmp_path, write_shards):
    shards = write_shards(tmp_path / "shards", 15, shard_size=10)
    with ShardWriter(shards / shard_name(2)) as writer:
        writer.write("broken", {"jpg": b"\xff\xd8 not a jpeg", "json": b'{"class_index": 0}'})
    summary = distill(shards, tmp_path / "student", tiny_config(), device="cpu")
    assert summary.completed and summary.corrupt_keys == ["broken"]
    assert summary.to_dict()["corrupt_images"] == 1
    events = [line for line in read_log(tmp_path / "student") if line.get("event") == "corrupt_image"]
    assert [e["key"] for e in events] == ["broken"]


def test_missing_or_empty_shards_are_named(tmp_path):
    with pytest.raises(SynthdistillError, match="'.*nowhere' does not exist"):
        distill(tmp_path / "nowhere", tmp_path / "student", tiny_config(), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SynthdistillError, match="'.*empty' holds no shard"):
        distill(tmp_path / "empty", tmp_path / "student", tiny_config(), device="cpu")


def test_contrastive_losses_train_against_the_class_texts(tmp_path, shards):
    config = tiny_config(loss="fd:1,mpc:0.5", learnable_temperature=True, epochs=3)
    summary = distill(
        shards, tmp_path / "student", config, domain=domain_from_classes(list(CLASSES)), device="cpu"
    )
    logged = losses(tmp_path / "student")
    assert summary.completed and logged[-1] < logged[0]
    checkpoint = next((tmp_path / "checkpoints").iterdir())
    log_scale = load_file(str(checkpoint / "weights.safetensors"))["loss.terms.mpc.log_scale"]
    assert log_scale.item() != pytest.approx(np.log(100.0))  # the teacher's scale, then learnt

    with pytest.raises(SynthdistillError, match="need the class names"):
        distill(shards, tmp_path / "other", tiny_config(loss="vl"), device="cpu")
    with pytest.raises(SynthdistillError, match="made for other classes"):
        distill(shards, tmp_path / "other", tiny_config(loss="vl"), domain=get_dataset("pets"), device="cpu")


def test_ranks_take_disjoint_equal_shares_and_workers_change_nothing(shards):
    dataset = ViewDataset(ShardSamples(list_shards(shards)))
    shares = [
        [[i for i, _ in batch] for batch in ShardViewSource(48, 4, 0, 2, DistEnv(rank, 0, 3)).batches(1)]
        for rank in range(3)
    ]
    flat = [sorted(i for batch in share for i in batch) for share in shares]
    assert [len(f) for f in flat] == [16, 16, 16] and sorted(sum(flat, [])) == list(range(48))
    sampler = EpochBatches()
    sampler.batches = ShardViewSource(48, 8, 0, 2, DistEnv()).batches(3, first_batch=2)
    in_process = [b.images for b in view_loader(dataset, sampler, 0)]
    in_workers = [b.images for b in view_loader(dataset, sampler, 2)]
    assert len(in_process) == 4 and all(
        torch.equal(a, b) for a, b in zip(in_process, in_workers, strict=True)
    )


def test_cli_trains_a_student(tmp_path, shards, capsys):
    out = tmp_path / "student"
    main(
        [
            "distill", "--shards", str(shards), "--out", str(out), "--teacher", "tiny", "--student", "tiny",
            "--epochs", "1", "--batch-size", "16", "--workers", "0", "--device", "cpu",
            "--set", "distill.teacher_pretrained=null", "--set", "distill.cache_views=1",
        ]
    )  # fmt: skip
    assert f"student: {out} (3 steps" in capsys.readouterr().out
    assert load_student(out).config.teacher == "tiny"
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--shards", str(tmp_path / "nowhere"), "--out", str(out), "--device", "cpu"])
    assert exit_info.value.code == 2 and "nowhere' does not exist" in capsys.readouterr().err


def test_torchrun_with_two_cpu_processes_completes_and_the_loss_falls(tmp_path, shards):
    out = tmp_path / "student"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "synthdistill", "distill", "--shards", str(shards), "--out", str(out),
        "--teacher", "tiny", "--student", "tiny", "--epochs", "4", "--batch-size", "16", "--lr", "2e-3",
        "--workers", "0", "--device", "cpu", "--set", "distill.cache_views=2", "--set", "distill.log_every=1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("student: ") == 1  # only rank 0 speaks
    log = read_log(out)
    assert log[0]["world_size"] == 2
    logged = [line["loss"] for line in log if "loss" in line]
    assert len(logged) == 4 * 3 and logged[-1] < logged[0] / 3
    assert load_student(out).config.embed_dim == 32


@pytest.mark.parametrize(
    "models, message",
    [
        ({"teacher": "ViT-B-33"}, "Closest: ViT-B-32"),
        ({"student": "tiny_vit_5m_225"}, "Unknown timm model 'tiny_vit_5m_225'"),
        ({"teacher": "RN50", "teacher_pretrained": "openai"}, "local checkpoint file"),
    ],
)
def test_unknown_models_and_offline_weights_are_one_sentence(tmp_path, shards, models, message):
    with pytest.raises(SynthdistillError, match=message):
        distill(shards, tmp_path / "student", tiny_config(**models), device="cpu")


def test_decoded_and_worker_pipelines_train_bit_identical_weights(tmp_path, shards):
    # the paper's augmentation (small crops, bilinear, flips), live teacher and cached teacher
    paper = dict(aug_scale=[0.08, 1.0], aug_interpolation="bilinear", aug_hflip=0.5)
    for cache_teacher in (False, True):
        students = {}
        for source in ("decoded", "workers"):
            config = tiny_config(input=source, cache_teacher=cache_teacher, workers=1, epochs=1, **paper)
            out = tmp_path / f"{source}-{cache_teacher}" / "student"
            summary = distill(shards, out, config, device="cpu", cache_dir=tmp_path / f"cache-{source}")
            assert summary.input == source and read_log(out)[0]["input"] == source
            students[source] = load_file(str(out / "model.safetensors"))
        decoded, workers = students["decoded"], students["workers"]
        assert decoded.keys() == workers.keys() and all(torch.equal(decoded[k], workers[k]) for k in decoded)
    assert (shards.parent / "decoded").is_dir()  # the store lives in the run directory, beside the shards


def without_time(lines: list[dict]) -> list[dict]:
    return [
        {k: v for k, v in line.items() if k not in ("images_per_s", "images_per_s_per_gpu", "eta_s")}
        for line in lines
        if line.get("event") != "start"
    ]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights_and_the_same_log(tmp_path, shards):
    """A real SIGKILL of a `python -m synthdistill distill` process after its first checkpoint."""
    args = [
        "distill", "--shards", str(shards), "--teacher", "tiny", "--student", "tiny", "--epochs", "6",
        "--batch-size", "8", "--lr", "2e-3", "--workers", "0", "--device", "cpu",
        "--set", "distill.teacher_pretrained=null", "--set", "distill.cache_views=2",
        "--set", "distill.checkpoint_every=5", "--set", "distill.log_every=1",
    ]  # fmt: skip
    killed = tmp_path / "killed" / "student"
    kill_after_first_checkpoint(args, killed)
    assert not (killed / "config.json").exists()
    (checkpoint,) = (tmp_path / "killed" / "checkpoints").glob("step-*")  # (a kill mid-save leaves a .tmp)
    logged_before = [line for line in read_log(killed) if "loss" in line]
    assert logged_before and logged_before[-1]["step"] >= int(checkpoint.name.removeprefix("step-"))

    straight = tmp_path / "straight" / "student"
    resume_and_run_straight(args, killed, straight)
    a = load_file(str(straight / "model.safetensors"))
    b = load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert without_time(read_log(killed)) == without_time(read_log(straight))
    starts = [line for line in read_log(killed) if line.get("event") == "start"]
    assert [s["step"] for s in starts] == [0, int(checkpoint.name.removeprefix("step-"))]


def test_a_resumed_log_keeps_the_lines_up_to_the_checkpoint_and_drops_a_torn_one(tmp_path):
    from synthdistill.train.log import truncate_log

    path = tmp_path / LOG_NAME
    lines = [{"event": "start", "step": 0}, *({"step": s, "loss": 1.0 / s} for s in range(1, 6))]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 6, "lo')
    truncate_log(path, 3)
    assert [json.loads(line) for line in path.read_text().splitlines()] == lines[:4]
