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
    with pytest.raises(SynthdistillError, match="other settings.*force=True"):
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
    assert run.begin_stage("prompts", "h1", redo=True, force=True) is False  # --from: run it again...
    assert run.prompts.read_text() == "kept"  # ... over its outputs, which are still valid
    assert run.stage_record("prompts")["status"] == "running"
    assert run.begin_stage("prompts", "h2", redo=True, force=True) is False
    assert not run.prompts.exists()


def test_a_stage_starts_by_removing_what_killed_writers_left_in_its_outputs(tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    run = RunDir(tmp_path / "run")
    stale = run.shards / f".shard-000003.tar.tmp-{socket.gethostname()}-{int(dead.stdout)}"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a shard")
    (run.shards / "shard-000000.tar").write_bytes(b"a whole shard")
    assert run.begin_stage("generate", "h1") is False
    assert sorted(p.name for p in run.shards.iterdir()) == ["shard-000000.tar"]


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole" and list(tmp_path.iterdir()) == [target]


def test_a_refused_stage_names_each_changed_key_with_its_old_and_new_value(tmp_path):
    run = RunDir(tmp_path / "run")
    old = {"seed": 0, "distill.epochs": 8, "distill.lr": 0.002, "distill.loss": "fd"}
    run.begin_stage("distill", "h1", settings=old)
    run.finish_stage("distill", "h1")
    new = {**old, "distill.epochs": 4, "distill.loss": "fd:0.5,vl:0.5"}
    with pytest.raises(SynthdistillError) as refused:
        run.begin_stage("distill", "h2", settings=new)
    assert "(distill.epochs: 8 -> 4, distill.loss: fd -> fd:0.5,vl:0.5)" in str(refused.value)
    assert "h1" not in str(refused.value) and "h2" not in str(refused.value)
    assert run.stage_record("distill")["settings"] == old  # the refusal recorded nothing


def test_refusal_hints_are_flags_on_the_command_line_and_keywords_in_the_api(tmp_path):
    from synthdistill.cli.common import cli_style

    run = RunDir(tmp_path / "run")
    run.begin_stage("generate", "h1", settings={"generate.steps": 4})
    with pytest.raises(SynthdistillError) as refused:
        run.begin_stage("generate", "h2", settings={"generate.steps": 2})
    api = str(refused.value)
    assert "force=True" in api and "start_from='generate'" in api and "--" not in api
    cli = refused.value.render(cli_style({}))
    assert "use --force" in cli and "--from generate" in cli and "another --name" in cli
    assert "force=True" not in cli
