"""Validation during training: zero-shot top-1 per epoch on a (fake) real test set, kept epoch
checkpoints, the best epoch; and the chain's first stage checked before any work."""

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import distill_runs
from distill_runs import kill_after_first_checkpoint, resume_and_run_straight
from synthdistill.config import DistillConfig
from synthdistill.errors import SynthdistillError
from synthdistill.evaluate import zero_shot_top1
from synthdistill.registry import get_dataset
from synthdistill.student import create_student, load_init_weights, load_student
from synthdistill.teacher import load_teacher
from synthdistill.train import LOG_NAME, distill_student
from synthdistill.train.validate import (
    ValidationData,
    check_init_exists,
    epoch_checkpoint,
    validation_epochs,
)

PETS = get_dataset("pets").classnames


def tiny_config(**overrides) -> DistillConfig:
    return distill_runs.tiny_config(**{"epochs": 3, "log_every": 3, **overrides})


def write_pets(root: Path, labels: list[int], make_blob) -> Path:
    """A fake Oxford-IIIT Pets test split in torchvision's layout (annotations/test.txt + images/)."""
    base = root / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True)
    (base / "annotations").mkdir()
    lines = []
    for i, label in enumerate(labels):
        image_id = f"{PETS[label].replace(' ', '_')}_{100 + i}"
        make_blob(1000 + i, 32).save(base / "images" / f"{image_id}.jpg", format="JPEG")
        lines.append(f"{image_id} {label + 1} 1 1")
    (base / "annotations" / "test.txt").write_text("\n".join(lines) + "\n")
    return root


def validation_records(student_dir: Path) -> list[dict]:
    lines = (student_dir / LOG_NAME).read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == "validation"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, write_shards):
    """48 images: 6 steps per epoch at batch 8."""
    return write_shards(tmp_path_factory.mktemp("validate") / "shards", 48, shard_size=24)


@pytest.fixture(scope="module")
def pets_root(tmp_path_factory, make_blob):
    return write_pets(tmp_path_factory.mktemp("data"), [i % 6 for i in range(18)], make_blob)


def test_each_epochs_validation_equals_zero_shot_top1_of_its_kept_checkpoint(tmp_path, shards, pets_root):
    config = tiny_config(validate_every=1, keep_checkpoints="all")
    summary = distill_student(
        shards,
        tmp_path / "student",
        config,
        validation=ValidationData(("pets",), str(pets_root), batch_size=5),
    )
    records = validation_records(tmp_path / "student")
    assert [(r["epoch"], r["step"], r["dataset"], r["protocol"]) for r in records] == [
        (0, 6, "pets", "paper"),
        (1, 12, "pets", "paper"),
        (2, 18, "pets", "paper"),
    ]
    teacher = load_teacher("tiny")
    weights = []
    for record in records:
        kept = epoch_checkpoint(tmp_path / "checkpoints", record["epoch"])
        student = create_student("tiny", teacher.embed_dim, preprocessing=teacher.preprocessing)
        load_init_weights(student, kept)
        weights.append(student.state_dict())
        top1 = zero_shot_top1(student, student.config.preprocessing, teacher, "pets", pets_root, "paper")
        assert top1 == record["top1"]
    # three distinct epochs, the last one the finished student's
    assert not torch.equal(weights[0]["head.proj.weight"], weights[1]["head.proj.weight"])
    final = load_student(tmp_path / "student").state_dict()
    assert all(torch.equal(final[k], weights[2][k]) for k in final)
    top1s = [r["top1"] for r in records]
    best = max(range(3), key=lambda e: (top1s[e], -e))
    assert (summary.best_epoch, summary.best_top1) == (best, top1s[best])
    assert summary.best_checkpoint == str(epoch_checkpoint(tmp_path / "checkpoints", best))


def test_validation_changes_nothing_in_training_and_keep_last_keeps_no_epoch(tmp_path, shards, pets_root):
    plain = distill_student(shards, tmp_path / "plain" / "student", tiny_config(epochs=2))
    validated = distill_student(
        shards,
        tmp_path / "validated" / "student",
        tiny_config(epochs=2, validate_every=2),
        validation=ValidationData(("pets",), str(pets_root)),
    )
    a = load_file(str(Path(plain.student_dir) / "model.safetensors"))
    b = load_file(str(Path(validated.student_dir) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["epoch"] for r in validation_records(tmp_path / "validated" / "student")] == [1]
    assert not list((tmp_path / "validated" / "checkpoints").glob("epoch-*"))
    assert validated.best_epoch == 1 and validated.best_checkpoint is None and plain.best_epoch is None


def test_a_missing_test_set_logs_one_line_and_training_completes(tmp_path, shards, caplog):
    with caplog.at_level(logging.WARNING):
        summary = distill_student(
            shards,
            tmp_path / "student",
            tiny_config(epochs=2, validate_every=1),
            validation=ValidationData(("pets",), str(tmp_path / "no_data")),
        )
    assert summary.completed and summary.best_epoch is None
    assert validation_records(tmp_path / "student") == []
    skipped = [r for r in caplog.records if "pets" in r.getMessage() and "skipped" in r.getMessage()]
    assert len(skipped) == 1


def test_validation_epochs_are_every_nth_and_the_last():
    assert validation_epochs(None, 5) == set()
    assert validation_epochs(2, 5) == {1, 3, 4}
    assert validation_epochs(1, 3) == {0, 1, 2}


def test_check_init_exists_names_the_three_ways_on(tmp_path):
    check_init_exists(None)
    with pytest.raises(SynthdistillError) as error:
        check_init_exists(tmp_path / "runs" / "imagenet" / "student")
    message = str(error.value)
    assert "runs/imagenet/student' does not exist" in message
    for way in ("configs/datacomp_medium.yaml", "configs/imagenet.yaml", "configs/synthci30m.yaml"):
        assert way in message
    assert "--set distill.init=PATH" in message and "--set distill.init=null" in message
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "model.safetensors").write_bytes(b"")  # weights without config.json: not finished
    with pytest.raises(SynthdistillError, match="holds no finished student"):
        check_init_exists(unfinished)
    (unfinished / "config.json").write_text("{}")
    check_init_exists(unfinished)


def test_distill_stops_before_any_work_when_the_init_is_missing(tmp_path, shards):
    config = tiny_config(init=str(tmp_path / "runs" / "datacomp_medium" / "student"))
    with pytest.raises(SynthdistillError, match="configs/datacomp_medium.yaml"):
        distill_student(shards, tmp_path / "student", config)
    assert not (tmp_path / "student").exists() and not (tmp_path / "checkpoints").exists()


def test_the_report_draws_validation_beside_the_loss_and_names_the_best_epoch(tmp_path):
    from PIL import Image

    from synthdistill.report import build_report
    from synthdistill.rundir import RunDir

    run = RunDir(tmp_path / "run")
    run.student.mkdir(parents=True)
    losses = [{"step": s, "epoch": s // 4, "loss": 1.0 / s, "cosine": 0.5} for s in range(1, 9)]
    checks = [
        {
            "event": "validation",
            "epoch": e,
            "step": 4 * (e + 1),
            "dataset": "pets",
            "protocol": "paper",
            "top1": t,
        }
        for e, t in [(0, 0.25), (1, 0.5)]
    ]
    (run.student / LOG_NAME).write_text("".join(json.dumps(r) + "\n" for r in losses + checks))
    run.begin_stage("distill", "id")
    run.finish_stage("distill", "id", {"best_epoch": 1, "best_top1": 0.5, "best_checkpoint": None})
    blocks = build_report(run.root)
    picture = next(b for b in blocks if type(b).__name__ == "Picture" and b.alt == "training curves")
    text = blocks[blocks.index(picture) + 1].text
    assert "best validation epoch 1: zero-shot top-1 0.5 (mean over pets, paper protocol)" in text
    with_validation = Image.open(picture.path).size[0]
    (run.student / LOG_NAME).write_text("".join(json.dumps(r) + "\n" for r in losses))
    picture = next(
        b for b in build_report(run.root) if type(b).__name__ == "Picture" and b.alt == "training curves"
    )
    assert (
        with_validation == Image.open(picture.path).size[0] * 3 // 2
    )  # a third panel beside loss and cosine


def test_validation_settings_are_checked_before_any_work(tmp_path):
    from synthdistill.config import ConfigError, load_recipe

    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    with pytest.raises(ConfigError, match="evaluate.datasets or set distill.validate_every=null"):
        load_recipe(None, {"classes_file": str(classes), "dataset": None, "distill.validate_every": 1})
    named = {"classes_file": str(classes), "evaluate.datasets": ["pets"], "distill.validate_every": 1}
    assert load_recipe(None, named).distill.validate_every == 1
    for key, value in [("distill.validate_every", 0), ("distill.keep_checkpoints", "best")]:
        with pytest.raises(ConfigError, match=key):
            load_recipe(None, {key: value})


@pytest.mark.slow
def test_a_run_killed_at_an_epochs_end_resumes_to_the_same_validation_and_kept_checkpoints(
    tmp_path, shards, pets_root
):
    """A real SIGKILL of `python -m synthdistill distill` right after the checkpoint that ends epoch 0,
    before (or while) it validates and keeps anything else: the resumed run ends as a straight one."""
    args = [
        "distill", "--shards", str(shards), "--teacher", "tiny", "--student", "tiny", "--epochs", "3",
        "--batch-size", "8", "--lr", "2e-3", "--workers", "0", "--device", "cpu",
        "--set", "distill.teacher_pretrained=null", "--set", "distill.cache_views=2",
        "--set", "distill.checkpoint_every=100", "--set", "distill.log_every=3",
        "--set", "distill.validate_every=1", "--set", "distill.keep_checkpoints=all",
        "--set", "evaluate.datasets=[pets]", "--set", f"evaluate.data_root={pets_root}",
        "--set", "evaluate.workers=0", "--set", "evaluate.batch_size=5",
    ]  # fmt: skip
    killed, straight = tmp_path / "killed" / "student", tmp_path / "straight" / "student"
    kill_after_first_checkpoint(args, killed)
    resume_and_run_straight(args, killed, straight)

    def outcome(student_dir: Path) -> tuple:
        kept = sorted((student_dir.parent / "checkpoints").glob("epoch-*"))
        weights = [load_file(str(folder / "weights.safetensors")) for folder in kept]
        return validation_records(student_dir), [folder.name for folder in kept], weights

    (records, names, weights), (want_records, want_names, want_weights) = outcome(killed), outcome(straight)
    assert records == want_records and [r["epoch"] for r in records] == [0, 1, 2]
    assert names == want_names == ["epoch-0000", "epoch-0001", "epoch-0002"]
    for got, want in zip(weights, want_weights, strict=True):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
