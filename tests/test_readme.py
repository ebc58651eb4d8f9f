"""The README runs as written: its Python blocks after the quick start's smoke run, and every
`synthdistill ...` command that can run on CPU with tiny models; the others at least parse."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest

from synthdistill.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

NOT_RUN = {  # a README command (its start) -> why no test runs it (each is still parsed)
    "synthdistill run configs/pets.yaml": "the paper's recipe: Llama-2, SDXL and ViT-B/32 weights, a GPU",
    "synthdistill prompts --dataset pets --generator paper --llm meta-llama": "Llama-2 weights",
    "synthdistill generate --prompts runs/pets/prompts.jsonl": "the default model is SDXL (weights, a GPU)",
    "torchrun --nproc_per_node 8 -m synthdistill generate": "8 GPUs and SDXL",
    "synthdistill distill --shards runs/pets/shards": "the ViT-B/32 teacher's DataComp weights",
    "synthdistill distill -c configs/pets.yaml": "the ViT-B/32 teacher's DataComp weights",
    "torchrun --nproc_per_node 8 -m synthdistill distill": "8 GPUs and the ViT-B/32 teacher",
    "torchrun --nnodes 4": "4 nodes of GPUs and DataComp",
    "synthdistill distill -c configs/imagenet.yaml": "ImageNet and the ViT-B/32 teacher",
    "synthdistill evaluate --student runs/pets/student --datasets pets": "the real Pets test set",
    "synthdistill evaluate --teacher-only --teacher ViT-B-32": "the real Pets test set and ViT-B/32",
    "synthdistill evaluate --student runs/x/student --image-folder ~/mydata/test": "the user's own photos",
    "synthdistill export -c configs/pets.yaml --precision": "int8 calibrates on the Pets run's own shards",
    "synthdistill predict --model runs/pets/export/model.int8.onnx": "needs that int8 form",
    "synthdistill run configs/datacomp_medium.yaml": "DataComp medium and the ViT-B/32 teacher",
    "synthdistill run configs/food101.yaml": "the paper's recipe: Llama-2, SDXL and ViT-B/32 weights, a GPU",
    "synthdistill prompts --dataset pets --generator paper --llm /path": "local Llama-2 weights",
}
LISTING = "synthdistill prompts | generate | distill"  # names the subcommands; not a command


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def readme_commands() -> list[str]:
    """Every line of the bash blocks that runs synthdistill (continuations joined, comments cut)."""
    commands = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            command = " ".join(shlex.split(line, comments=True))
            if (command.startswith("synthdistill ") or "-m synthdistill " in command) and LISTING not in line:
                commands.append(command)
    return commands


def _argv(command: str) -> list[str]:
    argv = shlex.split(command)
    return argv[argv.index("synthdistill") + 1 :]


def _skipped(command: str) -> bool:
    return any(command.startswith(start) for start in NOT_RUN)


def test_every_readme_command_is_run_or_named_with_its_reason_and_each_parses():
    commands = readme_commands()
    assert len(commands) > 20
    for start in NOT_RUN:
        assert any(c.startswith(start) for c in commands), f"stale entry: {start}"
    parser = build_parser()
    for command in commands:
        argv = [re.sub(r"\$\w+", "0", arg) for arg in _argv(command)]  # $SLURM_ARRAY_TASK_ID
        parser.parse_args(argv)  # exits (and fails the test) on a flag the CLI no longer has


@pytest.fixture
def after_quick_start(tmp_path):
    """A scratch copy of configs/ where the quick start's smoke run has run, as a new user has it."""
    scratch = tmp_path
    shutil.copytree(ROOT / "configs", scratch / "configs")
    before = Path.cwd()
    os.chdir(scratch)
    try:
        quick_start = next(
            c for c in readme_commands() if c.startswith("synthdistill run configs/smoke.yaml")
        )
        assert main(_argv(quick_start)) == 0
        yield scratch
    finally:
        os.chdir(before)


@pytest.mark.slow  # two smoke runs (the quick start's and the API example's): a few minutes on 2 cores
def test_after_the_quick_start_the_python_blocks_and_the_tiny_capable_commands_run(
    after_quick_start, capsys, make_image
):
    """The Python blocks run as pasted; then the runs/pets paths of the README hold the smoke run's
    tiny student, so its commands run in README order."""
    blocks = _blocks("python")
    assert blocks
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    probabilities = namespace["probabilities"]
    assert tuple(probabilities.shape) == (1, 2) and abs(float(probabilities.sum()) - 1) < 1e-5
    assert set(namespace["result"].stages.values()) == {"done"}
    assert namespace["result"].run_dir.name == "api-smoke"
    assert "cat" in capsys.readouterr().out

    shutil.copytree(
        after_quick_start / "runs" / "smoke" / "student", after_quick_start / "runs" / "pets" / "student"
    )
    (after_quick_start / "birds.txt").write_text("robin\nwren\nEuropean robin\n")
    smoke_prompts = (after_quick_start / "runs" / "smoke" / "prompts.jsonl").read_text().splitlines()
    (after_quick_start / "p.jsonl").write_text("\n".join(smoke_prompts[:4]) + "\n")
    shutil.copytree(
        after_quick_start / "runs" / "smoke" / "shards", after_quick_start / "runs" / "pets" / "shards"
    )
    make_image(1).save(after_quick_start / "photo1.jpg")
    make_image(2).save(after_quick_start / "photo2.png")
    (after_quick_start / "photos").mkdir()
    make_image(3).save(after_quick_start / "photos" / "a.jpg")
    (after_quick_start / "more" / "deep").mkdir(parents=True)
    make_image(4).save(after_quick_start / "more" / "deep" / "b.webp")
    ran = []
    for command in readme_commands():
        if _skipped(command) or command.startswith("synthdistill run configs/smoke.yaml"):
            continue
        capsys.readouterr()
        assert main(_argv(command)) == 0, command
        out = capsys.readouterr().out
        assert out.strip(), command
        ran.append(command)
        if "predict --model" in command:
            rows = json.loads(out)
            assert [Path(r["path"]).name for r in rows] == ["photo1.jpg", "photo2.png"]
            assert all(len(r["top_k"]) == 5 for r in rows)
        if "predict --student" in command:
            assert out.count("%") == 2 * 5  # two images, the top 5 of Pets' 37 classes each (labels.json)
    assert (after_quick_start / "runs" / "pets" / "export" / "model.onnx").is_file()
    assert len((after_quick_start / "runs" / "pets" / "prompts.jsonl").read_text().splitlines()) == 37 * 265
    assert len(ran) == 13
