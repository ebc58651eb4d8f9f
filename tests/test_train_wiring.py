"""What the training loop is wired to: starting weights (issue 13's stage chain), the fp16 gradient
scaler, every rank's random state in a checkpoint, full disks, and the offline student sentence."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from synthdistill.cli import main
from synthdistill.data.augment import Augmentation, ViewDataset, augment, collate_views
from synthdistill.errors import SynthdistillError
from synthdistill.losses import LossSettings, WeightedLoss
from synthdistill.runtime import DistEnv
from synthdistill.student import create_student, load_student
from synthdistill.train import distill_student as distill
from synthdistill.train.sources import ShardViewSource, open_shards
from synthdistill.train.teacher_cache import teacher_features
from test_distill import CLASSES, losses, read_log, tiny_config
from test_shards import filling_disk

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def two_shard_sets(tmp_path_factory, write_shards):
    """Shards A (the stage-1 data) and B (the domain's), 24 images each: 3 steps per epoch at batch 8."""
    root = tmp_path_factory.mktemp("stages")
    a = write_shards(root / "a" / "shards", 24, shard_size=10, classes=CLASSES)
    b = write_shards(root / "b" / "shards", 24, first_seed=5000, shard_size=10, classes=CLASSES)
    return a, b


@pytest.fixture(scope="module")
def stage_one(two_shard_sets, tmp_path_factory):
    """A stage-1 student: the tiny student distilled for a few steps on shards A."""
    a, _ = two_shard_sets
    out = tmp_path_factory.mktemp("stage1") / "student"
    assert distill(a, out, tiny_config(epochs=2), device="cpu").completed
    return out


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_stage_three_run_with_lr_0_ends_with_the_stage_one_weights_bit_for_bit(
    two_shard_sets, stage_one, tmp_path
):
    _, b = two_shard_sets
    config = tiny_config(init=str(stage_one), lr=0.0, weight_decay=0.0, epochs=1)  # lr 0: only here
    summary = distill(b, tmp_path / "student", config, device="cpu")
    assert summary.completed and summary.steps == 3
    # the learnt weights; batch norm's running statistics are buffers that any training pass moves
    learnt = {name for name, _ in load_student(stage_one).named_parameters()}
    start = {k: v for k, v in load_file(str(stage_one / "model.safetensors")).items() if k in learnt}
    end = load_file(str(tmp_path / "student" / "model.safetensors"))
    assert same_weights({k: v for k, v in end.items() if k in learnt}, start)
    assert any(not torch.equal(end[k], v) for k, v in load_file(str(stage_one / "model.safetensors")).items())
    (checkpoint,) = (tmp_path / "checkpoints").iterdir()  # a step folder is itself a distill.init
    weights = load_file(str(checkpoint / "weights.safetensors"))
    assert same_weights(
        {k.removeprefix("student."): v for k, v in weights.items() if k.removeprefix("student.") in learnt},
        start,
    )
    assert json.loads((checkpoint / "config.json").read_text())["timm_name"] == "test_efficientnet"


def first_batch_loss(student, shards: Path, config, teacher) -> float:
    """The fd loss of ``student`` on the first batch a run of ``config`` (seed 0, live teacher)
    trains on, computed here from the public pieces."""
    samples = open_shards(shards)
    items = ShardViewSource(len(samples), config.batch_size, 0, None, DistEnv()).batches(0)[0]
    batch = collate_views([ViewDataset(samples)[item] for item in items])
    augmentation = Augmentation(
        0, tuple(config.aug_scale), tuple(config.aug_ratio), config.aug_interpolation, config.aug_hflip
    )
    (inputs,) = augment(batch, augmentation, [teacher.preprocessing])
    loss = WeightedLoss("fd", LossSettings(config.fd_variant))
    student.train()  # as the loop runs it: batch norm on the batch's statistics
    with torch.no_grad():
        return loss(student.forward_features(inputs), teacher_features(teacher, inputs, "fp32")).item()


def test_a_stage_three_run_starts_from_the_stage_one_student(
    two_shard_sets, stage_one, tmp_path, tiny_teacher
):
    _, b = two_shard_sets
    config = tiny_config(init=str(stage_one), cache_teacher=False, epochs=1)
    distill(b, tmp_path / "student", config, device="cpu")
    first = losses(tmp_path / "student")[0]
    expected = first_batch_loss(load_student(stage_one), b, config, tiny_teacher)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        random_student = create_student("tiny", 32, preprocessing=tiny_teacher.preprocessing)
    from_random = first_batch_loss(random_student, b, config, tiny_teacher)
    assert first == pytest.approx(expected, rel=1e-5)
    assert abs(from_random - expected) > 100 * abs(first - expected)


def test_another_init_is_another_checkpoint_identity(two_shard_sets, stage_one, tmp_path):
    _, b = two_shard_sets
    distill(b, tmp_path / "student", tiny_config(init=str(stage_one)), device="cpu", stop_after_steps=2)
    with pytest.raises(SynthdistillError, match="resume=False"):
        distill(b, tmp_path / "student", tiny_config(), device="cpu")


def test_fp16_trains_with_a_gradient_scaler_whose_state_resumes(two_shard_sets, tmp_path):
    a, _ = two_shard_sets
    config = tiny_config(precision="fp16", checkpoint_every=2, epochs=2)
    straight = distill(a, tmp_path / "straight" / "student", config, device="cpu")
    distill(a, tmp_path / "resumed" / "student", config, device="cpu", stop_after_steps=2)
    (checkpoint,) = (tmp_path / "resumed" / "checkpoints").iterdir()
    scaler = torch.load(checkpoint / "state.pt", weights_only=True)["scaler"]
    assert scaler["scale"] == 2.0**16 and scaler["_growth_tracker"] == 2  # it ran both steps' update
    resumed = distill(a, tmp_path / "resumed" / "student", config, device="cpu")
    assert resumed.resumed_from_step == 2 and resumed.steps == straight.steps == 6
    assert same_weights(
        load_file(str(tmp_path / "straight" / "student" / "model.safetensors")),
        load_file(str(tmp_path / "resumed" / "student" / "model.safetensors")),
    )
    assert losses(tmp_path / "straight" / "student") == losses(tmp_path / "resumed" / "student")
    final = [
        torch.load(next((tmp_path / run / "checkpoints").iterdir()) / "state.pt", weights_only=True)["scaler"]
        for run in ("straight", "resumed")
    ]
    assert final[0] == final[1] and final[0]["_growth_tracker"] == 6  # restored, then counted on

    distill(a, tmp_path / "fp32" / "student", tiny_config(epochs=1), device="cpu")
    fp32_state = torch.load(
        next((tmp_path / "fp32" / "checkpoints").iterdir()) / "state.pt", weights_only=True
    )
    assert fp32_state["scaler"] == {}  # no scaler without fp16


def test_a_full_disk_while_checkpointing_is_one_sentence_and_leaves_no_partial_checkpoint(
    two_shard_sets, tmp_path, monkeypatch
):
    from synthdistill.train import checkpoint

    a, _ = two_shard_sets
    monkeypatch.setattr(checkpoint, "open", filling_disk(2000), raising=False)
    with pytest.raises(SynthdistillError, match=r"disk is full.*'.*checkpoints'") as error:
        distill(a, tmp_path / "student", tiny_config(checkpoint_every=2), device="cpu")
    assert "\n" not in str(error.value)
    assert list((tmp_path / "checkpoints").iterdir()) == []
    monkeypatch.undo()
    assert distill(a, tmp_path / "student", tiny_config(checkpoint_every=2), device="cpu").completed


def refuse_space(fd, offset, length):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_building_the_decoded_store_or_the_teacher_cache_is_one_sentence(
    two_shard_sets, tmp_path, monkeypatch
):
    a, _ = two_shard_sets
    run = tmp_path / "run"
    (run / "shards").mkdir(parents=True)
    for shard in a.iterdir():
        (run / "shards" / shard.name).write_bytes(shard.read_bytes())
    monkeypatch.setattr(os, "posix_fallocate", refuse_space, raising=False)
    with pytest.raises(SynthdistillError, match=r"disk is full.*'.*decoded'"):
        distill(run / "shards", run / "student", tiny_config(), device="cpu")
    assert list((run / "decoded").iterdir()) == []  # no temporary, no lock
    with pytest.raises(SynthdistillError, match=r"disk is full.*'.*teacher_cache'"):
        distill(run / "shards", run / "student", tiny_config(input="workers"), device="cpu")
    assert list((run / "teacher_cache").iterdir()) == []
    monkeypatch.undo()
    assert distill(run / "shards", run / "student", tiny_config(), device="cpu").completed


def test_student_pretrained_offline_is_one_line_from_the_cli(two_shard_sets, tmp_path, capsys):
    a, _ = two_shard_sets
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "distill", "--shards", str(a), "--out", str(tmp_path / "student"), "--teacher", "tiny",
                "--student", "tiny", "--device", "cpu", "--set", "distill.teacher_pretrained=null",
                "--set", "distill.student_pretrained=true",
            ]
        )  # fmt: skip
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "test_efficientnet" in err and "distill.student_pretrained=/path/model.safetensors" in err


def ddp_command(out: Path, shards: Path) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(HERE / "drop_path_student.py"), "-v", "distill", "--shards", str(shards), "--out", str(out),
        "--teacher", "tiny", "--student", "test_vit_drop_path", "--epochs", "3", "--batch-size", "8",
        "--workers", "0", "--device", "cpu", "--set", "distill.teacher_pretrained=null",
        "--set", "distill.image_size=64", "--set", "distill.cache_views=1",
        "--set", "distill.checkpoint_every=2", "--set", "distill.log_every=1",
    ]  # fmt: skip


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its ranks in sessions of their own)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return [p for child in children for p in (child, *descendants(child))]


@pytest.mark.slow
def test_stochastic_depth_on_two_processes_resumes_exactly_after_a_kill(two_shard_sets, tmp_path):
    """Drop path draws masks from each rank's own generator: a resumed run equals a straight one
    only if every rank's random state comes back (rank 1's was reseeded before)."""
    a, _ = two_shard_sets
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    killed = tmp_path / "killed" / "student"
    process = subprocess.Popen(
        ddp_command(killed, a), env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        start_new_session=True,
    )  # fmt: skip
    for line in process.stderr:  # blocks until rank 0 says it wrote a checkpoint
        if line.startswith("checkpoint "):
            for pid in [process.pid, *descendants(process.pid)]:  # torchrun and both ranks
                os.kill(pid, signal.SIGKILL)
            break
    process.wait()
    assert process.returncode == -signal.SIGKILL
    (checkpoint,) = (tmp_path / "killed" / "checkpoints").glob("step-*")
    rng = torch.load(checkpoint / "state.pt", weights_only=True)["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["cpu"], rng[1]["cpu"])

    for out in (killed, tmp_path / "straight" / "student"):
        result = subprocess.run(ddp_command(out, a), env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    starts = [line["step"] for line in read_log(killed) if line.get("event") == "start"]
    assert starts == [0, int(checkpoint.name.removeprefix("step-"))]
    assert same_weights(
        load_file(str(killed / "model.safetensors")),
        load_file(str(tmp_path / "straight" / "student" / "model.safetensors")),
    )


@pytest.mark.parametrize("betas", [[0.9, 1.0], [0.9], [-0.1, 0.98]])
def test_betas_are_two_numbers_in_0_1_refused_before_any_model_loads(betas):
    from synthdistill.config import RecipeConfig, validate

    recipe = RecipeConfig()
    recipe.distill.betas = betas
    with pytest.raises(SynthdistillError, match="distill.betas"):
        validate(recipe)
    recipe.distill.betas = [0.9, 0.98]
    validate(recipe)
