"""The whole pipeline from the smoke recipe: end to end, rerun, and runs killed mid-stage."""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from synthdistill.config import load_recipe
from synthdistill.errors import SynthdistillError
from synthdistill.pipeline import run_pipeline
from synthdistill.shards import list_shards

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"


class Killed(RuntimeError):
    """Stands in for a process killed in the middle of a stage."""


def smoke_recipe(run_dir: Path, *overrides: str):
    return load_recipe(SMOKE, [f"run_dir={run_dir}", *overrides])


def quiet(_: str) -> None:
    pass


@pytest.mark.slow
def test_smoke_run_end_to_end_then_rerun_is_instant(tmp_path):
    recipe = smoke_recipe(tmp_path / "run")
    result = run_pipeline(recipe, echo=quiet)
    assert set(result.stages.values()) == {"done"}
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file()
    assert len((run / "prompts.jsonl").read_text().splitlines()) == 5 * 16
    assert len(list_shards(run / "shards")) == 80 // 16
    assert (run / "student" / "model.safetensors").is_file()
    results = json.loads((run / "eval" / "results.json").read_text())
    student = next(e for e in results["entries"] if e["model"] == "student")
    assert student["n_images"] == 5 * 16 and "synthetic" in student["dataset"]
    assert 0.0 <= student["agreement_with_teacher"] <= 1.0
    assert (run / "export" / "model.onnx").is_file()
    report = (run / "report.md").read_text()
    for section in (
        "## Recipe",
        "## Stages",
        "## Example prompts",
        "## Synthetic images",
        "## Training",
        "## Zero-shot evaluation",
        "## Export",
    ):
        assert section in report
    assert (run / "report_assets" / "samples.png").is_file()
    assert "data:image/png;base64," in (run / "report.html").read_text()

    again = run_pipeline(recipe, echo=quiet)
    assert set(again.stages.values()) == {"skipped"}


def test_changed_config_is_refused_and_from_redoes(tmp_path):
    recipe = smoke_recipe(tmp_path / "run")
    run_pipeline(recipe, until="prompts", report=False, echo=quiet)
    changed = smoke_recipe(tmp_path / "run", "prompts.per_class=3")
    with pytest.raises(SynthdistillError, match=r"prompts\.per_class: 16 -> 3\); use force=True") as refused:
        run_pipeline(changed, until="prompts", report=False, echo=quiet)
    assert "start_from='prompts'" in str(refused.value) and "--" not in str(refused.value)
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "per_class: 16" in saved  # the refused recipe is not saved
    result = run_pipeline(changed, until="prompts", start_from="prompts", report=False, echo=quiet)
    assert result.stages["prompts"] == "done"
    assert len((tmp_path / "run" / "prompts.jsonl").read_text().splitlines()) == 5 * 3


def test_run_killed_during_generate_finishes_like_an_uninterrupted_one(tmp_path, monkeypatch):
    import synthdistill.generate as generate

    straight = smoke_recipe(tmp_path / "straight")
    run_pipeline(straight, until="generate", report=False, echo=quiet)

    killed = smoke_recipe(tmp_path / "killed")
    real = generate.generate_images
    monkeypatch.setattr(generate, "generate_images", functools.partial(real, fail_after=21))
    with pytest.raises(KeyboardInterrupt):  # what fail_after raises, like Ctrl-C
        run_pipeline(killed, until="generate", report=False, echo=quiet)
    monkeypatch.setattr(generate, "generate_images", real)
    result = run_pipeline(killed, until="generate", report=False, echo=quiet)
    assert result.stages["generate"] == "done"

    a, b = list_shards(tmp_path / "straight" / "shards"), list_shards(tmp_path / "killed" / "shards")
    assert [p.name for p in a] == [p.name for p in b]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b, strict=True))


@pytest.mark.slow
def test_run_killed_during_distill_resumes_to_the_same_student(tmp_path, monkeypatch):
    import synthdistill.train as train

    straight = smoke_recipe(tmp_path / "straight")
    run_pipeline(straight, until="distill", report=False, echo=quiet)

    shutil.copytree(
        tmp_path / "straight",
        tmp_path / "killed",
        ignore=shutil.ignore_patterns("student", "checkpoints", "teacher_cache"),
    )
    manifest = tmp_path / "killed" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["stages"].pop("distill")
    manifest.write_text(json.dumps(data))

    real = train.distill_student

    def killed_after_some_steps(*args, **kwargs):
        real(*args, stop_after_steps=5, **kwargs)
        raise Killed("killed after step 5")

    monkeypatch.setattr(train, "distill_student", killed_after_some_steps)
    killed = smoke_recipe(tmp_path / "killed")
    with pytest.raises(Killed):
        run_pipeline(killed, until="distill", report=False, echo=quiet)
    monkeypatch.setattr(train, "distill_student", real)
    run_pipeline(killed, until="distill", report=False, echo=quiet)

    expected = load_file(str(tmp_path / "straight" / "student" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "killed" / "student" / "model.safetensors"))
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.allclose(expected[key], resumed[key], atol=1e-6), key


def test_torchrun_pipeline_uses_every_rank_for_generate_and_distill(tmp_path):
    run = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "synthdistill", "run", str(SMOKE), "--run-dir", str(run), "--until", "distill", "--no-report",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("[generate]") == 1  # rank 0 speaks for the run
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    assert stages["generate"]["summary"]["images_in_shards"] == 5 * 16
    assert stages["generate"]["summary"]["images_written"] < 5 * 16  # rank 0 drew only its share
    assert stages["distill"]["status"] == "done"
    log = [json.loads(line) for line in (run / "student" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["world_size"] == 2


def test_from_redoes_that_stage_and_every_later_one(tmp_path):
    recipe = smoke_recipe(tmp_path / "run", "prompts.per_class=2")
    run_pipeline(recipe, until="generate", report=False, echo=quiet)
    again = run_pipeline(recipe, until="generate", report=False, echo=quiet)
    assert again.stages == {"prompts": "skipped", "generate": "skipped", "distill": "not run",
                            "evaluate": "not run", "export": "not run"}  # fmt: skip
    redone = run_pipeline(recipe, start_from="prompts", until="generate", report=False, echo=quiet)
    assert redone.stages["prompts"] == redone.stages["generate"] == "done"


def test_force_redoes_only_what_changed(tmp_path):
    recipe = smoke_recipe(tmp_path / "run", "prompts.per_class=2")
    run_pipeline(recipe, until="generate", report=False, echo=quiet)
    first_shard = (tmp_path / "run" / "shards" / "shard-000000.tar").stat().st_mtime_ns
    changed = smoke_recipe(
        tmp_path / "run", "prompts.per_class=2", "generate.steps=1", "generate.compile=false"
    )
    result = run_pipeline(changed, until="generate", force=True, report=False, echo=quiet)
    assert result.stages["prompts"] == "skipped" and result.stages["generate"] == "done"
    assert (tmp_path / "run" / "shards" / "shard-000000.tar").stat().st_mtime_ns != first_shard
    faster = smoke_recipe(tmp_path / "run", "prompts.per_class=2", "generate.steps=1", "distill.workers=3")
    assert run_pipeline(faster, until="generate", report=False, echo=quiet).stages["generate"] == "skipped"


def _files(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` by relative path: its bytes and mtime."""
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_a_speed_only_setting_skips_finished_stages_and_force_or_from_keep_their_images(tmp_path, capsys):
    from synthdistill.cli import main

    run = tmp_path / "run"
    command = ["run", str(SMOKE), "--run-dir", str(run), "--until", "generate", "--no-report"]
    main(command)
    prompts, shards = (run / "prompts.jsonl").read_bytes(), _files(run / "shards")
    assert len([name for name in shards if name.endswith(".tar")]) == 5
    capsys.readouterr()

    faster = [*command, "--set", "generate.batch_size=3", "--set", "evaluate.batch_size=5"]
    main(faster)
    assert capsys.readouterr().out.count("already done under this config, skipped") == 2
    assert _files(run / "shards") == shards  # nothing redrawn, not even touched

    main([*faster, "--force"])
    assert capsys.readouterr().out.count("already done under this config, skipped") == 2
    assert _files(run / "shards") == shards

    main([*faster, "--from", "prompts"])  # runs both stages again, over outputs that are still valid
    assert "skipped" not in capsys.readouterr().out
    assert (run / "prompts.jsonl").read_bytes() == prompts
    tars = {name: kept for name, kept in shards.items() if name.endswith(".tar")}
    assert {name: kept for name, kept in _files(run / "shards").items() if name.endswith(".tar")} == tars


def _run_command(run: Path) -> list[str]:
    return [sys.executable, "-m", "synthdistill", "run", str(SMOKE), "--run-dir", str(run)] + [
        "--until", "distill", "--no-report", "--set", "distill.epochs=3"
    ]  # fmt: skip


def _subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _kill_when(run: Path, ready, log: Path) -> None:
    """Start the run in a subprocess and SIGKILL it as soon as ``ready()`` (polled): no cleanup runs."""
    with open(log, "ab") as out:
        process = subprocess.Popen(_run_command(run), env=_subprocess_env(), stdout=out, stderr=out)
        deadline = time.monotonic() + 300
        while process.poll() is None and not ready() and time.monotonic() < deadline:
            time.sleep(0.02)  # a poll for a file of the next stage, not a wait for an outcome
        assert process.poll() is None, f"the run ended before the kill point: {log.read_text()[-2000:]}"
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL


def _relative_files(run: Path) -> set[str]:
    return {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()}


def _same_content(a: Path, b: Path) -> bool:
    """Equal bytes; for safetensors equal tensors and metadata (safetensors writes its metadata
    mapping in a per-process hash order, so two equal files may differ in their header bytes)."""
    if a.name == "state.pt":  # a checkpoint's state: its CPU RNG state differs after a resume (see below)
        state_a, state_b = (torch.load(p, weights_only=True) for p in (a, b))
        return _same_state(state_a, state_b, ignore=("rng",))
    if a.suffix != ".safetensors":
        return a.read_bytes() == b.read_bytes()
    from safetensors import safe_open

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        if fa.metadata() != fb.metadata() or set(fa.keys()) != set(fb.keys()):
            return False
        return all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())  # noqa: SIM118


def _same_state(a, b, ignore: tuple[str, ...] = ()) -> bool:
    if isinstance(a, dict):
        keys = set(a) - set(ignore)
        return keys == set(b) - set(ignore) and all(_same_state(a[k], b[k]) for k in keys)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def _log_lines(path: Path) -> list[dict]:
    """train_log.jsonl without its time fields (elapsed, throughput, ETA differ from run to run)."""
    timing = {"time", "seconds", "images_per_s", "images_per_s_per_gpu", "eta_s"}
    lines = path.read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in lines]


@pytest.fixture(scope="module")
def killed_and_straight_runs(tmp_path_factory):
    """The smoke run up to distill, SIGKILLed mid-shard, once its teacher cache appeared and after
    its first checkpoint, then rerun to the end; and the same run uninterrupted, made at the same
    path (the run directory's path is recorded in index.json, which keys the teacher cache)."""
    root = tmp_path_factory.mktemp("sigkill")
    run, log = root / "run", root / "log.txt"
    subprocess.run(_run_command(run), check=True, capture_output=True, env=_subprocess_env())
    run.rename(root / "straight")
    _kill_when(run, lambda: any((run / "shards").glob(".shard-00000[1-4].tar.tmp-*")), log)
    _kill_when(run, lambda: (run / "teacher_cache").is_dir(), log)
    _kill_when(run, lambda: any((run / "checkpoints").glob("step-*")), log)
    finished = subprocess.run(_run_command(run), capture_output=True, text=True, env=_subprocess_env())
    assert finished.returncode == 0, finished.stderr[-3000:]
    return run, root / "straight"


@pytest.mark.slow
def test_a_run_killed_three_times_ends_with_exactly_the_files_of_an_uninterrupted_one(
    killed_and_straight_runs,
):
    killed, straight = killed_and_straight_runs
    files = _relative_files(killed)
    assert files == _relative_files(straight)
    assert not [f for f in files if ".tmp-" in f or f.endswith(".lock")]
    same = ["prompts.jsonl", "student/model.safetensors", "student/config.json", "shards/index.json"]
    same += [f for f in files if f.endswith(".tar") or f.startswith(("teacher_cache/", "checkpoints/"))]
    assert [name for name in same if not _same_content(killed / name, straight / name)] == []
    stages = json.loads((killed / "manifest.json").read_text())["stages"]
    assert [stages[s]["status"] for s in ("prompts", "generate", "distill")] == ["done"] * 3


@pytest.mark.slow
def test_the_training_log_and_rng_of_the_killed_run_equal_the_uninterrupted_ones(killed_and_straight_runs):
    """Equal line for line means: every training line (loss, lr, cosine, epoch ends, the end) is the
    same, in the same order, without its time fields; ``start`` lines describe a call, not the
    training, so they are compared apart: the straight run has one at step 0, the killed one also one
    per resume, at the step of the checkpoint it resumed from."""
    killed, straight = killed_and_straight_runs
    log = "student/train_log.jsonl"
    lines = {run: _log_lines(run / log) for run in (killed, straight)}
    training = {run: [line for line in lines[run] if line.get("event") != "start"] for run in lines}
    assert training[killed] == training[straight]
    starts = {run: [line for line in lines[run] if line.get("event") == "start"] for run in lines}
    assert [(s["step"], s["resumed_from"]) for s in starts[straight]] == [(0, None)]
    assert starts[killed][0]["step"] == 0 and len(starts[killed]) >= 2
    for start in starts[killed][1:]:
        assert start["step"] == int(Path(start["resumed_from"]).name.removeprefix("step-"))
    (checkpoint,) = [f for f in _relative_files(killed) if f.endswith("state.pt")]
    rng = [torch.load(run / checkpoint, weights_only=True)["rng"] for run in (killed, straight)]
    assert _same_state(*rng)
