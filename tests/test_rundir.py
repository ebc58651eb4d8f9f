import pytest

from synthdistill.errors import SynthdistillError
from synthdistill.fileio import atomic_path
from synthdistill.rundir import RunDir


def test_stage_lifecycle(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.begin_stage("prompts", "h1") is False
    assert run.stage_record("prompts")["status"] == "running"
    assert run.begin_stage("prompts", "h1") is False  # interrupted: resume, outputs kept
    run.prompts.write_text("x")
    run.finish_stage("prompts", "h1", {"prompts": 1})
    assert run.begin_stage("prompts", "h1") is True  # finished: skip
    assert run.prompts.read_text() == "x"


def test_other_config_is_refused_unless_forced(tmp_path):
    run = RunDir(tmp_path / "run")
    run.begin_stage("prompts", "h1")
    run.prompts.write_text("old")
    run.finish_stage("prompts", "h1")
    with pytest.raises(SynthdistillError, match="another config.*--force"):
        run.begin_stage("prompts", "h2")
    assert run.prompts.read_text() == "old"
    assert run.begin_stage("prompts", "h2", force=True) is False
    assert not run.prompts.exists()


def test_force_keeps_finished_work_whose_config_did_not_change(tmp_path):
    run = RunDir(tmp_path / "run")
    run.begin_stage("prompts", "h1")
    run.prompts.write_text("kept")
    run.finish_stage("prompts", "h1")
    assert run.begin_stage("prompts", "h1", force=True) is True
    assert run.prompts.read_text() == "kept"
    assert run.begin_stage("prompts", "h1", redo=True) is False
    assert not run.prompts.exists()


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole" and list(tmp_path.iterdir()) == [target]
