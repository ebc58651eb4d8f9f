"""The whole pipeline from the smoke recipe: end to end, rerun, and runs killed mid-stage."""

import functools
import json
import os
import shutil
import subprocess
import sys
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
    with pytest.raises(SynthdistillError, match="another config"):
        run_pipeline(changed, until="prompts", report=False, echo=quiet)
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
    import synthdistill.distill as distill

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

    real = distill.distill

    def killed_after_some_steps(*args, **kwargs):
        real(*args, stop_after_steps=5, **kwargs)
        raise Killed("killed after step 5")

    monkeypatch.setattr(distill, "distill", killed_after_some_steps)
    killed = smoke_recipe(tmp_path / "killed")
    with pytest.raises(Killed):
        run_pipeline(killed, until="distill", report=False, echo=quiet)
    monkeypatch.setattr(distill, "distill", real)
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
